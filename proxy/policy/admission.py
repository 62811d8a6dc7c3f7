"""Per-engine admission: a concurrency cap, and a queue ordered by tier priority then arrival.

Below the cap a request goes straight through. At the cap it waits; when a slot frees it goes to
the waiter with the highest priority, first come first served within a priority. Each tier bounds
its wait (``queue.max_wait_ms``); past it, or when the queue is full, the request is refused with
503 ``engine_overloaded`` (not 429: the caller is within its own limits, the fleet is short of
capacity, so a retry elsewhere or later is right). Low priorities can wait long under sustained
load; the per-tier bound turns that into a prompt 503 instead of unbounded latency.

Cancellation-safe: a waiter whose client leaves drops out of the queue; if a slot was handed to it
in the same instant, the slot is passed on, never lost::

    admission = EngineAdmission("small", cap=16, observer=metrics_observer)
    async with admission.slot(priority=policy.priority, max_wait_s=policy.queue.max_wait_ms / 1000,
                              tier=policy.tier):
        await call_engine(...)

The cap is configured (``engines[].max_concurrency``). :func:`next_cap` is an optional adaptive
rule (bounded AIMD on latency against the engine's unloaded baseline); feed it samples and apply
the result with :meth:`EngineAdmission.set_cap`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from proxy.policy.errors import EngineOverloaded

Outcome = Literal["admitted", "timeout", "full", "cancelled"]
_WAIT_EWMA_ALPHA = 0.2


class AdmissionObserver(Protocol):
    """Where queue facts go (the metrics). Called synchronously; keep it cheap."""

    def queue_length(self, engine: str, length: int) -> None: ...

    def waited(self, engine: str, tier: str, seconds: float, outcome: Outcome) -> None: ...


class NullObserver:
    def queue_length(self, engine: str, length: int) -> None:
        return None

    def waited(self, engine: str, tier: str, seconds: float, outcome: Outcome) -> None:
        return None


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]  # (-priority, arrival number): heapq pops the smallest
    future: asyncio.Future[None] = field(compare=False)
    since: float = field(compare=False, default=0.0)  # when it joined the queue


class EngineAdmission:
    """The admission gate of one engine. ``cap=None`` admits everything (and still counts)."""

    def __init__(
        self,
        engine: str,
        cap: int | None,
        *,
        max_queue: int = 1024,
        observer: AdmissionObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cap is not None and cap < 1:
            raise ValueError("cap must be at least 1")
        self.engine = engine
        self._cap = cap
        self._max_queue = max_queue
        self._observer: AdmissionObserver = observer or NullObserver()
        self._clock = clock
        self._active = 0
        self._queue: list[_Waiter] = []
        self._arrivals = itertools.count()
        self._recent_wait_s = 0.0  # moving average of how long admitted requests queued
        # The queue length last told to the observer: it hears of changes only, not of every
        # request that passed an empty queue.
        self._reported = 0
        self._observer.queue_length(engine, 0)

    @property
    def cap(self) -> int | None:
        return self._cap

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def free(self) -> bool:
        """A request arriving now would be admitted at once."""
        return not self._queue and self._has_room()

    def queue_delay(self) -> float:
        """Seconds a request joining the queue now can expect to wait, from what is observed:
        the longer of how long the oldest waiter has already waited and how long recently
        admitted requests waited (the queue's sojourn time, as CoDel measures it). 0 when
        nothing waits."""
        if not self._queue:
            return 0.0
        oldest = min(w.since for w in self._queue)
        return max(self._clock() - oldest, self._recent_wait_s)

    def _admitted_after(self, waited_s: float) -> None:
        self._recent_wait_s += _WAIT_EWMA_ALPHA * (waited_s - self._recent_wait_s)

    def set_cap(self, cap: int | None) -> None:
        """Change the cap; a raise admits waiters at once, a cut takes effect as slots free."""
        if cap is not None and cap < 1:
            raise ValueError("cap must be at least 1")
        self._cap = cap
        self._dispatch()

    def _has_room(self) -> bool:
        return self._cap is None or self._active < self._cap

    def _dispatch(self) -> None:
        while self._queue and self._has_room():
            waiter = heapq.heappop(self._queue)
            if waiter.future.done():  # cancelled, already accounted for
                continue
            waiter.future.set_result(None)
            self._active += 1  # the slot belongs to the waiter from this moment
        self._report_length()

    def _report_length(self) -> None:
        length = len(self._queue)
        if length != self._reported:
            self._reported = length
            self._observer.queue_length(self.engine, length)

    def _release(self) -> None:
        self._active -= 1
        self._dispatch()

    def _leave_queue(self, waiter: _Waiter) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        heapq.heapify(self._queue)
        self._report_length()

    async def _acquire(self, priority: int, max_wait_s: float, tier: str) -> None:
        if not self._queue and self._has_room():
            self._active += 1
            self._admitted_after(0.0)
            self._observer.waited(self.engine, tier, 0.0, "admitted")
            return
        if len(self._queue) >= self._max_queue:
            self._observer.waited(self.engine, tier, 0.0, "full")
            raise EngineOverloaded(
                f"engine {self.engine!r} is saturated and its queue is full",
                retry_after=max(1.0, max_wait_s),
            )
        started = self._clock()
        loop = asyncio.get_running_loop()
        waiter = _Waiter((-priority, next(self._arrivals)), loop.create_future(), started)
        heapq.heappush(self._queue, waiter)
        self._report_length()
        try:
            async with asyncio.timeout(max_wait_s):
                await waiter.future
        except BaseException as exc:
            granted = waiter.future.done() and not waiter.future.cancelled()
            if isinstance(exc, TimeoutError) and granted:
                # The slot arrived just as the wait ran out: keep it rather than waste it.
                waited = self._clock() - started
                self._admitted_after(waited)
                self._observer.waited(self.engine, tier, waited, "admitted")
                return
            if granted:
                self._release()  # handed over, but the client is gone: pass it on
            else:
                waiter.future.cancel()
                self._leave_queue(waiter)
            waited = self._clock() - started
            if isinstance(exc, TimeoutError):
                self._observer.waited(self.engine, tier, waited, "timeout")
                raise EngineOverloaded(
                    f"engine {self.engine!r} is saturated; no slot within {max_wait_s:g} s",
                    retry_after=max(1.0, max_wait_s),
                ) from None
            self._observer.waited(self.engine, tier, waited, "cancelled")
            raise
        waited = self._clock() - started
        self._admitted_after(waited)
        self._observer.waited(self.engine, tier, waited, "admitted")

    def slot(self, *, priority: int, max_wait_s: float, tier: str = "") -> Slot:
        """Hold one engine slot for the block; 503 EngineOverloaded past ``max_wait_s``."""
        return Slot(self, priority, max_wait_s, tier)


class Slot:
    """The async context of one slot (a class, not a generator: it is on every request).

    ``waited_s`` is how long it queued for the slot, admitted or not: time spent waiting for
    the engine's capacity, which the request path keeps out of the proxy's own overhead.
    """

    __slots__ = ("_gate", "_max_wait_s", "_priority", "_tier", "waited_s")

    def __init__(self, gate: EngineAdmission, priority: int, max_wait_s: float, tier: str) -> None:
        self._gate = gate
        self._priority = priority
        self._max_wait_s = max_wait_s
        self._tier = tier
        self.waited_s = 0.0

    async def __aenter__(self) -> None:
        started = self._gate._clock()
        try:
            await self._gate._acquire(self._priority, self._max_wait_s, self._tier)
        finally:
            self.waited_s = self._gate._clock() - started

    async def __aexit__(self, *exc: object) -> None:
        self._gate._release()


# --- optional adaptive cap ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapState:
    cap: float
    baseline_s: float | None = None  # latency with little load: the lowest seen, drifting up
    recent_s: float | None = None  # smoothed current latency


def next_cap(
    state: CapState,
    latency_s: float,
    in_flight: int,
    *,
    min_cap: int,
    max_cap: int,
    tolerance: float = 2.0,
    smoothing: float = 0.1,
    drift: float = 0.001,
) -> CapState:
    """One latency sample in, the next cap out (always within [min_cap, max_cap]).

    Latency stays flat while the engine batches more requests and bends up once it is saturated.
    So: while the smoothed latency is within ``tolerance`` x the unloaded baseline and the cap is
    actually in use, grow by about one slot per cap's worth of samples (additive); past the bend,
    shrink by 10% (multiplicative). The baseline drifts up slowly so a permanently slower engine
    (a longer model, a new version) re-learns it instead of shrinking forever.
    """
    if not (latency_s > 0 and math.isfinite(latency_s)):
        return state
    baseline = (
        latency_s if state.baseline_s is None else min(latency_s, state.baseline_s * (1 + drift))
    )
    recent = (
        latency_s
        if state.recent_s is None
        else (1 - smoothing) * state.recent_s + smoothing * latency_s
    )
    cap = state.cap
    if recent > tolerance * baseline:
        cap *= 0.9
    elif in_flight >= math.floor(cap):
        cap += 1.0 / max(cap, 1.0)
    cap = float(min(max(cap, min_cap), max_cap))
    return CapState(cap, baseline, recent)
