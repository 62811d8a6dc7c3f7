"""Embedding worker: batching, the model thread, errors, shutdown."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from proxy.embeddings.worker import EmbeddingWorker, WorkerClosed


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
