"""The disk store under an operator's faults: a corrupt or truncated database at start-up, a
disk that fills (or a folder that stops taking writes) and empties again, a second proxy on the
same folder."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.cache import disk_writer
from proxy.cache.disk_writer import ACK, FAILED, OK, frame, serve
from proxy.cache.store import LOCK_FILE, DirectoryLock, DiskStore, StoreInUse
from tests.unit.test_cache_store import big_entry, entry, keys_on_disk, put_raw


def _filled(folder: Path, n: int = 300) -> Path:
    """A store of ``n`` entries (some in value files), closed; returns its database file."""
    store = DiskStore(folder)
    for i in range(n):
        store.put_sync(big_entry(i, size=40_000) if i % 50 == 0 else entry(i))
    store.close_sync()
    return folder / "cache.db"


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


def _truncated(db: Path) -> None:
    with db.open("r+b") as file:
        file.truncate(db.stat().st_size // 3)


def _scribbled(db: Path) -> None:
    with db.open("r+b") as file:
        file.seek(8 * 4096)
        file.write(os.urandom(16 * 4096))


@pytest.mark.parametrize("damage", [_garbage, _truncated, _scribbled])
async def test_a_damaged_database_is_set_aside_and_the_store_starts_empty(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    db = _filled(folder)
    assert callable(damage)
    damage(db)
    with caplog.at_level(logging.ERROR, logger="proxy.cache.store"):
        store = DiskStore(folder)
    quarantined = [r for r in caplog.records if r.getMessage() == "cache.disk.corrupt_store"]
    assert len(quarantined) == 1
    record = quarantined[0]
    assert record.__dict__["file"] == str(db)
    moved = Path(record.__dict__["moved_to"])
    assert moved.parent == folder and (moved / "cache.db").exists()  # kept for a post-mortem
    assert await store.count() == 0
    await store.put(entry(1))  # and it takes writes
    await store.flush()
    assert await store.get(entry(1).meta.key) is not None
    await store.close()
    reopened = DiskStore(folder)  # the fresh store is sound: no second quarantine
    assert await reopened.count() == 1
    await reopened.close()
    assert len([p for p in folder.iterdir() if p.is_dir() and p.name.startswith("corrupt-")]) == 1


class _Disk:
    """``write_batch`` on a disk that is full until ``free()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = True
        real = disk_writer.write_batch

        def write(cache: Any, items: Any, **kwargs: Any) -> None:
            if self.full:
                raise OSError(28, "database or disk is full")
            real(cache, items, **kwargs)

        monkeypatch.setattr(disk_writer, "write_batch", write)

    def free(self) -> None:
        self.full = False


