"""The encoder in a child process, so that its Python never holds the proxy's interpreter lock.

On a thread of the proxy, the encoder's Python (the tokenizer, the code between torch's
operators) holds the GIL in slices the event loop waits out, and on cores busy with CPU engines
a thread preempted while holding it stalls the loop until the OS runs it again. Beside a vLLM CPU
engine, with the float32 encoder, the proxy's own time per request reached 500 ms at p99 with
the encoder on its threads, and 31 ms with it here (docs/benchmarks.md, 2026-11-30 15:53); the
median got worse (6.3 ms against 3.6 on threads): the child takes a core from the proxy while it
encodes.

The child (``python -m proxy.embeddings.process SPEC``) builds one encoder with the factory SPEC
names (a function of this module, or ``module:function``) and encodes the batches sent over its
stdin on ``threads`` threads, so the parts of a batch the embedding worker splits run side by
side, answering on its stdout; background texts (cache audits) go to one more thread at the
lowest CPU priority. One process, not one per thread: each holds its own copy of torch and the
warmed-up encoder (300-560 MB by precision; ~160 MB more in all than the encoder on the proxy's
threads).

:class:`EncoderProcess` is the parent's side, driven from the event loop with no thread of its
own: the proxy writes a batch to the pipe and the loop reads the answer when it comes, so no
thread of the proxy takes the GIL for the encoder at all (a thread that holds it when the OS
preempts it, on cores busy with engines, stalls the loop until it runs again).
``encode_blocking`` serves the verifier's and the cache import's threads. A child that exits
fails the calls it had with :class:`EncoderLost` (the request goes on without an embedding, as
when the encoder is busy), and the next call starts a new one.

Frames both ways: ``<I`` (payload bytes), then a pickle (parent and child are the same program).
Parent to child: ``(id, texts, use_helper, background)``. Child to parent: ``("ready", info)``
once the encoder is built and warmed up (or ``("error", why)``), then for each call, in the
order they finish, ``(id, "ok", (base, verifier, shallow, whole))`` or ``(id, "error", why)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import os
import pickle
import signal
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from proxy.cache.verifier import EncodedBatch
from proxy.embeddings.worker import EncoderUnavailable, lowest_priority

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
# How long a child may take to build and warm up its encoder (a loaded 2-core host: ~20 s).
START_TIMEOUT_S = 300.0


class BatchEncoder(Protocol):
    def encode(self, texts: Sequence[str], *, use_helper: bool = True) -> EncodedBatch: ...


class EncoderLost(EncoderUnavailable):
    """The encoder process exited (or could not start) before it answered."""


class EncoderFailed(EncoderUnavailable):
    """The encoder process raised while encoding a batch (it keeps running)."""


# --- factories, run in the child ------------------------------------------------------------


def fused(*, precision: str, split_single: bool, split_idle_s: float | None) -> BatchEncoder:
    """MiniLM with the verifier's tuned top layers, one pass for both (the semantic cache)."""
    from proxy.cache.packed_encoder import PackedEncoder
    from proxy.cache.verifier import Verifier

    encoder = PackedEncoder(
        Verifier.load().encoder,
        precision=precision,  # type: ignore[arg-type]
        split_single=split_single,
        split_idle_s=split_idle_s,
    )
    encoder.warm_up()
    return encoder


def base(*, precision: str) -> BatchEncoder:
    """MiniLM alone, with its shallow view (a router head that reads it; no semantic cache)."""
    from proxy.cache.packed_encoder import PackedEncoder
    from proxy.cache.verifier import MiniLMEncoder

    encoder = PackedEncoder(MiniLMEncoder.load(), precision=precision)  # type: ignore[arg-type]
    encoder.warm_up()
    return encoder


# --- framing ----------------------------------------------------------------------------------


def frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def send(stream: IO[bytes], message: object) -> None:
    stream.write(frame(message))
    stream.flush()


