"""Batch concurrent embedding requests onto one dedicated model thread.

Requests arriving close together are encoded in one model call: a batch is flushed when it holds
``max_batch`` texts or ``max_wait_ms`` after its first text arrived, whichever comes first. While
the model thread encodes one batch, the next fills up, so under load batches grow by themselves and
at low load a lone request waits at most ``max_wait_ms``. The model never runs on the event loop.

    async with EmbeddingWorker(encode) as worker:
        vector = await worker.embed("what is the capital of France?")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import numpy as np

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]
# (texts encoded, seconds encoding, seconds the batch's first text waited for the flush)
OnBatch = Callable[[int, float, float], None]


class WorkerClosed(RuntimeError):
    """``embed`` was called on a worker that is not running."""


class EmbeddingWorker:
    def __init__(
        self,
        encode: Encode,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        on_batch: OnBatch | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._first_arrival = 0.0
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embedding-worker")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            _, future = queue.get_nowait()
            if not future.done():
                future.set_exception(WorkerClosed("embedding worker stopped"))
        executor, self._executor = self._executor, None
        if executor is not None:
            # a batch may still be encoding: wait for the thread without blocking the loop
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def __aenter__(self) -> EmbeddingWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def embed(self, text: str) -> np.ndarray:
        """The text's embedding (one row of ``encode``'s output)."""
        if self._queue is None:
            raise WorkerClosed("embedding worker is not running")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((text, future))
        return await future

    async def _collect(
        self, queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]]
    ) -> list[tuple[str, asyncio.Future[np.ndarray]]]:
        batch = [await queue.get()]
        self._first_arrival = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [(t, f) for t, f in await self._collect(queue) if not f.cancelled()]
            if not batch:
                continue
            try:
                await self._encode_batch(batch)
            except asyncio.CancelledError:
                _fail(batch, WorkerClosed("embedding worker stopped"))
                raise

    async def _encode_batch(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        assert self._executor is not None
        # identical texts in one batch (a burst of the same question) are encoded once
        unique = list(dict.fromkeys(text for text, _ in batch))
        started = time.perf_counter()
        waited = started - self._first_arrival
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._encode, unique
            )
            if len(vectors) != len(unique):
                raise ValueError(f"encode returned {len(vectors)} rows for {len(unique)} texts")
        except Exception as exc:
            log.warning("embeddings.batch_failed", exc_info=True)
            _fail(batch, exc)
            return
        elapsed = time.perf_counter() - started
        rows = {text: vectors[i] for i, text in enumerate(unique)}
        for text, future in batch:
            if not future.done():
                future.set_result(rows[text])
        if self._on_batch is not None:
            try:
                self._on_batch(len(unique), elapsed, waited)
            except Exception:
                log.warning("embeddings.on_batch_failed", exc_info=True)


def _fail(batch: list[tuple[str, asyncio.Future[np.ndarray]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
