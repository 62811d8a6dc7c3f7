"""Engine admission: cap, priority then FIFO order, bounded waits, cancellation safety."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.admission import CapState, EngineAdmission, Outcome, next_cap
from proxy.policy.errors import EngineOverloaded


class Recorder:
    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.waits: list[tuple[str, Outcome]] = []

    def queue_length(self, engine: str, length: int) -> None:
        self.lengths.append(length)

    def waited(self, engine: str, tier: str, seconds: float, outcome: Outcome) -> None:
        assert seconds >= 0
        self.waits.append((tier, outcome))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def checked(gate: EngineAdmission, cap: int) -> Callable[[], None]:
    def check() -> None:
        assert gate.active <= cap

    return check


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(min_value=1, max_value=4),
    priorities=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=25),
    cancelled=st.sets(st.integers(min_value=0, max_value=24)),
)
def test_priority_then_fifo_never_above_cap_and_cancelled_never_admitted(
    cap: int, priorities: list[int], cancelled: set[int]
) -> None:
    async def run() -> None:
        gate = EngineAdmission("small", cap)
        order: list[int] = []
        release = [asyncio.Event() for _ in priorities]
        holders_release = asyncio.Event()

        async def holder() -> None:
            async with gate.slot(priority=0, max_wait_s=60):
                await holders_release.wait()

        async def waiter(i: int, priority: int) -> None:
            async with gate.slot(priority=priority, max_wait_s=60):
                assert gate.active <= cap
                order.append(i)
                await release[i].wait()

        holders = [asyncio.create_task(holder()) for _ in range(cap)]
        await settle()
        assert gate.active == cap
        tasks = [asyncio.create_task(waiter(i, p)) for i, p in enumerate(priorities)]
        await settle()
        assert gate.waiting == len(priorities)
        for i in cancelled & set(range(len(priorities))):
            tasks[i].cancel()
        await settle()
        holders_release.set()
        await asyncio.gather(*holders)
        # Keep releasing whoever got in; every freed slot goes to the best remaining waiter.
        alive_count = len(priorities) - len(cancelled & set(range(len(priorities))))
        while not all(release[i].is_set() for i in order) or len(order) < alive_count:
            for i in list(order):
                release[i].set()
            await settle()
        await asyncio.gather(*tasks, return_exceptions=True)
        alive = [i for i in range(len(priorities)) if i not in cancelled]
        expected = sorted(alive, key=lambda i: (-priorities[i], i))
        # The first `cap` admitted are the top `cap` in queue order; after that each release
        # admits the best remaining, so the whole order is the queue order.
        assert order == expected
        assert (gate.active, gate.waiting) == (0, 0)

    asyncio.run(run())


async def test_below_cap_goes_straight_through_and_is_counted() -> None:
    recorder = Recorder()
    gate = EngineAdmission("small", 2, observer=recorder)
    async with gate.slot(priority=1, max_wait_s=0, tier="free"):
        assert gate.active == 1
    assert gate.active == 0
    assert recorder.waits == [("free", "admitted")]


async def test_timeout_is_503_and_leaves_the_queue() -> None:
    recorder = Recorder()
    gate = EngineAdmission("small", 1, observer=recorder)
    async with gate.slot(priority=1, max_wait_s=1):
        with pytest.raises(EngineOverloaded) as refused:
            async with gate.slot(priority=1, max_wait_s=0.01, tier="free"):
                pass
        assert (refused.value.status, refused.value.code) == (503, "engine_overloaded")
        assert refused.value.retry_after_header == "1"
        assert gate.waiting == 0
    assert gate.active == 0
    assert ("free", "timeout") in recorder.waits
    assert recorder.lengths[-1] == 0


async def test_full_queue_is_refused_at_once() -> None:
    gate = EngineAdmission("small", 1, max_queue=1)
    async with gate.slot(priority=1, max_wait_s=1):
        first = asyncio.create_task(gate.slot(priority=1, max_wait_s=5).__aenter__())
        await settle()
        with pytest.raises(EngineOverloaded):
            async with gate.slot(priority=9, max_wait_s=5):
                pass
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    assert (gate.active, gate.waiting) == (0, 0)


async def test_slot_handed_to_a_waiter_cancelled_in_the_same_instant_is_passed_on() -> None:
    gate = EngineAdmission("small", 1)
    admitted: list[str] = []

    async def wait(name: str, priority: int) -> None:
        async with gate.slot(priority=priority, max_wait_s=5):
            admitted.append(name)

    holder = gate.slot(priority=0, max_wait_s=0)
    await holder.__aenter__()
    first = asyncio.create_task(wait("first", 5))
    second = asyncio.create_task(wait("second", 1))
    await settle()
    await holder.__aexit__(None, None, None)  # the slot is handed to "first" ...
    first.cancel()  # ... whose client leaves before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert admitted == ["second"]
    assert (gate.active, gate.waiting) == (0, 0)


async def test_raising_the_cap_admits_waiters() -> None:
    gate = EngineAdmission("small", 1)
    async with gate.slot(priority=0, max_wait_s=0):
        waiter = asyncio.create_task(gate.slot(priority=0, max_wait_s=5).__aenter__())
        await settle()
        assert gate.waiting == 1
        gate.set_cap(2)
        await waiter
        assert (gate.active, gate.waiting) == (2, 0)
    with pytest.raises(ValueError):
        gate.set_cap(0)


async def test_uncapped_admits_everything() -> None:
    gate = EngineAdmission("small", None)
    async with gate.slot(priority=0, max_wait_s=0), gate.slot(priority=0, max_wait_s=0):
        assert gate.active == 2


@given(
    samples=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=100) | st.just(float("nan")), st.integers(0, 200)
        ),
        max_size=200,
    ),
    bounds=st.tuples(st.integers(1, 20), st.integers(0, 100)),
)
def test_adaptive_cap_stays_within_bounds(
    samples: list[tuple[float, int]], bounds: tuple[int, int]
) -> None:
    low, extra = bounds
    state = CapState(cap=float(low))
    for latency, in_flight in samples:
        state = next_cap(state, latency, in_flight, min_cap=low, max_cap=low + extra)
        assert low <= state.cap <= low + extra


def test_adaptive_cap_grows_while_flat_and_shrinks_past_the_bend() -> None:
    state = CapState(cap=4.0)
    for _ in range(100):
        state = next_cap(state, 0.1, in_flight=int(state.cap), min_cap=2, max_cap=64)
    grown = state.cap
    assert grown > 8
    for _ in range(100):
        state = next_cap(state, 1.0, in_flight=int(state.cap), min_cap=2, max_cap=64)
    assert state.cap < grown / 2
    idle = CapState(cap=4.0)
    for _ in range(100):
        idle = next_cap(idle, 0.1, in_flight=0, min_cap=2, max_cap=64)
    assert idle.cap == 4.0  # an unused cap is not raised on faith


async def test_the_observer_hears_queue_length_changes_not_every_request() -> None:
    recorder = Recorder()
    gate = EngineAdmission("small", 1, observer=recorder)
    for _ in range(3):  # an empty queue passed three times: nothing new to report
        async with gate.slot(priority=0, max_wait_s=1):
            pass
    assert recorder.lengths == [0]  # the series exists from the start
    async with gate.slot(priority=0, max_wait_s=1):
        waiter = asyncio.create_task(_hold(gate))
        await settle()
        assert recorder.lengths == [0, 1]
    await waiter
    assert recorder.lengths == [0, 1, 0]


async def _hold(gate: EngineAdmission) -> None:
    async with gate.slot(priority=0, max_wait_s=1):
        pass


async def test_queue_delay_is_what_the_queue_has_shown() -> None:
    now = [100.0]
    gate = EngineAdmission("large", 1, clock=lambda: now[0])
    assert gate.queue_delay() == 0.0  # nothing waits
    held = gate.slot(priority=1, max_wait_s=60)
    await held.__aenter__()
    waiter = asyncio.create_task(gate.slot(priority=1, max_wait_s=60).__aenter__())
    await settle()
    now[0] += 3.0
    # The oldest waiter has waited 3 s: a newcomer can expect at least that.
    assert gate.queue_delay() == 3.0
    await held.__aexit__(None, None, None)
    await waiter
    assert gate.queue_delay() == 0.0  # the queue is empty again
    # Admitted after 3 s: the next queue starts from that experience, not from zero.
    late = asyncio.create_task(gate.slot(priority=1, max_wait_s=60).__aenter__())
    await settle()
    assert 0.0 < gate.queue_delay() < 3.0
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
