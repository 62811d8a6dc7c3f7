"""Embedding worker: batching, the model thread, errors, shutdown."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.embeddings.worker import (
    EmbeddingWorker,
    EncoderBusy,
    WorkerClosed,
    split_by_length,
)


class FakeModel:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[int] = set()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.threads.add(threading.get_ident())
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


async def test_concurrent_calls_share_a_batch_on_the_model_thread() -> None:
    model = FakeModel()
    seen: list[tuple[int, float]] = []
    async with EmbeddingWorker(
        model, max_batch=32, max_wait_ms=200, on_batch=lambda n, s, w: seen.append((n, s))
    ) as worker:
        texts = [f"text number {i}" + "x" * i for i in range(10)]
        vectors = await asyncio.gather(*(worker.embed(t) for t in texts))
    assert model.batches == [texts]
    assert [v[0] for v in vectors] == [len(t) for t in texts]
    assert threading.get_ident() not in model.threads
    assert [n for n, _ in seen] == [10]


async def test_batches_are_capped() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model, max_batch=4, max_wait_ms=50) as worker:
        await asyncio.gather(*(worker.embed(str(i)) for i in range(10)))
    assert [len(b) for b in model.batches] == [4, 4, 2]


async def test_a_lone_request_is_flushed_after_max_wait() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model, max_batch=32, max_wait_ms=1) as worker:
        first = await worker.embed("alone")
        second = await worker.embed("later")
    assert model.batches == [["alone"], ["later"]]
    assert first[0] == 5 and second[0] == 5


async def test_duplicate_texts_are_encoded_once() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model, max_wait_ms=50) as worker:
        a, b, c = await asyncio.gather(
            worker.embed("same"), worker.embed("other"), worker.embed("same")
        )
    assert model.batches == [["same", "other"]]
    np.testing.assert_array_equal(a, c)
    assert b[1] == 1


async def test_model_errors_reach_every_caller_and_the_worker_survives() -> None:
    calls = 0

    def flaky(texts: list[str]) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("out of memory")
        return np.ones((len(texts), 2), dtype=np.float32)

    async with EmbeddingWorker(flaky, max_wait_ms=50) as worker:
        results = await asyncio.gather(worker.embed("a"), worker.embed("b"), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert (await worker.embed("c")).shape == (2,)


async def test_embed_needs_a_running_worker() -> None:
    worker = EmbeddingWorker(FakeModel())
    with pytest.raises(WorkerClosed):
        await worker.embed("x")
    async with worker:
        pass
    with pytest.raises(WorkerClosed):
        await worker.embed("x")


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EmbeddingWorker(FakeModel(), max_batch=0)


async def test_stopping_mid_batch_releases_its_callers() -> None:
    started, release = threading.Event(), threading.Event()

    def slow(texts: list[str]) -> np.ndarray:
        started.set()
        release.wait(10)
        return np.ones((len(texts), 2), dtype=np.float32)

    worker = EmbeddingWorker(slow, max_wait_ms=1)
    await worker.start()
    pending = asyncio.create_task(worker.embed("x"))
    await asyncio.to_thread(started.wait, 10)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.01)
    release.set()
    await stopping
    with pytest.raises(WorkerClosed):
        await pending


async def test_a_wrong_row_count_is_an_error_not_a_dead_worker() -> None:
    def short(texts: list[str]) -> np.ndarray:
        return np.ones((max(0, len(texts) - 1), 2), dtype=np.float32)

    async with EmbeddingWorker(short, max_wait_ms=1) as worker:
        with pytest.raises(ValueError):
            await worker.embed("x")
        with pytest.raises(ValueError):
            await worker.embed("y")  # the worker is still serving


async def test_a_lone_text_after_a_lone_text_does_not_wait() -> None:
    # max_wait_ms applies only under load (the previous batch held several texts); a lone
    # request is flushed at once. An hour-long wait would hang the test if it applied.
    model = FakeModel()
    async with EmbeddingWorker(model, max_batch=32, max_wait_ms=3_600_000) as worker:
        await asyncio.wait_for(worker.embed("alone"), timeout=10)
        await asyncio.wait_for(worker.embed("again"), timeout=10)
    assert model.batches == [["alone"], ["again"]]


async def test_under_load_the_next_batch_waits_for_more_texts() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model, max_batch=32, max_wait_ms=200) as worker:
        await asyncio.gather(worker.embed("a"), worker.embed("b"))
        first = asyncio.create_task(worker.embed("c"))
        await asyncio.sleep(0.02)  # well inside the wait: joins c's batch
        await asyncio.gather(first, worker.embed("d"))
    assert model.batches == [["a", "b"], ["c", "d"]]


async def test_a_large_batch_is_split_across_threads_in_order() -> None:
    model = FakeModel()
    texts = [f"question {i} " + "x" * (i * 7 % 23) for i in range(24)]
    async with EmbeddingWorker(model, max_batch=64, threads=3) as worker:
        vectors = await asyncio.gather(*(worker.embed(t) for t in texts))
    assert sorted(len(b) for b in model.batches) == [8, 8, 8]
    assert sorted(t for b in model.batches for t in b) == sorted(texts)
    assert [v[0] for v in vectors] == [len(t) for t in texts]


async def test_a_small_batch_stays_whole() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model, max_batch=64, threads=2) as worker:
        await asyncio.gather(*(worker.embed(str(i)) for i in range(7)))
    assert [len(b) for b in model.batches] == [7]


async def test_recent_texts_are_answered_without_the_model() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model, remembered=2) as worker:
        first = await worker.embed("one")
        again = await worker.embed("one")
        await worker.embed("two")
        await worker.embed("three")  # evicts "one", the least recently used
        await worker.embed("one")
    np.testing.assert_array_equal(first, again)
    assert model.batches == [["one"], ["two"], ["three"], ["one"]]


async def test_nothing_is_remembered_by_default() -> None:
    model = FakeModel()
    async with EmbeddingWorker(model) as worker:
        await worker.embed("one")
        await worker.embed("one")
    assert model.batches == [["one"], ["one"]]


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EmbeddingWorker(FakeModel(), threads=0)


@given(
    st.lists(st.text(max_size=40), max_size=60),
    st.integers(min_value=1, max_value=5),
)
def test_split_by_length_keeps_every_text_once_in_order(texts: list[str], parts: int) -> None:
    split = split_by_length(texts, parts)
    assert len(split) == (parts if parts > 1 else 1)
    assert sorted(t for part in split for t in part) == sorted(texts)
    for part in split:  # order within a part is the input order
        positions = iter(range(len(texts)))
        assert all(any(texts[i] == t for i in positions) for t in part)


@given(st.lists(st.integers(min_value=0, max_value=120), min_size=2, max_size=60))
def test_split_by_length_balances_the_work(lengths: list[int]) -> None:
    texts = ["x" * n for n in lengths]
    loads = [sum(len(t) + 8 for t in part) for part in split_by_length(texts, 2)]
    # greedy longest-first: the parts differ by at most the longest text's cost
    assert abs(loads[0] - loads[1]) <= max(lengths) + 8


async def test_a_background_text_does_not_wait_behind_a_batch_in_progress() -> None:
    started, release = threading.Event(), threading.Event()
    model = FakeModel()

    def gated(texts: list[str]) -> np.ndarray:
        if "user question" in texts:
            started.set()
            assert release.wait(10)
        return model(texts)

    async with EmbeddingWorker(gated, threads=2) as worker:
        user = asyncio.create_task(worker.embed("user question"))
        assert await asyncio.to_thread(started.wait, 10)  # the user's batch is being encoded
        audit = await asyncio.wait_for(worker.embed_background("an audit's answer"), timeout=10)
        assert not user.done()  # the background text finished first, on the other thread
        release.set()
        await user
    assert audit[0] == len("an audit's answer")
    assert sorted(model.batches) == [["an audit's answer"], ["user question"]]


async def test_background_texts_leave_the_next_lone_text_unbatched_and_unwaited() -> None:
    # Through embed() an audit's two answers would make a batch of two, and the next lone text
    # would then wait max_wait_ms (an hour here) for company.
    model = FakeModel()
    async with EmbeddingWorker(model, max_batch=32, max_wait_ms=3_600_000, threads=2) as worker:
        await asyncio.gather(worker.embed_background("cached"), worker.embed_background("fresh"))
        await asyncio.wait_for(worker.embed("next user text"), timeout=10)
    assert sorted(model.batches) == [["cached"], ["fresh"], ["next user text"]]


async def test_background_texts_are_remembered_and_need_a_running_worker() -> None:
    model = FakeModel()
    worker = EmbeddingWorker(model, remembered=8)
    with pytest.raises(WorkerClosed):
        await worker.embed_background("x")
    async with worker:
        first = await worker.embed_background("answer")
        again = await worker.embed("answer")
    np.testing.assert_array_equal(first, again)
    assert model.batches == [["answer"]]
    with pytest.raises(WorkerClosed):
        await worker.embed_background("x")


async def test_background_texts_are_encoded_one_at_a_time() -> None:
    lock = threading.Lock()
    running = peak = 0

    def counting(texts: list[str]) -> np.ndarray:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threading.Event().wait(0.02)  # long enough for a second call to overlap if it could
        with lock:
            running -= 1
        return np.ones((len(texts), 2), dtype=np.float32)

    async with EmbeddingWorker(counting, threads=3) as worker:
        await asyncio.gather(*(worker.embed_background(f"answer {i}") for i in range(4)))
    assert peak == 1  # three free threads, but background work never takes more than one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
async def test_background_texts_run_at_the_lowest_priority_with_their_own_encode() -> None:
    seen: dict[str, tuple[str, tuple[int, int]]] = {}

    def priority() -> tuple[int, int]:
        tid = threading.get_native_id()
        return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)

    def users(texts: list[str]) -> np.ndarray:
        seen[texts[0]] = ("users", priority())
        return np.ones((len(texts), 2), dtype=np.float32)

    def background(texts: list[str]) -> np.ndarray:
        seen[texts[0]] = ("background", priority())
        return np.zeros((len(texts), 2), dtype=np.float32)

    before = priority()
    async with EmbeddingWorker(users, threads=2, encode_background=background) as worker:
        await worker.embed("user text")
        await worker.embed_background("audit answer")
    # (the idle class where this host lets a thread take it; nice 19 is always allowed)
    expected = (19, os.SCHED_IDLE if _idle_class_allowed() else before[1])
    assert seen == {"user text": ("users", before), "audit answer": ("background", expected)}
    assert priority() == before  # the event loop's thread kept its own


def _idle_class_allowed() -> bool:
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return allowed[0]


async def test_a_background_text_after_stop_is_refused() -> None:
    worker = EmbeddingWorker(FakeModel())
    async with worker:
        pass
    with pytest.raises(WorkerClosed):
        await worker.embed_background("late audit")


async def test_stop_refuses_the_background_texts_still_waiting() -> None:
    started, release = threading.Event(), threading.Event()
    encoded: list[str] = []

    def slow(texts: list[str]) -> np.ndarray:
        started.set()
        release.wait(10)
        encoded.extend(texts)
        return np.ones((len(texts), 2), dtype=np.float32)

    worker = EmbeddingWorker(FakeModel(), encode_background=slow)
    await worker.start()
    running = asyncio.create_task(worker.embed_background("first answer"))
    assert await asyncio.to_thread(started.wait, 10)
    waiting = [asyncio.create_task(worker.embed_background(f"answer {i}")) for i in range(5)]
    await asyncio.sleep(0.01)  # all five queued behind the first
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.01)
    release.set()
    await stopping
    await running  # the one already encoding finishes
    for task in waiting:
        with pytest.raises(WorkerClosed):
            await task
    assert encoded == ["first answer"]


async def test_a_background_encode_error_keeps_its_type() -> None:
    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("oneDNN: out of scratchpad memory")

    async with EmbeddingWorker(FakeModel(), encode_background=broken) as worker:
        with pytest.raises(RuntimeError, match="scratchpad"):
            await worker.embed_background("answer")
        assert (await worker.embed("user text")) is not None  # the worker still serves


class SlowModel(FakeModel):
    """``seconds`` of model time per text, so a queue's wait is known in advance."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.seconds * len(texts))
        return super().__call__(texts)


