"""diskcache store: operations, expiry, and surviving a crash mid-write."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.cache import store as store_module
from proxy.cache.disk_writer import stored_ids, write_batch
from proxy.cache.entry import CacheEntry, EntryMeta
from proxy.cache.store import CacheStore, DiskStore, followable


def entry(
    n: int, *, ttl: float = 3600.0, engine: str = "e", created: float | None = None
) -> CacheEntry:
    meta = EntryMeta(
        key=f"{n:064x}",
        context="ctx",
        endpoint="chat",
        engine=engine,
        version="v",
        partition="p",
        scope="global",
        created_at=time.time() if created is None else created,
        ttl=ttl,
        compute_seconds=1.0,
        query_text=f"question {n}",
    )
    return CacheEntry(meta, b'{"n": %d}' % n, np.full(8, n % 100, dtype=np.float32))


def keys_on_disk(store: DiskStore) -> list[str]:
    """The cache keys of the rows in the store's diskcache, oldest first."""
    return [key for key, _ in stored_ids(store._cache)]


def on_disk(store: DiskStore, key: str) -> Any:
    """What the store's diskcache holds for cache key ``key`` (None: nothing)."""
    ids = dict(stored_ids(store._cache))
    return store._cache.get(ids[key]) if key in ids else None


def evict(store: DiskStore, key: str) -> None:
    """Delete ``key``'s row as diskcache's own eviction (size limit) does: behind the store."""
    store._cache.delete(dict(stored_ids(store._cache))[key])


def put_raw(store: DiskStore, key: str, blob: bytes) -> None:
    """Write ``blob`` under ``key`` as the store writes an entry (a corrupt or foreign one)."""
    id_, replaced = store._new_id(key)
    write_batch(store._cache, [(id_, key, blob, time.time() + 3600, replaced)])