def _named(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    """The records whose message is ``message`` (or starts with it, then a space)."""
    return [r for r in caplog.records if r.getMessage().split(" ", 1)[0] == message]


async def test_a_full_disk_is_logged_once_counted_per_batch_and_its_end_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = _Disk(monkeypatch)
    errors: list[str] = []
    store = DiskStore(tmp_path, batch_size=1, on_error=lambda op, _: errors.append(op))
    with caplog.at_level(logging.INFO, logger="proxy.cache.store"):
        for n in range(5):  # every answer of a busy proxy meets the full disk
            await store.put(entry(n))
            await store.flush()
        assert len(_named(caplog, "cache.disk.write_failed")) == 1  # not one per batch
        assert errors == ["write"] * 5  # but each counted (the metrics' cache errors)
        assert await store.get(entry(0).meta.key) is None  # dropped, not served
        disk.free()
        await store.put(entry(9))
        await store.flush()
    recovered = _named(caplog, "cache.disk.write_recovered")
    assert len(recovered) == 1 and recovered[0].__dict__["dropped"] == 5
    assert await store.get(entry(9).meta.key) is not None
    await store.close()
    assert DiskStore(tmp_path).get_sync(entry(9).meta.key) is not None  # on disk


def test_the_writer_process_logs_a_full_disk_once_and_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = _Disk(monkeypatch)
    later = time.time() + 60
    failing = b"".join(frame([(n, f"k{n}", b"v", later, 0)]) for n in range(1, 5))

    class Source(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() == len(failing):  # the disk has room again for the last batch
                disk.free()
            return super().read(size)

    sink = io.BytesIO()
    with caplog.at_level(logging.INFO, logger="proxy.cache.disk_writer"):
        serve(tmp_path, 2**30, Source(failing + frame([(5, "ok", b"v", later, 0)])), sink)
    acks = [ACK.unpack_from(sink.getvalue(), at) for at in range(0, 5 * ACK.size, ACK.size)]
    assert [status for _, status in acks] == [FAILED] * 4 + [OK]
    assert len(_named(caplog, "cache.disk.writer_batch_failed")) == 1
    assert len(_named(caplog, "cache.disk.writer_recovered")) == 1


def test_a_cache_folder_is_held_by_one_proxy_at_a_time(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    first = DirectoryLock(folder)
    with pytest.raises(StoreInUse) as refused:
        DirectoryLock(folder)  # a second proxy on the same folder
    assert refused.value.directory == folder
    assert f"pid {os.getpid()}" in str(refused.value)
    first.release()
    DirectoryLock(folder).release()  # free again once the first let go


def test_a_quarantine_leaves_the_lock_where_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    db = _filled(folder)
    lock = DirectoryLock(folder)
    _garbage(db)
    DiskStore(folder).close_sync()
    assert (folder / LOCK_FILE).exists()
    with pytest.raises(StoreInUse):
        DirectoryLock(folder)
    lock.release()


async def test_the_membership_filter_forgets_what_the_disk_evicted(tmp_path: Path) -> None:
    """Sustained unique answers into a full store: diskcache evicts the oldest, and the filter
    (one count per key ever put, before) must not grow with every answer of the proxy's life."""
    store = DiskStore(tmp_path, size_limit=256 * 1024, filter_slack=100)
    for n in range(3000):
        await store.put(big_entry(n, size=2000))
        if n % 100 == 99:
            await store.flush()
    await store.flush()
    await store.settled()
    on_disk = keys_on_disk(store)
    assert len(on_disk) < 500  # (the size limit works: most were evicted)
    assert len(store._index) <= 2 * len(on_disk) + 100 + 256
    assert all(store.may_contain(key) for key in on_disk)  # no stored entry becomes a miss
    found = await store.get(big_entry(2999, size=2000).meta.key)
    assert found is not None
    await store.close()


async def test_entries_written_while_the_filter_reloads_stay_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path, linger_s=3600.0)  # written only when flushed
    await store.put(entry(0))
    await store.flush()
    await store.put(entry(1))  # queued when the reload starts, written after it read the disk
    read, gate = threading.Event(), threading.Event()
    real = store._disk_keys

    def slow() -> list[tuple[str, int]]:
        keys = real()
        read.set()
        gate.wait(timeout=60)
        return keys

    monkeypatch.setattr(store, "_disk_keys", slow)
    reload = asyncio.ensure_future(store._reload_filter())
    assert await asyncio.to_thread(read.wait, 60)  # it has read the disk: entry 0 only
    await store.put(entry(2))  # put while it reads
    await store.flush()
    gate.set()
    await reload
    assert all(store.may_contain(entry(n).meta.key) for n in range(3))
    assert all([await store.get(entry(n).meta.key) is not None for n in range(3)])
    await store.close()


async def test_the_semantic_index_forgets_what_the_disk_evicted(tmp_path: Path) -> None:
    """Sustained unique questions into a full store: the index (and its label map) held every
    question ever stored, pruned only when a lookup happened upon an evicted one (before)."""
    from proxy.cache.index import SemanticIndex
    from proxy.cache.service import CacheConfig, ResponseCache
    from tests.unit.test_cache_service import DIM, answer, keys_for

    rng = np.random.default_rng(0)
    store = DiskStore(tmp_path / "c", size_limit=256 * 1024)
    cache = ResponseCache(store, index=SemanticIndex(DIM), config=CacheConfig(index_slack=50))
    await cache.start()
    await cache.ready()
    for n in range(1500):
        vector = rng.standard_normal(DIM).astype(np.float32)
        cache.store_in_background(
            keys_for(f"question {n} " + "x" * 500), answer("y" * 1500), embedding=vector
        )
        if n % 100 == 99:
            await cache.drain()
            await store.flush()
    await cache.drain()
    stored = await store.count()
    assert stored < 500  # (the size limit works: most were evicted)
    assert len(cache.index) <= 2 * stored + 50 + 100
    assert len(cache._labels) == len(cache.index)
    found = cache.index.search(keys_for("question 1499 " + "x" * 500).context, vector, 1)
    assert found and found[0][0] in cache._labels  # the newest is still found
    await cache.aclose()


async def test_an_entry_of_another_format_is_a_miss_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store written by an older or newer proxy (another entry encoding): each such entry is
    a miss, and says so once, not on every request that asks for it."""
    key = entry(1).meta.key
    first = DiskStore(tmp_path)
    put_raw(first, key, b"FCE9" + os.urandom(64))  # a format this proxy does not read
    first.close_sync()
    store = DiskStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="proxy.cache.store"):
        for _ in range(5):
            assert await store.get(key) is None
    assert len(_named(caplog, "cache.disk.corrupt_entry")) == 1
    await store.put(entry(1))  # an answer stored again replaces it
    await store.flush()
    assert await store.get(key) is not None
    await store.close()
