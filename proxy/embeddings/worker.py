"""Batch concurrent embedding requests onto dedicated model threads.

Requests arriving close together are encoded in one model call. While the model encodes one
batch, the next fills up, so under load batches grow by themselves. A batch is flushed when it
holds ``max_batch`` texts, or when nothing more is queued: at once if the previous batch was a
lone text (low load: waiting would only add latency), else up to ``max_wait_ms`` after its first
text arrived (under load a short wait merges the next arrivals into the batch). The model never
runs on the event loop.

With ``threads`` > 1 a large batch is split into that many parts of similar total length, encoded
at the same time on separate threads (``encode`` must then be thread-safe; each call should use
one torch thread, so a preempted thread delays only its own part). ``remembered`` keeps the
vectors of that many recent texts: a repeated question is answered without the model.

``max_queue_ms`` bounds how long a request waits for its text, and sheds load. A text that would
wait longer than that for the model (the texts ahead of it times the recent cost of a text in a
batch) is refused at once with :class:`EncoderBusy`; a text with nothing ahead of it is never
refused. Where the encoder is slower than the traffic (2 cores without native bfloat16 do about
80 lookups a second) the queue would otherwise grow without bound and hold every request behind
it. A text that was queued but is not encoded within ``max_queue_ms`` (its batch ran slower
than the estimate, as when CPU engines take the same cores) also gets :class:`EncoderBusy`; it
stays queued, so ``embed_background`` for it (the answer's store) waits for that pass rather than
encoding it again. Callers of one text queued at once share one pass; the text is dropped from
the queue only when all of them have left (a client gone), not when one has timed out.

With ``aencode`` (an encoder in a child process, proxy/embeddings/process.py) a batch, and each
part of a split one, is awaited on the event loop instead of run on the worker's threads, and
``aencode_background`` takes the background texts (the child runs them at the lowest priority).

``embed_background`` is for work nobody waits on (cache audits): its text goes to a thread of its
own, never into the queue, so a user's text neither waits behind it nor gets batched with it.
Background texts are encoded one at a time (``encode_background``, default ``encode``), on that
thread at the lowest CPU priority (:func:`lowest_priority`): a user's text encoded meanwhile
keeps the cores. (At concurrency 1 an audit's two answers, encoded at normal priority beside the
next request's text, made that request one of the phase's slowest.)

    async with EmbeddingWorker(encode, threads=2) as worker:
        vector = await worker.embed("what is the capital of France?")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from types import TracebackType

import numpy as np

from proxy.tasks import cancelling

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]
# The same, awaited on the event loop (an encoder in a child process: no thread of ours waits)
AsyncEncode = Callable[[list[str]], Awaitable[np.ndarray]]
# (texts encoded, seconds encoding, seconds the batch's first text waited for the flush)
OnBatch = Callable[[int, float, float], None]
# A batch is split across threads only into parts of at least this many texts: smaller parts cost
# more per text and leave the event loop no core.
MIN_PART = 4


class WorkerClosed(RuntimeError):
    """``embed`` was called on a worker that is not running."""


class EncoderUnavailable(RuntimeError):
    """No vector for this text now: the request goes on without one (no semantic lookup, no
    difficulty score)."""


class EncoderBusy(EncoderUnavailable):
    """The text would wait, or has waited, longer than ``max_queue_ms`` for the model."""

    def __init__(self, expected_wait_s: float) -> None:
        super().__init__(f"the encoder is {expected_wait_s * 1000:.0f} ms behind")
        self.expected_wait_s = expected_wait_s


@dataclass
class _Pass:
    """A text queued for the model, and how many callers are waiting for it."""

    future: asyncio.Future[np.ndarray]
    waiters: int = 0


# Weight of the newest batch in the running per-text cost (recent batches count most).
_COST_WEIGHT = 0.2


class EmbeddingWorker:
    def __init__(
        self,
        encode: Encode,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        on_batch: OnBatch | None = None,
        *,
        threads: int = 1,
        remembered: int = 0,
        encode_background: Encode | None = None,
        max_queue_ms: float | None = None,
        aencode: AsyncEncode | None = None,
        aencode_background: AsyncEncode | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._encode = encode
        self._encode_background = encode_background or encode
        # With these, batches are awaited instead of run on the worker's threads.
        self._aencode = aencode
        self._aencode_background = aencode_background or aencode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.threads = threads
        self._on_batch = on_batch
        self.max_queue = None if max_queue_ms is None else max_queue_ms / 1000.0
        self.shed = 0  # texts refused with EncoderBusy
        self._collecting: list[
            tuple[str, asyncio.Future[np.ndarray]]
        ] = []  # the next batch, filling
        # Encoder seconds per text in a batch of two or more: a queue is encoded in batches,
        # where a text costs a fraction of a lone one. A lone text's cost stands in until a
        # batch is measured; None before the first pass.
        self._cost_per_text: float | None = None
        self._in_batch = 0  # texts in the batch being encoded
        self._batch_measured = False  # _cost_per_text has come from a batch of two or more
        self._first_arrival = 0.0
        self._last_batch = 0
        self._capacity = remembered
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._pending: dict[str, _Pass] = {}  # queued or being encoded, by text
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        # one thread, at the lowest priority: background encodes run one at a time, and yield
        # the CPU to users' encodes
        self._background: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="embed")
        self._background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="embed-background", initializer=lowest_priority
        )
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
        executor, background = self._executor, self._background
        self._executor = self._background = None
        if background is not None:
            # background texts still waiting are refused (WorkerClosed), not encoded at shutdown
            background.shutdown(wait=False, cancel_futures=True)
        for pool in (executor, background):
            if pool is not None:
                # a batch may still be encoding: wait for the thread without blocking the loop
                await asyncio.to_thread(pool.shutdown, wait=True)

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
        """The text's embedding (one row of ``encode``'s output; do not modify it)."""
        if self._queue is None:
            raise WorkerClosed("embedding worker is not running")
        vector = self._recent.get(text)
        if vector is not None:
            self._recent.move_to_end(text)
            return vector
        queued = self._pending.get(text)
        if queued is None:
            if self.max_queue is not None:
                wait = self.expected_wait_s()
                if wait > self.max_queue:
                    self.shed += 1
                    raise EncoderBusy(wait)
            queued = self._enqueue(text)
        queued.waiters += 1
        try:
            # (shielded: one caller's timeout or exit must not cancel the pass for the others)
            return await asyncio.wait_for(asyncio.shield(queued.future), self.max_queue)
        except TimeoutError:  # (never without max_queue: wait_for(..., None) just waits)
            self.shed += 1
            raise EncoderBusy(self.max_queue or 0.0) from None
        except asyncio.CancelledError:
            if queued.waiters == 1:  # nobody else wants it: the batch skips it
                queued.future.cancel()
            raise
        finally:
            queued.waiters -= 1

    def _enqueue(self, text: str) -> _Pass:
        assert self._queue is not None
        queued = _Pass(asyncio.get_running_loop().create_future())
        self._pending[text] = queued
        queued.future.add_done_callback(partial(self._forget, text))
        self._queue.put_nowait((text, queued.future))
        return queued

    def _forget(self, text: str, future: asyncio.Future[np.ndarray]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a failure nobody still waits for is not "unhandled"
        queued = self._pending.get(text)
        if queued is not None and queued.future is future:
            del self._pending[text]

    @property
    def cost_per_text_s(self) -> float | None:
        """Recent encoder seconds per text in a batch of two or more (a lone text's before one;
        None before the first pass)."""
        return self._cost_per_text

    def expected_wait_s(self) -> float:
        """How long a text queued now would wait for its vector: the texts ahead of it (queued
        and being encoded) and itself, at the recent cost of a text in a batch; 0 with nothing
        ahead (such a text is never refused)."""
        queued = self._queue.qsize() if self._queue is not None else 0
        ahead = self._in_batch + len(self._collecting) + queued
        if ahead == 0 or self._cost_per_text is None:
            return 0.0
        return (ahead + 1) * self._cost_per_text

    async def embed_background(self, text: str) -> np.ndarray:
        """The text's embedding, encoded outside the batching queue on the worker's background
        thread (lowest priority, one text at a time); for background work. A text still queued
        by ``embed`` is taken from that pass."""
        background = self._background
        if self._queue is None or background is None:
            raise WorkerClosed("embedding worker is not running")
        vector = self._recent.get(text)
        if vector is not None:
            return vector
        queued = self._pending.get(text)
        if queued is not None:  # a user's request gave up on it: its pass is still to come
            queued.waiters += 1
            try:
                return await asyncio.shield(queued.future)
            finally:
                queued.waiters -= 1
        if self._aencode_background is not None:
            vectors = await self._aencode_background([text])
        else:
            try:
                job = background.submit(self._encode_background, [text])
            except RuntimeError as exc:  # the executor has shut down
                raise WorkerClosed("embedding worker stopped") from exc
            try:
                vectors = await asyncio.wrap_future(job)
            except asyncio.CancelledError:
                if job.cancelled() and not cancelling():  # stop() refused it, not our caller
                    raise WorkerClosed("embedding worker stopped") from None
                raise
        if len(vectors) != 1:
            raise ValueError(f"encode returned {len(vectors)} rows for 1 text")
        row: np.ndarray = np.asarray(vectors)[0].copy()  # not a view pinning its batch
        self._remember({text: row})
        return row

    async def _collect(
        self, queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]]
    ) -> list[tuple[str, asyncio.Future[np.ndarray]]]:
        # (kept on the worker while it fills: texts taken off the queue for the next batch are
        # still ahead of a new arrival, and a fast burst arrives within the wait)
        batch = self._collecting = [await queue.get()]
        self._first_arrival = time.perf_counter()
        wait = self.max_wait if self._last_batch > 1 else 0.0
        deadline = asyncio.get_running_loop().time() + wait
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
            collected = await self._collect(queue)
            self._collecting = []  # (counted in _in_batch from here on, with no await between)
            batch = [(t, f) for t, f in collected if not f.cancelled()]
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
        self._last_batch = self._in_batch = len(unique)
        started = time.perf_counter()
        waited = started - self._first_arrival
        try:
            vectors = await self._encode_split(unique)
        except Exception as exc:
            log.warning("embeddings.batch_failed", exc_info=True)
            _fail(batch, exc)
            return
        finally:
            self._in_batch = 0
        elapsed = time.perf_counter() - started
        if len(unique) > 1 or not self._batch_measured:
            # A lone text's cost (several times a batched text's) stands in until a batch is
            # measured: the first burst is then shed early rather than queued without bound.
            cost = elapsed / len(unique)
            previous = self._cost_per_text
            first_batch = len(unique) > 1 and not self._batch_measured
            self._batch_measured |= len(unique) > 1
            self._cost_per_text = (
                cost
                if previous is None or first_batch
                else previous + _COST_WEIGHT * (cost - previous)
            )
        rows = {text: vectors[i] for i, text in enumerate(unique)}
        self._remember(rows)
        for text, future in batch:
            if not future.done():
                future.set_result(rows[text])
        if self._on_batch is not None:
            try:
                self._on_batch(len(unique), elapsed, waited)
            except Exception:
                log.warning("embeddings.on_batch_failed", exc_info=True)

    async def _encode_split(self, texts: list[str]) -> np.ndarray:
        """``encode(texts)``, split across the worker's threads when the batch is large."""
        loop = asyncio.get_running_loop()
        parts = split_by_length(texts, min(self.threads, len(texts) // MIN_PART))
        aencode = self._aencode
        results = await asyncio.gather(
            *(
                aencode(part)
                if aencode is not None
                else loop.run_in_executor(self._executor, self._encode, part)
                for part in parts
            )
        )
        for part, vectors in zip(parts, results, strict=True):
            if len(vectors) != len(part):
                raise ValueError(f"encode returned {len(vectors)} rows for {len(part)} texts")
        if len(parts) == 1:
            return np.asarray(results[0])
        rows = {text: vectors[i] for part, vectors in zip(parts, results, strict=True)
                for i, text in enumerate(part)}  # fmt: skip
        return np.stack([rows[text] for text in texts])

    def _remember(self, rows: dict[str, np.ndarray]) -> None:
        if self._capacity <= 0:
            return
        for text, vector in rows.items():
            self._recent[text] = vector.copy()  # not a view pinning its whole batch
            self._recent.move_to_end(text)
        while len(self._recent) > self._capacity:
            self._recent.popitem(last=False)


def lowest_priority() -> None:
    """The calling thread at the lowest CPU priority the OS allows: Linux's idle class (it runs
    when a core has nothing else to run), and nice 19 where that class is refused; Linux sets
    both per thread. Measured at c=1 (an audit's answers encoded beside the next request's
    text): that text took 7.1 ms at normal priority, 5.8 at nice 19, 4.5 in the idle class
    (3.3-3.9 ms with no audit beside it; one run each: a copy timing every encode, over the c=1
    paraphrase lookups, 2026-11-29). The cost: a thread of this class preempted while it holds
    the GIL keeps it until a core is free, which stalls the event loop while the encoder threads
    run GIL-free stacks (tens of ms at worst, measured with a busy core); and threads it starts
    inherit its class (the tokenizer's pool: the proxy encodes a text at start-up, on a normal
    thread, before any background text), and under sustained load its work may wait long
    (audits bound their wait: proxy/shadow/audit.py)."""
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def split_by_length(texts: list[str], parts: int) -> list[list[str]]:
    """Texts dealt into ``parts`` lists (at least one) of similar total length, order kept within.

    Longest first, each to the lightest part so far: the parts finish at about the same time.
    """
    if parts <= 1:
        return [texts]
    loads = [0] * parts
    owner = [0] * len(texts)
    for i in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        lightest = loads.index(min(loads))
        owner[i] = lightest
        loads[lightest] += len(texts[i]) + 8  # + per-text overhead (special tokens, pooling)
    return [[t for t, o in zip(texts, owner, strict=True) if o == p] for p in range(parts)]


def _fail(batch: list[tuple[str, asyncio.Future[np.ndarray]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