async def test_disk_store_operations(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    as_protocol: CacheStore = store  # (a type check, for mypy)
    assert followable(as_protocol) is None  # not a shared one
    for n in range(5):
        await store.put(entry(n, engine="a" if n < 3 else "b"))
    got = await store.get(entry(1).meta.key)
    assert got is not None and got.response == b'{"n": 1}' and got.meta.query_text == "question 1"
    assert got.embedding is not None and got.embedding[0] == 1.0
    assert await store.get("f" * 64) is None
    many = await store.get_many([entry(0).meta.key, "f" * 64, entry(4).meta.key])
    assert set(many) == {entry(0).meta.key, entry(4).meta.key}
    assert await store.count() == 5
    assert sorted(e.meta.key for e in [e async for e in store.scan()]) == sorted(
        entry(n).meta.key for n in range(5)
    )
    deleted = await store.delete_where(lambda m: m.engine == "a")
    assert sorted(m.key for m in deleted) == sorted(entry(n).meta.key for n in range(3))
    assert await store.delete([entry(3).meta.key, "f" * 64]) == 1
    assert await store.count() == 1
    await store.close()
    reopened = DiskStore(tmp_path)
    assert (await reopened.get(entry(4).meta.key)) is not None
    await reopened.close()


async def test_entries_expire_with_their_ttl(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1, ttl=0.05))
    await store.put(entry(2, ttl=3600))
    await asyncio.sleep(0.1)
    assert await store.get(entry(1).meta.key) is None
    assert await store.get(entry(2).meta.key) is not None
    await store.close()


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.unit.test_cache_store import entry
    from proxy.cache.store import DiskStore
    store = DiskStore(Path({folder!r}))
    progress = Path({progress!r})
    n = 0
    while True:
        store.put_sync(entry(n))
        n += 1
        if n % 50 == 0:
            progress.write_text(str(n))
    """
)


def _written(progress: Path) -> int:
    text = progress.read_text() if progress.exists() else ""
    return int(text) if text.strip() else 0


ROOT = str(Path(__file__).resolve().parents[2])  # the checkout, for the scripts' import path


def kill_when(script: str, done: Callable[[], bool]) -> None:
    """Run ``script`` in a child Python until ``done()``, then kill it with SIGKILL: a crash at
    an arbitrary point of its writes."""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not done():
            assert child.poll() is None, "the writing script died"
            assert time.monotonic() < deadline, "the writing script is too slow"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_survives_a_crash_mid_write(tmp_path: Path) -> None:
    folder, progress = tmp_path / "cache", tmp_path / "progress"
    script = WRITER.format(root=ROOT, folder=str(folder), progress=str(progress))
    kill_when(script, lambda: _written(progress) >= 300)
    written = _written(progress)
    store = DiskStore(folder)
    assert entries_intact(store) >= written
    store.put_sync(entry(10**6))  # and the store still takes writes
    assert store.get_sync(entry(10**6).meta.key) is not None
    store.close_sync()


def entries_intact(store: DiskStore) -> int:
    """How many entries a store holds, each checked whole: no torn entry after a crash."""
    keys = keys_on_disk(store)
    for key in keys:
        found = store.get_sync(key)
        assert found is not None, "a torn entry after the crash"
        assert found.response == b'{"n": %d}' % int(key, 16)
    return len(keys)


def big_entry(n: int, *, size: int, engine: str = "e", question: str | None = None) -> CacheEntry:
    small = entry(n, engine=engine)
    meta = dataclasses.replace(small.meta, query_text=question or small.meta.query_text)
    return CacheEntry(meta, b'{"n": %d, "pad": "%s"}' % (n, b"x" * size), small.embedding)


async def test_delete_where_reads_the_store_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SWEEP_BATCH", 3)
    store = DiskStore(tmp_path)
    for n in range(20):
        await store.put(entry(n, engine="a" if n % 2 else "b"))
    await store.flush()
    batches: list[int] = []  # how many entries the predicate had seen when each batch started
    seen: list[str] = []
    sweep = store._sweep

    def counted(after: int, predicate: Callable[[EntryMeta], bool], *rest: Any) -> Any:
        batches.append(len(seen))
        return sweep(after, predicate, *rest)

    monkeypatch.setattr(store, "_sweep", counted)

    def matches(meta: EntryMeta) -> bool:
        seen.append(meta.key)
        return meta.engine == "a"

    deleted = await store.delete_where(matches)
    assert sorted(m.key for m in deleted) == sorted(entry(n).meta.key for n in range(1, 20, 2))
    assert sorted(seen) == sorted(entry(n).meta.key for n in range(20))  # each once
    # 7 batches of at most 3 (and one that found the end), each decided before the next read
    assert batches == [0, 3, 6, 9, 12, 15, 18, 20]
    assert await store.count() == 10
    for n in range(20):
        assert (await store.get(entry(n).meta.key) is None) == (n % 2 == 1)
    await store.close()


async def test_delete_where_holds_a_batch_of_headers_not_the_store(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for n in range(300):  # ~6 MB of answers, each stored inline (under diskcache's file size)
        await store.put(big_entry(n, size=20_000, engine="a" if n % 2 else "b"))
    await store.flush()
    tracemalloc.start()
    try:
        deleted = await store.delete_where(lambda meta: meta.engine == "a")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(deleted) == 150 and await store.count() == 150
    assert peak < 2_000_000, f"{peak} bytes traced while sweeping a 6 MB store"
    await store.close()


async def test_delete_where_reads_long_headers_files_and_corrupt_entries(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    long_question = "why " * 2000  # its header is longer than the bytes first read
    await store.put(big_entry(1, size=10, question=long_question))
    await store.put(big_entry(2, size=100_000))  # stored in a file of its own
    await store.put(big_entry(3, size=100_000, engine="keep"))
    await store.put(entry(4, engine="keep"))
    await store.put(entry(5, ttl=0.01))  # expired by the sweep: not shown to the predicate
    await store.flush()
    put_raw(store, "f" * 64, b"not an entry")  # a corrupt one: deleted, not returned
    files = _value_files(tmp_path)
    assert len(files) == 2
    await asyncio.sleep(0.05)
    seen: list[str] = []

    def matches(meta: EntryMeta) -> bool:
        seen.append(meta.key)
        return meta.engine != "keep"

    deleted = await store.delete_where(matches)
    assert sorted(m.key for m in deleted) == [entry(1).meta.key, entry(2).meta.key]
    assert next(m for m in deleted if m.key == entry(1).meta.key).query_text == long_question
    assert entry(5).meta.key not in seen
    assert on_disk(store, "f" * 64) is None
    left = _value_files(tmp_path)  # the deleted entry's file is gone, the kept one's is not
    assert len(left) == 1 and left < files
    kept = await store.get(entry(3).meta.key)
    assert kept is not None and kept.response.startswith(b'{"n": 3')
    assert await store.get(entry(4).meta.key) is not None
    assert await store.get(entry(1).meta.key) is None and await store.get(entry(2).meta.key) is None
    await store.close()


def _value_files(folder: Path) -> set[Path]:
    """The files diskcache keeps large values in."""
    return set(folder.rglob("*.val"))


async def test_a_key_whose_hash_names_another_keys_id_is_neither_read_nor_deleted(
    tmp_path: Path,
) -> None:
    """The index is by ``hash(key)``: two keys may share one. The id found must hold the key
    asked for, else the lookup is a miss and a delete deletes nothing."""
    store = DiskStore(tmp_path, recent_bytes=0)
    await store.put(entry(1))
    await store.flush()
    other = entry(2).meta.key
    store._index[hash(other)] = store._index[hash(entry(1).meta.key)]  # a forged collision
    assert await store.get(other) is None
    assert await store.delete([other]) == 0
    assert await store.get(entry(1).meta.key) is not None
    await store.close()