async def areceive(stream: asyncio.StreamReader) -> Any:
    """:func:`receive` from the event loop."""
    try:
        header = await stream.readexactly(_LENGTH.size)
        (size,) = _LENGTH.unpack(header)
        payload = await stream.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    return pickle.loads(payload)


def receive(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the stream (the other side is gone). ``stream``
    is buffered (the child's stdin): a read returns all it asks for unless the stream ends."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    payload = stream.read(size)
    return pickle.loads(payload) if len(payload) == size else None


# --- the parent's side ------------------------------------------------------------------------


@dataclass
class _Child:
    process: asyncio.subprocess.Process
    waiting: dict[int, asyncio.Future[EncodedBatch]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class EncoderProcess:
    """One child process running one encoder, driven from the event loop: calls made at the same
    time run at the same time in the child (up to its ``threads``)."""

    def __init__(
        self, factory: str, options: Mapping[str, Any], *, threads: int = 1, name: str = "encoder"
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._spec = json.dumps({"factory": factory, "options": dict(options), "threads": threads})
        self.name = name
        self._child: _Child | None = None
        self._starting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._closed = False
        self.starts = 0  # children started (more than one: one was lost)

    @property
    def pid(self) -> int | None:
        child = self._child
        return None if child is None else child.process.pid

    async def start(self) -> None:
        """Start the child and wait until its encoder is ready (seconds)."""
        await self._running()

    async def _running(self) -> _Child:
        if self._starting is None:
            self._loop, self._starting = asyncio.get_running_loop(), asyncio.Lock()
        async with self._starting:
            child = self._child
            if child is None or child.process.returncode is not None:
                child = self._child = await self._start()
            return child

    async def _start(self) -> _Child:
        if self._closed:
            raise EncoderLost(f"{self.name}: closed")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.embeddings.process",
            self._spec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            # Bounded: a child stuck loading must not hold the proxy's start-up for ever.
            reply = await asyncio.wait_for(areceive(process.stdout), START_TIMEOUT_S)
        except TimeoutError:
            reply = None
        if reply is None or reply[0] != "ready":
            code = await _end(process)
            why = reply[1] if reply is not None else f"exited with code {code}"
            raise EncoderLost(f"{self.name} did not start: {why}")
        self.starts += 1
        if self.starts > 1:
            log.warning("embeddings.process_restarted", extra={"encoder": self.name})
        child = _Child(process)
        child.reader = asyncio.create_task(self._read(child), name=f"{self.name}-replies")
        return child

    async def _read(self, child: _Child) -> None:
        """Hand each answer to the call waiting for it; when the child is gone, fail the rest."""
        assert child.process.stdout is not None
        while (reply := await areceive(child.process.stdout)) is not None:
            ident, status, payload = reply
            future = child.waiting.get(ident)
            if future is None or future.done():
                continue  # (its caller left)
            if status == "ok":
                future.set_result(EncodedBatch(*payload))
            else:
                future.set_exception(EncoderFailed(f"{self.name}: {payload}"))
        code = await _end(child.process)
        if self._child is child:
            self._child = None
        if child.waiting and not self._closed:
            log.warning("embeddings.process_lost", extra={"encoder": self.name, "code": code})
        for future in child.waiting.values():
            if not future.done():
                future.set_exception(
                    EncoderLost(f"{self.name} exited (code {code}) while encoding")
                )

    async def encode(
        self, texts: Sequence[str], *, use_helper: bool = True, background: bool = False
    ) -> EncodedBatch:
        """``background``: on the child's thread at the lowest CPU priority, one at a time."""
        child = await self._running()  # (the first call after one was lost: seconds)
        stdin = child.process.stdin
        assert stdin is not None
        ident = next(self._ids)
        future: asyncio.Future[EncodedBatch] = asyncio.get_running_loop().create_future()
        child.waiting[ident] = future
        try:
            stdin.write(frame((ident, list(texts), use_helper, background)))
            await stdin.drain()
            return await future
        except ConnectionError:  # (a broken pipe: the child is gone)
            raise EncoderLost(f"{self.name} exited while encoding") from None
        finally:
            del child.waiting[ident]

    def encode_blocking(
        self, texts: Sequence[str], *, use_helper: bool = True, background: bool = False
    ) -> EncodedBatch:
        """:meth:`encode` for a thread other than the event loop's (the verifier's, imports')."""
        loop = self._loop
        if loop is None:
            raise EncoderLost(f"{self.name}: not started")
        call = self.encode(texts, use_helper=use_helper, background=background)
        return asyncio.run_coroutine_threadsafe(call, loop).result()

    async def close(self) -> None:
        """End the child: it exits when its stdin closes (killed if it does not, in 5 s)."""
        self._closed = True
        child, self._child = self._child, None
        if child is not None:
            await _end(child.process)
            if child.reader is not None:
                await child.reader


async def _end(process: asyncio.subprocess.Process) -> int:
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    try:
        return await asyncio.wait_for(process.wait(), 5.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


class PooledEncoder:
    """The child in a verifier's place of its encoder: the verifier's own passes (vectors of
    texts the cache has not seen encoded, computed on a worker thread) run there too.
    ``tokenizer`` is the model's, loaded in the proxy (the verifier counts word pieces with it)."""

    def __init__(self, process: EncoderProcess, tokenizer: Any) -> None:
        self._process = process
        self.tokenizer = tokenizer

    def encode(
        self, texts: Sequence[str], batch_size: int = 256, *, use_helper: bool = True
    ) -> EncodedBatch:
        return self._process.encode_blocking(texts, use_helper=use_helper)

    def close(self) -> None:
        """Nothing: the process is closed by its owner."""


# --- the child --------------------------------------------------------------------------------


def _build(factory: str, options: Mapping[str, Any]) -> BatchEncoder:
    module_name, _, function = factory.rpartition(":")
    module = importlib.import_module(module_name) if module_name else sys.modules[__name__]
    built: BatchEncoder = getattr(module, function)(**options)
    return built


def serve(spec: Mapping[str, Any], source: IO[bytes], sink: IO[bytes]) -> int:
    try:
        import torch

        # One torch thread per call: calls run side by side on the threads below, and a lone
        # text's helper thread (split_single) is the encoder's own.
        torch.set_num_threads(1)
        encoder = _build(spec["factory"], spec.get("options", {}))
    except Exception as exc:  # reported to the parent, which says why the child did not start
        send(sink, ("error", f"{type(exc).__name__}: {exc}"))
        return 1
    writing = threading.Lock()

    def answer(ident: int, texts: list[str], use_helper: bool) -> None:
        try:
            batch = encoder.encode(texts, use_helper=use_helper)
            reply: tuple[int, str, object] = (
                ident,
                "ok",
                (batch.base, batch.verifier, batch.shallow, batch.whole),
            )
        except Exception as exc:
            reply = (ident, "error", f"{type(exc).__name__}: {exc}")
        with writing:
            send(sink, reply)

    users = ThreadPoolExecutor(int(spec.get("threads", 1)), thread_name_prefix="encode")
    # Background texts (cache audits) one at a time at the lowest priority, and without the
    # encoder's helper thread: a user's text encoded meanwhile keeps the cores.
    background = ThreadPoolExecutor(
        1, thread_name_prefix="encode-background", initializer=lowest_priority
    )
    send(sink, ("ready", {"pid": os.getpid()}))
    while (request := receive(source)) is not None:
        ident, texts, use_helper, in_background = request
        if in_background:
            background.submit(answer, ident, texts, False)
        else:
            users.submit(answer, ident, texts, use_helper)
    for pool in (users, background):
        pool.shutdown(wait=True)
    return 0


def main(argv: list[str]) -> int:
    # The parent ends a child by closing its stdin; Ctrl-C in a terminal reaches the whole
    # process group, and the parent's shutdown, not the signal, should end the child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sink = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt a frame
    return serve(json.loads(argv[0]), sys.stdin.buffer, sink)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
