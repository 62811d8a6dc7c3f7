"""DiskStore's index and write-behind queue: a miss reads no SQLite, a queued put is
visible at once, deletes and shutdowns see every earlier put, and no sequence of operations makes
the store answer differently from a plain dictionary."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.cache import disk_writer
from proxy.cache.disk_writer import stored_ids
from proxy.cache.entry import CacheEntry
from proxy.cache.store import DiskStore, StoreBusy
from tests.unit.test_cache_store import entry, evict, on_disk


def _forbid_reads(store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every SQLite read the store makes (by the cache key of the id read)."""
    reads: list[str] = []
    original = store._cache.get

    def get(id_: int, *args: Any, **kwargs: Any) -> Any:
        reads.append(dict((i, k) for k, i in stored_ids(store._cache))[id_])
        return original(id_, *args, **kwargs)

    monkeypatch.setattr(store._cache, "get", get)
    return reads


async def test_a_miss_reads_nothing_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path, recent_bytes=0)  # nothing remembered: a hit reads the disk
    await store.put(entry(1))
    await store.flush()
    reads = _forbid_reads(store, monkeypatch)
    assert await store.get(entry(2).meta.key) is None
    assert await store.get_many([entry(3).meta.key, entry(4).meta.key]) == {}
    assert reads == []
    found = await store.get(entry(1).meta.key)  # a stored key is read from disk
    assert found is not None and found.response == b'{"n": 1}'
    assert reads == [entry(1).meta.key]
    await store.close()


async def test_entries_read_lately_are_served_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1))
    await store.flush()
    assert not store._recent  # written, not read: not kept
    reads = _forbid_reads(store, monkeypatch)
    for _ in range(3):
        found = await store.get(entry(1).meta.key)
        assert found is not None and found.response == b'{"n": 1}'
    assert reads == [entry(1).meta.key]  # read once, then from memory
    await store.close()


async def test_memory_holds_a_bounded_number_of_bytes_most_recent_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 8 * 4 + len(b'{"n": 1}') + len("question 1") + 512  # one entry's footprint
    store = DiskStore(tmp_path, recent_bytes=8 * size)
    for n in range(1, 10):
        await store.put(entry(n))
    await store.flush()
    reads = _forbid_reads(store, monkeypatch)
    for n in range(1, 10):  # each read from the disk once; the ninth pushes out the first
        assert await store.get(entry(n).meta.key) is not None
    assert store._recent_size == 8 * size
    reads.clear()
    for n in (*range(2, 10), 1):
        assert await store.get(entry(n).meta.key) is not None
    assert reads == [entry(1).meta.key]  # the oldest had gone; reading it pushed out 2
    assert await store.get(entry(2).meta.key) is not None
    assert reads == [entry(1).meta.key, entry(2).meta.key]
    assert store._recent_size == 8 * size
    await store.close()


