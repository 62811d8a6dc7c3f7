"""The disk store's writer process: the pipe framing, the child's loop, a store that writes
through it, a writer that dies (the store carries on with a thread), and a proxy that dies (the
writer commits what it has, exits, and leaves no torn entry)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diskcache
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import server
from proxy.cache import disk_writer
from proxy.cache.disk_writer import (
    ACK,
    FAILED,
    OK,
    ProcessWriter,
    Queued,
    Row,
    ThreadWriter,
    frame,
    prepare,
    serve,
    stored_ids,
    unframe,
)
from proxy.cache.store import DiskStore
from tests.unit.test_cache_store import ROOT, entries_intact, entry, kill_when

_items = st.lists(
    st.tuples(
        st.integers(1, 2**63 - 1),
        st.text(max_size=80),
        st.binary(max_size=300),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(0, 2**63 - 1),
    ),
    max_size=20,
)


def queued(n: int) -> Queued:
    """Entry ``n`` as the store queues it, under id ``n``, replacing nothing."""
    return (entry(n), time.time() + 60, n, 0)


def keys_in(folder: Path) -> set[str]:
    """The cache keys a store's folder holds (through another handle: what is committed)."""
    with diskcache.Cache(str(folder)) as cache:
        return {key for key, _ in stored_ids(cache)}


@given(items=_items)
def test_a_frame_reads_back_as_the_batch_it_was_made_from(items: list[Row]) -> None:
    framed = frame(items)
    size, count = disk_writer.BATCH.unpack_from(framed)
    assert size == len(framed) - disk_writer.BATCH.size and count == len(items)
    assert unframe(framed[disk_writer.BATCH.size :], count) == items


def test_a_frame_with_bytes_left_over_is_refused() -> None:
    framed = frame([(1, "k", b"v", 1.0, 0)])
    with pytest.raises(ValueError, match="holds"):
        unframe(framed[disk_writer.BATCH.size :] + b"x", 1)


def test_the_child_commits_each_batch_and_acknowledges_it(tmp_path: Path) -> None:
    later = time.time() + 3600
    first = [(1, "a", b"1", later, 0), (2, "b", b"2", later, 0)]
    second = [(3, "c", b"3", later, 0)]
    source, sink = io.BytesIO(frame(first) + frame(second)), io.BytesIO()
    assert serve(tmp_path, 2**30, source, sink) == 0
    acks = sink.getvalue()
    assert [ACK.unpack_from(acks, at) for at in (0, ACK.size)] == [(2, OK), (1, OK)]
    with diskcache.Cache(str(tmp_path)) as cache:
        assert [(key, cache.get(id_)) for key, id_ in stored_ids(cache)] == [
            ("a", b"1"),
            ("b", b"2"),
            ("c", b"3"),
        ]


def test_the_child_reports_a_batch_it_could_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(cache: object, items: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(disk_writer, "write_batch", broken)
    sink = io.BytesIO()
    serve(tmp_path, 2**30, io.BytesIO(frame([(1, "a", b"1", time.time() + 60, 0)])), sink)
    assert ACK.unpack(sink.getvalue()) == (1, FAILED)


def test_input_that_ends_inside_a_batch_is_an_error(tmp_path: Path) -> None:
    framed = frame([(1, "a", b"1", time.time() + 60, 0)])
    with pytest.raises(EOFError):
        serve(tmp_path, 2**30, io.BytesIO(framed[:-3]), io.BytesIO())


def _child(store: DiskStore) -> asyncio.subprocess.Process:
    writer = store._batches
    assert isinstance(writer, ProcessWriter) and writer._process is not None
    return writer._process


async def _store_whose_writer_died(tmp_path: Path) -> tuple[DiskStore, asyncio.subprocess.Process]:
    """A process-writer store holding entry 1, its writer child killed and reaped."""
    store = DiskStore(tmp_path, writer="process")
    await store.put(entry(1))
    await store.flush()
    child = _child(store)
    child.kill()
    await child.wait()
    return store, child


async def test_a_store_writes_through_its_writer_process(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, writer="process", batch_size=16)
    for n in range(50):
        await store.put(entry(n))
    await store.flush()
    child = _child(store)
    assert child.returncode is None and child.pid != os.getpid()
    with diskcache.Cache(str(tmp_path)) as other:  # committed, seen by another handle
        assert len(other) == 50
    found = await store.get(entry(7).meta.key)
    assert found is not None and found.response == b'{"n": 7}'
    await store.close()
    assert child.returncode == 0  # it left when the store closed its pipe
    reopened = DiskStore(tmp_path)
    assert await reopened.count() == 50
    await reopened.close()


async def test_the_writer_process_can_start_before_the_first_answer(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, writer="process")
    await store.start_writer()
    child = _child(store)  # running, and it has answered an empty batch
    assert child.returncode is None
    await store.put(entry(1))
    await store.flush()
    assert _child(store) is child  # the first answer went to the same child
    assert await store.count() == 1
    await store.close()
    assert child.returncode == 0


async def test_a_writer_process_that_cannot_start_leaves_the_store_writing_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_child(*args: object, **kwargs: object) -> None:
        raise OSError("no such interpreter")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_child)
    store = DiskStore(tmp_path, writer="process")
    await store.start_writer()  # logged, not raised
    await store.put(entry(1))
    await store.flush()
    assert await store.count() == 1
    await store.close()