async def _drained(worker: EmbeddingWorker) -> None:
    for _ in range(500):
        if worker.expected_wait_s() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the encoder never drained")


async def test_texts_taken_into_a_filling_batch_are_ahead_of_a_new_one() -> None:
    # After a batch of two the next batch waits for more texts. Those it has taken off the queue
    # meanwhile are ahead of a new arrival: a fast burst arrives within that wait, and was
    # admitted whole (then waited past max_queue, every text of it) when they were not counted.
    model = SlowModel(0.02)
    async with EmbeddingWorker(model, max_batch=8, max_wait_ms=60, max_queue_ms=1000) as worker:
        await asyncio.gather(worker.embed("a"), worker.embed("b"))
        cost = worker.cost_per_text_s
        assert model.batches == [["a", "b"]] and cost is not None
        first = asyncio.create_task(worker.embed("c"))
        await asyncio.sleep(0.02)  # c is in the batch that waits for more
        assert worker.expected_wait_s() == pytest.approx(2 * cost)  # c's turn, then its own
        await first
        assert worker.expected_wait_s() == 0


async def test_texts_that_would_wait_past_max_queue_are_shed() -> None:
    model = SlowModel(0.02)
    async with EmbeddingWorker(model, max_batch=4, max_wait_ms=1, max_queue_ms=100) as worker:
        # No cost measured yet: nothing is refused, and batches of two or more set the cost.
        await asyncio.gather(*(worker.embed(f"warm {i}") for i in range(5)), return_exceptions=True)
        await _drained(worker)
        cost = worker.cost_per_text_s
        assert cost is not None and cost >= 0.02
        shed_before = worker.shed
        results = await asyncio.gather(
            *(worker.embed(f"burst {i}") for i in range(10)), return_exceptions=True
        )
        # The i-th text of the burst finds i texts ahead of it, and is encoded itself.
        accepted = sum(1 for i in range(10) if (i + 1) * cost <= 0.1)
        assert all(isinstance(r, np.ndarray) for r in results[:accepted])
        assert all(isinstance(r, EncoderBusy) for r in results[accepted:])
        assert 1 <= accepted < 10 and worker.shed - shed_before == 10 - accepted
        busy = results[-1]
        assert isinstance(busy, EncoderBusy) and busy.expected_wait_s > 0.1
        # Once the queue has drained a text is taken again, and a remembered one is never shed.
        assert worker.expected_wait_s() == 0
        assert (await worker.embed("after"))[0] == len("after")
        assert (await worker.embed("burst 0"))[0] == len("burst 0")
    assert worker.shed - shed_before == 10 - accepted


