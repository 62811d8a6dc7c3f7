"""The router's estimate of an engine's time to first token under queueing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.engines.pool import Engine
from proxy.routing.router import Router
from proxy.settings import EngineSettings


def _router() -> tuple[Router, Engine]:
    engine = Engine.from_settings(
        EngineSettings(name="large", model="m", urls=["http://127.0.0.1:1"])
    )
    return Router(engines=[engine], classifier=None, count_tokens=len), engine


def test_idle_engine_is_its_time_to_first_token() -> None:
    router, engine = _router()
    router.observe_ttft("large", 0.3)
    router.observe_service("large", 12.0)
    assert router.load(engine, queued=0, admitted=4).est_ttft_ms == 300.0


def test_a_queue_of_long_answers_waits_for_them_to_finish() -> None:
    router, engine = _router()
    router.observe_ttft("large", 0.3)
    router.observe_service("large", 12.0)  # answers hold their slot 12 s
    # A full batch queued behind a full batch: one answer's time, then the first token.
    assert router.load(engine, queued=8, admitted=8).est_ttft_ms == 12_300.0


def test_before_any_answer_is_timed_the_ttft_stands_in() -> None:
    router, engine = _router()
    router.observe_ttft("large", 0.5)
    assert router.load(engine, queued=4, admitted=2).est_ttft_ms == 500.0 + 2 * 500.0


@given(
    ttft=st.floats(0.001, 10),
    service=st.floats(0.001, 100),
    queued=st.integers(0, 100),
    admitted=st.integers(0, 100),
)
def test_more_queue_never_means_less_wait(
    ttft: float, service: float, queued: int, admitted: int
) -> None:
    router, engine = _router()
    router.observe_ttft("large", ttft)
    router.observe_service("large", service)
    shorter = router.load(engine, queued=queued, admitted=admitted).est_ttft_ms
    longer = router.load(engine, queued=queued + 1, admitted=admitted).est_ttft_ms
    assert longer > shorter >= ttft * 1000 - 1e-6


def test_a_queue_that_has_made_requests_wait_counts_that_wait() -> None:
    router, engine = _router()
    router.observe_ttft("large", 0.1)
    router.observe_service("large", 0.15)  # only short answers timed so far
    # Long answers fill the slots and none has finished yet, but the queue's head has waited 4 s.
    assert router.load(engine, queued=8, admitted=8, queue_delay_s=4.0).est_ttft_ms == 4100.0
    # Without a queue the observed delay of an earlier one does not count.
    assert router.load(engine, queued=0, admitted=8, queue_delay_s=4.0).est_ttft_ms == 100.0


def test_an_idle_engine_is_estimated_by_its_quickest_recent_answers() -> None:
    router, engine = _router()
    router.observe_ttft("large", 0.2)
    for _ in range(10):
        router.observe_ttft("large", 2.0)  # answers timed while the engine was busy
    busy = router.load(engine, queued=0, admitted=3).est_ttft_ms
    idle = router.load(engine, queued=0, admitted=0).est_ttft_ms
    assert busy > 1500.0  # the moving average has learnt the load
    assert 200.0 < idle < 600.0  # the floor rose a little, not to the loaded level


def test_the_idle_floor_follows_an_engine_that_really_got_slower() -> None:
    router, engine = _router()
    router.observe_ttft("large", 0.2)
    for _ in range(300):
        router.observe_ttft("large", 1.0)  # every answer slower, for a long time
    assert router.load(engine, queued=0, admitted=0).est_ttft_ms > 950.0


@given(observed=st.lists(st.floats(0.001, 10), min_size=1, max_size=50))
def test_idle_is_never_estimated_slower_than_busy(observed: list[float]) -> None:
    router, engine = _router()
    for seconds in observed:
        router.observe_ttft("large", seconds)
    idle = router.load(engine, queued=0, admitted=0).est_ttft_ms
    busy = router.load(engine, queued=0, admitted=1).est_ttft_ms
    assert idle <= busy
    assert idle >= min(observed) * 1000 - 1e-6