async def test_a_remembered_entry_expires_with_its_ttl(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    # (a TTL a loaded machine's slow write and event-loop stalls cannot use up before the get)
    await store.put(entry(1, ttl=1.0))
    await store.flush()
    assert await store.get(entry(1).meta.key) is not None
    await asyncio.sleep(1.05)
    assert await store.get(entry(1).meta.key) is None
    assert store._recent == {}
    await store.close()


async def test_deletes_and_invalidations_drop_remembered_entries(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for n, engine in ((1, "e"), (2, "gone"), (3, "e")):
        await store.put(entry(n, engine=engine))
    await store.flush()
    for n in (1, 2, 3):
        assert await store.get(entry(n).meta.key) is not None
    assert await store.delete([entry(1).meta.key]) == 1
    assert [m.key for m in await store.delete_where(lambda m: m.engine == "gone")] == [
        entry(2).meta.key
    ]
    assert await store.get(entry(1).meta.key) is None
    assert await store.get(entry(2).meta.key) is None
    assert await store.get(entry(3).meta.key) is not None
    await store.close()


async def test_an_entry_read_while_an_invalidation_sweeps_is_not_remembered(
    tmp_path: Path,
) -> None:
    """The sweep runs on the store's thread: a lookup may read an entry from the disk just before
    the sweep deletes it, and must not then keep serving it from memory."""
    store = DiskStore(tmp_path)
    await store.put(entry(1, engine="gone"))
    await store.close()
    store = DiskStore(tmp_path)  # nothing remembered yet
    sweeping, read = threading.Event(), threading.Event()

    def doomed(meta: Any) -> bool:
        sweeping.set()
        assert read.wait(10)  # the lookup below reads the entry before it is deleted
        return bool(meta.engine == "gone")

    invalidation = asyncio.ensure_future(store.delete_where(doomed))
    assert await asyncio.to_thread(sweeping.wait, 10)
    assert await store.get(entry(1).meta.key) is not None  # still on the disk
    read.set()
    assert len(await invalidation) == 1
    assert await store.get(entry(1).meta.key) is None
    await store.close()


def _version(n: int, v: int, **kwargs: Any) -> CacheEntry:
    """Entry ``n`` (same key) with answer version ``v``."""
    e = entry(n, **kwargs)
    return CacheEntry(e.meta, b'{"n": %d, "v": %d}' % (n, v), e.embedding)


async def test_an_older_copy_in_memory_never_outlives_a_newer_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1 remembered; v2 written while v3 waits for its batch; v3's batch fails: the disk holds
    v2, and so must a read."""
    store = DiskStore(tmp_path, batch_size=1)
    key = entry(1).meta.key
    await store.put(_version(1, 1))
    await store.flush()
    assert (await store.get(key)).response.endswith(b'"v": 1}')  # type: ignore[union-attr]
    write = disk_writer.write_batch
    writes = 0

    def second_fails(cache: Any, items: Any, **kwargs: Any) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise OSError("disk full")
        write(cache, items, **kwargs)

    monkeypatch.setattr(disk_writer, "write_batch", second_fails)
    await store.put(_version(1, 2))
    await store.put(_version(1, 3))  # queued while v2's batch is written (batches of one)
    await store.flush()
    found = await store.get(key)
    assert found is not None and found.response.endswith(b'"v": 2}')
    written = on_disk(store, key)
    assert isinstance(written, bytes) and b'"v": 2}' in written
    await store.close()


async def test_an_invalidation_reaches_entries_the_disk_has_evicted(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1, engine="old"))
    await store.put(entry(2, engine="kept"))
    await store.flush()
    for n in (1, 2):
        assert await store.get(entry(n).meta.key) is not None  # read: now in memory
        evict(store, entry(n).meta.key)
    assert await store.get(entry(1).meta.key) is not None  # gone from the disk, still served
    deleted = await store.delete_where(lambda m: m.engine == "old")
    assert [m.key for m in deleted] == [entry(1).meta.key]
    assert await store.get(entry(1).meta.key) is None
    assert await store.get(entry(2).meta.key) is not None  # not matched: kept
    await store.close()


async def test_an_entry_read_from_disk_expires_in_memory_with_its_ttl(tmp_path: Path) -> None:
    first = DiskStore(tmp_path)
    # (a TTL a loaded machine's slow write, close and open cannot use up before the get)
    await first.put(entry(1, ttl=1.5))
    await first.close()
    store = DiskStore(tmp_path)
    assert await store.get(entry(1).meta.key) is not None  # read from the disk, remembered
    assert entry(1).meta.key in store._recent
    await asyncio.sleep(1.55)
    assert await store.get(entry(1).meta.key) is None
    await store.close()


async def test_memory_keeps_the_most_recently_used_not_the_first_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 8 * 4 + len(b'{"n": 1}') + len("question 1") + 512
    store = DiskStore(tmp_path, recent_bytes=4 * size)
    for n in range(1, 6):
        await store.put(entry(n))
    await store.flush()
    for n in (1, 2, 3, 4, 1):  # 1 read again: now the most recent
        assert await store.get(entry(n).meta.key) is not None
    assert await store.get(entry(5).meta.key) is not None  # one must go: 2, the least recent
    reads = _forbid_reads(store, monkeypatch)
    for n in (1, 3, 4, 5):
        assert await store.get(entry(n).meta.key) is not None
    assert reads == []
    assert await store.get(entry(2).meta.key) is not None
    assert reads == [entry(2).meta.key]
    await store.delete([entry(n).meta.key for n in range(1, 6)])
    assert store._recent_size == 0 and not store._recent
    await store.close()


async def test_an_answer_over_a_quarter_of_the_memory_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path, recent_bytes=4000)
    e = entry(1)
    await store.put(CacheEntry(e.meta, b"x" * 1000, e.embedding))  # 1000 + 562 > 4000 / 4
    await store.put(entry(2))
    await store.flush()
    reads = _forbid_reads(store, monkeypatch)
    for _ in range(2):
        assert await store.get(entry(1).meta.key) is not None
        assert await store.get(entry(2).meta.key) is not None
    assert reads == [entry(1).meta.key, entry(2).meta.key, entry(1).meta.key]
    await store.close()


async def test_an_entry_read_while_it_is_deleted_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1))
    await store.close()
    store = DiskStore(tmp_path)
    deleting, read = threading.Event(), threading.Event()
    delete = store._cache.delete

    def slow_delete(key: str, *args: Any, **kwargs: Any) -> Any:
        deleting.set()
        assert read.wait(10)  # the lookup below reads the entry before it is deleted
        return delete(key, *args, **kwargs)

    monkeypatch.setattr(store._cache, "delete", slow_delete)
    deletion = asyncio.ensure_future(store.delete([entry(1).meta.key]))
    assert await asyncio.to_thread(deleting.wait, 10)
    assert await store.get(entry(1).meta.key) is not None  # still on the disk
    read.set()
    assert await deletion == 1
    assert await store.get(entry(1).meta.key) is None
    await store.close()


async def test_a_remembered_embedding_is_as_stored_and_read_only(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    e = entry(1)
    precise = np.linspace(0.1, 0.9, 8, dtype=np.float32) + np.float32(1e-4)
    await store.put(CacheEntry(e.meta, e.response, precise))
    await store.flush()
    remembered = await store.get(e.meta.key)
    await store.close()
    reopened = DiskStore(tmp_path)
    read = await reopened.get(e.meta.key)
    assert remembered is not None and read is not None
    assert remembered.embedding is not None and read.embedding is not None
    np.testing.assert_array_equal(remembered.embedding, read.embedding)  # float16, both ways
    assert not np.array_equal(remembered.embedding, precise)
    for got in (remembered, read):
        assert got.embedding is not None
        with pytest.raises(ValueError):
            got.embedding[0] = 99.0
    await reopened.close()


async def test_the_filter_is_loaded_from_the_directory(tmp_path: Path) -> None:
    first = DiskStore(tmp_path)
    first.put_sync(entry(1))
    await first.put(entry(2))
    await first.close()
    second = DiskStore(tmp_path)
    assert second.may_contain(entry(1).meta.key) and second.may_contain(entry(2).meta.key)
    assert not second.may_contain(entry(3).meta.key)
    assert (await second.get(entry(2).meta.key)) is not None
    await second.close()


async def test_a_queued_put_is_visible_before_it_is_written(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1))
    assert on_disk(store, entry(1).meta.key) is None  # not on disk yet (no await since)
    found = await store.get(entry(1).meta.key)
    assert found is not None and found.response == b'{"n": 1}'
    await store.flush()
    assert isinstance(on_disk(store, entry(1).meta.key), bytes)
    await store.close()


async def test_a_queued_put_expires_with_its_ttl(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1, ttl=0.0))
    assert await store.get(entry(1).meta.key) is None
    await store.close()


async def test_delete_removes_a_put_still_queued(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    await store.put(entry(1))
    await store.put(entry(2))
    assert await store.delete([entry(1).meta.key]) == 1
    assert await store.get(entry(1).meta.key) is None
    assert not store.may_contain(entry(1).meta.key)
    await store.put(entry(3, engine="gone"))
    assert [m.key for m in await store.delete_where(lambda m: m.engine == "gone")] == [
        entry(3).meta.key
    ]
    assert await store.get(entry(3).meta.key) is None
    await store.close()
    reopened = DiskStore(tmp_path)
    assert await reopened.get(entry(1).meta.key) is None
    assert await reopened.get(entry(2).meta.key) is not None
    await reopened.close()


async def test_a_clean_shutdown_writes_everything_queued(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, batch_size=7)
    for n in range(100):
        await store.put(entry(n))
    await store.close()
    reopened = DiskStore(tmp_path)
    assert await reopened.count() == 100
    for n in range(100):
        found = await reopened.get(entry(n).meta.key)
        assert found is not None and found.response == b'{"n": %d}' % n
    await reopened.close()


async def test_a_failed_batch_is_dropped_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path)

    def broken(cache: Any, items: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(disk_writer, "write_batch", broken)
    await store.put(entry(1))
    await store.flush()
    assert await store.get(entry(1).meta.key) is None
    assert not store.may_contain(entry(1).meta.key)
    await store.close()


async def test_a_full_queue_refuses_a_put(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_pending=3)
    for n in range(3):
        await store.put(entry(n))
    with pytest.raises(StoreBusy):
        await store.put(entry(3))
    assert await store.get(entry(3).meta.key) is None
    assert not store.may_contain(entry(3).meta.key)
    await store.flush()
    await store.put(entry(3))  # room again once the writer caught up
    assert await store.get(entry(3).meta.key) is not None
    await store.close()


_ops = st.lists(
    st.tuples(st.sampled_from(["put", "delete", "flush", "get", "reopen"]), st.integers(0, 5)),
    max_size=30,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops)
@pytest.mark.parametrize("memory", [0, 2400, 2**20], ids=["none", "four entries", "ample"])
def test_the_store_answers_like_a_dictionary(tmp_path_factory: Any, ops: Any, memory: int) -> None:
    folder = tmp_path_factory.mktemp("d")

    async def run() -> None:
        store = DiskStore(folder, batch_size=2, recent_bytes=memory)
        model: dict[str, bytes] = {}
        for version, (op, n) in enumerate(ops):
            key = entry(n).meta.key
            if op == "put":  # each put a new answer: a stale one served would show
                await store.put(_version(n, version))
                model[key] = _version(n, version).response
            elif op == "delete":
                assert await store.delete([key]) == (1 if model.pop(key, None) else 0)
            elif op == "flush":
                await store.flush()
            elif op == "reopen":
                await store.close()
                store = DiskStore(folder, batch_size=2, recent_bytes=memory)
            found = await store.get(key)
            assert (found.response if found else None) == model.get(key)
            if found is not None:
                assert store.may_contain(key)
        assert await store.count() == len(model)
        await store.close()

    asyncio.run(run())


async def test_a_lone_entry_is_written_after_the_linger(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, linger_s=0.01)
    await store.put(entry(1))
    for _ in range(3000):  # no flush: the writer must get there on its own (however loaded)
        if isinstance(on_disk(store, entry(1).meta.key), bytes):
            break
        await asyncio.sleep(0.01)
    assert isinstance(on_disk(store, entry(1).meta.key), bytes)
    assert store._pending == {}
    await store.close()


async def test_the_ttl_runs_from_the_put_not_from_the_write(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, linger_s=10.0)
    await store.put(entry(1, ttl=0.3))
    await asyncio.sleep(0.2)
    await store.flush()  # written 0.2 s after the put
    await asyncio.sleep(0.15)  # past the put's TTL, not past the write's
    assert await store.get(entry(1).meta.key) is None
    await store.close()


# -- write_batch writes diskcache's own rows, keyed by id ----------------------------------

_SIZES = st.sampled_from([0, 1, 700, 32_767, 32_768, 40_000])  # both sides of min_file_size


def _contents(cache: diskcache.Cache) -> dict[str, Any]:
    """Cache key -> value, read as the store reads: through the id table."""
    return {key: cache.get(id_) for key, id_ in stored_ids(cache)}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.sampled_from("abcdef"), _SIZES, st.integers(0, 255)), max_size=6),
        min_size=1,
        max_size=4,
    )
)
def test_batches_read_back_as_if_set_one_by_one(tmp_path_factory: Any, batches: Any) -> None:
    """Inline rows by upsert, file-sized ones by ``set``, each put under a new id that replaces
    its key's last (in an earlier batch or the same one): the id table and diskcache's public
    reads agree with a dictionary of the last value of each key, as do diskcache's count and
    size totals and its own consistency check, and no replaced row or file is left behind."""
    directory = tmp_path_factory.mktemp("batches")
    cache = diskcache.Cache(str(directory), size_limit=2**30, cull_limit=0)
    disk_writer.prepare(cache)
    expected: dict[str, bytes] = {}
    ids: dict[str, int] = {}
    next_id = 1
    for batch in batches:
        rows = []
        for key, size, fill in batch:
            blob = bytes([fill]) * size
            rows.append((next_id, key, blob, time.time() + 3600, ids.get(key, 0)))
            ids[key] = next_id
            next_id += 1
            expected[key] = blob
        disk_writer.write_batch(cache, rows)
    assert _contents(cache) == expected
    assert sorted(id_ for _, id_ in stored_ids(cache)) == sorted(ids.values())
    assert len(cache) == len(expected)
    assert cache.check() == []  # files, the count and the size totals as diskcache keeps them
    files = [p for p in directory.rglob("*.val")]
    assert len(files) == sum(len(v) >= cache.disk.min_file_size for v in expected.values())
    assert disk_writer.last_id(cache) == max(ids.values(), default=0)
    cache.close()


def test_a_batch_written_twice_is_stored_once(tmp_path: Path) -> None:
    """The batch a lost writer process may have committed is written again by the thread."""
    cache = diskcache.Cache(str(tmp_path), cull_limit=0)
    disk_writer.prepare(cache)
    now = time.time()
    rows = [(1, "a", b"x", now + 60, 0), (2, "b", b"y" * 40_000, now + 60, 0)]
    disk_writer.write_batch(cache, rows)
    disk_writer.write_batch(cache, rows)
    assert _contents(cache) == {"a": b"x", "b": b"y" * 40_000}
    assert len(cache) == 2 and cache.check() == []


def test_a_batch_keeps_the_expiry_of_each_put(tmp_path: Path) -> None:
    cache = diskcache.Cache(str(tmp_path), cull_limit=0)
    disk_writer.prepare(cache)
    now = time.time()
    disk_writer.write_batch(cache, [(1, "gone", b"x", now - 1, 0), (2, "kept", b"y", now + 60, 0)])
    assert cache.get(1) is None and cache.get(2) == b"y"
    _, expire_time = cache.get(2, expire_time=True)
    assert abs(expire_time - (now + 60)) < 1e-3


def test_whatever_deletes_a_row_deletes_its_key(tmp_path: Path) -> None:
    """diskcache's own eviction and expiry delete rows without us: the trigger keeps the id
    table in step, so a store reopened later does not index entries that are gone."""
    cache = diskcache.Cache(str(tmp_path), cull_limit=0, size_limit=150_000)
    disk_writer.prepare(cache)
    now = time.time()
    rows = [(n, f"k{n}", bytes(4000), now + (0.01 if n == 1 else 60), 0) for n in range(1, 41)]
    disk_writer.write_batch(cache, rows, cull=False)
    time.sleep(0.02)
    cache.cull()  # expires 1, then evicts the oldest past the size limit
    left = stored_ids(cache)
    assert [id_ for _, id_ in left] == sorted(int(k) for k in cache.iterkeys())
    assert 1 not in {id_ for _, id_ in left} and 0 < len(left) < 40
    cache.delete(left[-1][1])
    assert stored_ids(cache) == left[:-1]


def test_rows_of_the_format_before_ids_are_dropped(tmp_path: Path) -> None:
    with diskcache.Cache(str(tmp_path)) as old:
        old.set("f" * 64, b"an entry under its cache key")
        old.set("e" * 64, b"x" * 40_000)  # in a file
    cache = diskcache.Cache(str(tmp_path), cull_limit=0)
    assert disk_writer.prepare(cache) == 2
    assert len(cache) == 0 and cache.check() == [] and not list(tmp_path.rglob("*.val"))
    assert disk_writer.prepare(cache) == 0