async def test_without_max_queue_nothing_is_shed() -> None:
    model = SlowModel(0.005)
    async with EmbeddingWorker(model, max_batch=4, max_wait_ms=1) as worker:
        await asyncio.gather(*(worker.embed(f"warm {i}") for i in range(5)))
        results = await asyncio.gather(*(worker.embed(f"burst {i}") for i in range(20)))
    assert len(results) == 20 and worker.shed == 0


async def test_a_lone_text_sets_the_cost_until_a_batch_is_measured() -> None:
    model = SlowModel(0.03)
    async with EmbeddingWorker(model, max_batch=4, max_wait_ms=1, max_queue_ms=100) as worker:
        await worker.embed("alone")  # at low load texts go one at a time
        lone = worker.cost_per_text_s
        assert lone is not None and lone >= 0.03
        # A first burst is then shed by the lone text's cost, not queued without bound.
        results = await asyncio.gather(
            *(worker.embed(f"burst {i}") for i in range(10)), return_exceptions=True
        )
        assert worker.shed == sum(isinstance(r, EncoderBusy) for r in results) >= 6


class GatedModel(FakeModel):
    """Blocks on ``release`` for texts containing "slow", so a queued text's wait is held open."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, texts: list[str]) -> np.ndarray:
        if any("slow" in t for t in texts):
            self.started.set()
            assert self.release.wait(10)
        return super().__call__(texts)


async def test_a_request_waits_at_most_max_queue_for_a_text_already_queued() -> None:
    # Shedding on the expected wait alone left the wait unbounded once a text was queued: behind
    # a slower encode than measured (CPU engines on the same cores) requests waited 0.5-1.3 s.
    model = GatedModel()
    async with EmbeddingWorker(model, max_queue_ms=50, remembered=8) as worker:
        started = time.perf_counter()
        with pytest.raises(EncoderBusy) as busy:
            await worker.embed("a slow text")
        waited = time.perf_counter() - started
        assert 0.05 <= waited < 5 and busy.value.expected_wait_s >= 0.05
        assert worker.shed == 1 and not model.release.is_set()
        # The text is still encoded, once: the answer's store takes the vector from that pass.
        later = asyncio.create_task(worker.embed_background("a slow text"))
        await asyncio.sleep(0.01)
        assert not later.done()
        model.release.set()
        vector = await asyncio.wait_for(later, 10)
        assert vector[0] == len("a slow text")
        assert (await worker.embed("a slow text"))[0] == len("a slow text")  # remembered
    assert model.batches == [["a slow text"]]


async def test_a_cancelled_request_leaves_its_text_unencoded() -> None:
    model = GatedModel()
    async with EmbeddingWorker(model, max_batch=8, max_queue_ms=5_000) as worker:
        first = asyncio.create_task(worker.embed("slow, encoding"))
        assert await asyncio.to_thread(model.started.wait, 10)
        gone = asyncio.create_task(worker.embed("client left"))
        kept = asyncio.create_task(worker.embed("client stayed"))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        await asyncio.wait_for(asyncio.gather(first, kept), 10)
        with pytest.raises(asyncio.CancelledError):
            await gone
    assert model.batches == [["slow, encoding"], ["client stayed"]]


async def test_callers_of_one_text_share_its_pass_and_one_leaving_keeps_it_for_the_other() -> None:
    model = GatedModel()
    async with EmbeddingWorker(model, max_batch=8) as worker:
        first = asyncio.create_task(worker.embed("slow, encoding"))
        assert await asyncio.to_thread(model.started.wait, 10)
        gone = asyncio.create_task(worker.embed("same question"))
        stays = asyncio.create_task(worker.embed("same question"))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        vector = await asyncio.wait_for(stays, 10)
        await first
    assert vector[0] == len("same question")
    assert model.batches == [["slow, encoding"], ["same question"]]


async def test_an_awaited_encoder_takes_the_batches_and_no_thread_is_used() -> None:
    """``aencode`` (an encoder in a child process): batches, the parts of a split batch and
    background texts are awaited on the event loop; the thread functions are never called."""
    model = FakeModel()
    awaited: list[tuple[str, list[str]]] = []
    running = 0
    most = 0

    async def aencode(texts: list[str]) -> np.ndarray:
        nonlocal running, most
        running += 1
        most = max(most, running)
        awaited.append(("user", list(texts)))
        await asyncio.sleep(0.01)
        running -= 1
        return np.array([[len(t), 1] for t in texts], dtype=np.float32)

    async def aencode_background(texts: list[str]) -> np.ndarray:
        awaited.append(("background", list(texts)))
        return np.array([[len(t), 2] for t in texts], dtype=np.float32)

    async with EmbeddingWorker(
        model,
        max_batch=64,
        max_wait_ms=50,
        threads=2,
        aencode=aencode,
        aencode_background=aencode_background,
    ) as worker:
        texts = [f"question {i}" for i in range(16)]
        vectors = await asyncio.gather(*(worker.embed(t) for t in texts))
        audit = await worker.embed_background("an audit's answer")
    assert model.batches == []  # never on a thread
    assert [v.tolist() for v in vectors] == [[len(t), 1] for t in texts]
    assert audit.tolist() == [len("an audit's answer"), 2]
    user_parts = [texts for kind, texts in awaited if kind == "user"]
    assert sorted(t for part in user_parts for t in part) == sorted(texts)
    assert most == 2  # a large batch's two parts were awaited side by side
    assert awaited[-1] == ("background", ["an audit's answer"])