async def test_a_dead_writer_process_leaves_the_store_writing_on_a_thread(
    tmp_path: Path,
) -> None:
    store, _ = await _store_whose_writer_died(tmp_path)
    for n in range(2, 12):  # the batch that meets the dead writer goes to the thread writer too
        await store.put(entry(n))
    await store.flush()
    assert all([await store.get(entry(n).meta.key) is not None for n in range(1, 12)])
    await store.put(entry(12))  # and so do later ones
    await store.flush()
    assert await store.count() == 12
    await store.close()
    reopened = DiskStore(tmp_path)  # on disk, not only in this process's queue
    assert await reopened.count() == 12
    assert all([await reopened.get(entry(n).meta.key) is not None for n in range(1, 13)])
    await reopened.close()


async def test_a_write_cancelled_in_flight_does_not_leave_its_answer_for_the_next(
    tmp_path: Path,
) -> None:
    """A cancelled batch's acknowledgement must not be read as the next batch's."""
    writer = ProcessWriter(tmp_path, 2**30, fallback=lambda: pytest.fail("no fallback wanted"))
    await writer.write([queued(1)])  # the child is up
    first = writer._process
    task = asyncio.ensure_future(writer.write([queued(n) for n in (2, 3)]))
    await asyncio.sleep(0)  # the frame is written; its acknowledgement not yet read
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writer._process is None
    await writer.write([queued(4)])  # a new child, its own acknowledgement
    assert writer._process is not None and writer._process is not first
    await writer.close()
    assert {entry(1).meta.key, entry(4).meta.key} <= keys_in(tmp_path)


PROXY = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.unit.test_cache_store import ROOT, entries_intact, entry, kill_when
    from proxy.cache.store import DiskStore

    async def main() -> None:
        store = DiskStore(Path({folder!r}), writer="process", batch_size=8, linger_s=0.005)
        progress = Path({progress!r})
        n = 0
        while True:
            await store.put(entry(n))
            n += 1
            if n % 64 == 0:
                await store.flush()
                child = store._batches._process
                written = progress.with_suffix(".new")
                written.write_text(f"{{n}} {{child.pid}}")
                os.replace(written, progress)  # never read half-written
            await asyncio.sleep(0)

    asyncio.run(main())
    """
)


def test_the_writer_outlives_a_killed_proxy_only_to_commit_and_exit(tmp_path: Path) -> None:
    folder, progress = tmp_path / "cache", tmp_path / "progress"
    script = PROXY.format(root=ROOT, folder=str(folder), progress=str(progress))
    kill_when(script, lambda: _progress(progress)[0] >= 640)
    flushed, writer_pid = _progress(progress)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{writer_pid}").exists() and "Z" not in _state(writer_pid):
        assert time.monotonic() < deadline, "the writer process outlived the proxy"
        time.sleep(0.05)
    store = DiskStore(folder)
    assert entries_intact(store) >= flushed
    store.close_sync()


def _progress(path: Path) -> tuple[int, int]:
    """(entries flushed, the writer's pid) as the proxy script last wrote them; (0, 0) before."""
    fields = path.read_text().split() if path.exists() else []
    return (int(fields[0]), int(fields[1])) if len(fields) == 2 else (0, 0)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _thread_writer(folder: Path) -> Callable[[], ThreadWriter]:
    def make() -> ThreadWriter:
        cache = diskcache.Cache(str(folder))
        prepare(cache)
        return ThreadWriter(cache, ThreadPoolExecutor(max_workers=1))

    return make


async def test_a_killed_writer_process_is_replaced_after_a_while(tmp_path: Path) -> None:
    """(before: the store wrote on a thread for the rest of the proxy's life)"""
    lost: list[BaseException] = []
    writer = ProcessWriter(tmp_path, 2**30, fallback=_thread_writer(tmp_path), on_gone=lost.append)
    await writer.write([queued(1)])
    first = writer._process
    assert first is not None
    first.kill()
    await first.wait()
    writer._retry_s = 0.0  # (so the next batch tries a new child at once)
    await writer.write([queued(2)])  # found gone: written on the thread
    assert len(lost) == 1
    await writer.write([queued(3)])
    second = writer._process
    assert second is not None and second.pid != first.pid and second.returncode is None
    await writer.close()
    assert {entry(n).meta.key for n in (1, 2, 3)} <= keys_in(tmp_path)


async def test_a_writer_process_that_stops_answering_is_killed_not_waited_for(
    tmp_path: Path,
) -> None:
    """A stopped (or wedged) child: without a bound, the flush waited for ever, and with it
    every delete, invalidation and the proxy's shutdown."""
    lost: list[BaseException] = []
    writer = ProcessWriter(
        tmp_path, 2**30, fallback=_thread_writer(tmp_path), on_gone=lost.append, ack_timeout_s=1.0
    )
    await writer.write([queued(1)])
    child = writer._process
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(60):  # (a hang fails the test rather than the run)
            await writer.write([queued(2)])
        assert len(lost) == 1 and isinstance(lost[0], TimeoutError)
        assert await child.wait() == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
    await writer.close()
    assert entry(2).meta.key in keys_in(tmp_path)


def test_a_dead_writer_process_is_noticed_on_the_proxys_own_event_loop(tmp_path: Path) -> None:
    """The proxy runs on uvloop, whose pipe to a dead child raises RuntimeError ("the handler
    is closed"), not the OSError asyncio's raises: every later batch failed and was dropped,
    and the store never fell back to its thread (before)."""

    async def scenario() -> int:
        store, child = await _store_whose_writer_died(tmp_path)
        assert child.stdin is not None
        for _ in range(500):  # (uvloop closes the pipe's handle once it has seen the exit)
            if child.stdin.is_closing():
                break
            await asyncio.sleep(0.01)
        for n in range(2, 12):
            await store.put(entry(n))
            await store.flush()
        await store.close()
        reopened = DiskStore(tmp_path)
        try:
            return await reopened.count()
        finally:
            await reopened.close()

    with asyncio.Runner(loop_factory=server.loop_factory()) as runner:
        assert runner.run(scenario()) == 11
