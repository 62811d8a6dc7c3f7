"""Cache storage: the ``CacheStore`` protocol and the embedded diskcache backend.

diskcache keeps entries in SQLite (WAL) in the data directory, so they survive restarts and a
crash mid-write leaves either the old state or the new, never a torn entry. A read is a single
indexed SQLite lookup (tens of microseconds) and runs inline; writes, deletes and scans run on one
dedicated thread so a slow fsync or a WAL checkpoint never stalls the event loop (and SQLite sees
a single writer). ``scripts/bench_index.py --store`` measures both.

Two things keep the disk off a miss's path (``DiskStore``):
- an index in memory: by ``hash(key)``, the id each key this process knows is stored under
  (diskcache's rows are keyed by ids that only grow, not by cache keys: disk_writer.py says
  why). It is loaded from the directory when the store opens, set on every put, cleared on
  every delete that removed an entry. A key absent from it is absent from the store, so a miss
  costs a dict lookup instead of a SQLite read, and a hit reads its row by id. Entries that
  expire or that diskcache evicts stay in it until a lookup finds their row gone or the index is
  loaded again (a stale "maybe" costs one read, never a wrong answer: the entry read must carry
  the key asked for): at the next start, or once it has grown to twice what the disk held
  (``_reload_filter``). The index only knows this process's writes: a diskcache directory
  belongs to one proxy process (as the semantic index already assumes, and ``DirectoryLock``
  enforces); fleets share Redis, which has no filter.
- write-behind: ``put`` queues the entry (visible to ``get`` at once through the pending map) and
  a writer task stores the queue in batches (a batch is written when full or ``linger_s`` after
  its first entry), one SQLite transaction per batch, on the store's thread or in a writer
  process (``writer="process"``, the proxy's default: disk_writer.py says why). With
  ``max_pending`` entries queued ``put`` refuses (``StoreBusy``: that answer is not stored)
  instead of queueing without bound; ``flush`` (called by ``close``, ``delete``,
  ``delete_where``, ``scan`` and ``count``) writes everything queued first, so a clean shutdown
  loses nothing and an admin operation sees every entry put before it.

And one keeps it off a repeated hit's: the entries read lately stay decoded in memory (up to
``recent_bytes``; a put, a delete or an invalidation of the key drops its copy, and an
invalidation also judges the copies of entries diskcache has since evicted).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar, cast

import diskcache

from proxy.cache.disk_writer import (
    DISKCACHE_SETTINGS,
    BatchWriter,
    ProcessWriter,
    Queued,
    ThreadWriter,
    key_of,
    last_id,
    prepare,
    stored_ids,
    write_batch,
)
from proxy.cache.entry import (
    CacheEntry,
    EntryDecodeError,
    EntryMeta,
    decode_entry,
    decode_meta,
    encode_entry,
)

log = logging.getLogger(__name__)

SCAN_BATCH = 512
# ``delete_where`` reads this many rows at a time, and of each entry only its first HEAD_BYTES
# (the header, i.e. the metadata, comes first: see entry.py); an entry whose header is longer
# (a long question) is read again whole. So its memory stays near SWEEP_BATCH * HEAD_BYTES
# whatever the store holds (reading every entry whole at once added 167 MB of RSS for a
# 200 MB store).
SWEEP_BATCH = 256
HEAD_BYTES = 2048
# Live entries with a str key and a bytes value: inline (MODE_RAW, a blob) or in a file
# (MODE_BINARY), as diskcache 5.6 stores them (disk_writer.py writes the same rows). An entry
# past its expiry is skipped, as ``Cache.get`` would.
_SWEEP = (
    "SELECT c.rowid, c.key, k.key, c.store_time, c.filename, length(c.value),"
    " substr(c.value, 1, ?) FROM Cache AS c JOIN Frugal_keys AS k ON k.id = c.key"
    " WHERE c.rowid > ? AND c.raw = 1 AND (c.expire_time IS NULL OR c.expire_time > ?)"
    f" AND (c.mode = {diskcache.core.MODE_RAW} AND typeof(c.value) = 'blob'"
    f" OR c.mode = {diskcache.core.MODE_BINARY}) ORDER BY c.rowid LIMIT ?"
)
# Only the row as it was read: a put that replaced it since (same key, same rowid, a new
# store_time) is not deleted on the old entry's metadata.
_DELETE_ROW = "DELETE FROM Cache WHERE rowid = ? AND store_time = ?"
_T = TypeVar("_T")
# What SQLite says of a file that is not a sound database (garbage, truncated, scribbled on);
# other errors (locked, unreadable, disk full) are not the file's fault and are not acted on.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
LOCK_FILE = "frugal.lock"  # DirectoryLock's; a quarantine leaves it where it is


def _footprint(entry: CacheEntry) -> int:
    """Roughly the bytes a remembered entry holds: its answer, question and embedding."""
    embedding = entry.embedding
    question = entry.meta.query_text
    return (
        len(entry.response)
        + (len(question) if question is not None else 0)
        + (embedding.nbytes if embedding is not None else 0)
        + 512  # the objects, the key, the metadata's other fields
    )


class CacheBackendError(ConnectionError):
    """The store is unreachable; the cache treats the operation as a miss / skipped write."""


class StoreBusy(CacheBackendError):
    """The store's write queue is full: this answer is not stored (the disk is slower than the
    answers come; the cache counts a failed store, the backend is not down)."""


class CacheStore(Protocol):
    async def get(self, key: str) -> CacheEntry | None: ...

    async def get_many(self, keys: Collection[str]) -> dict[str, CacheEntry]: ...

    async def put(self, entry: CacheEntry) -> None: ...

    async def delete(self, keys: Collection[str]) -> int: ...

    def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        """Every live entry (order unspecified); used for index rebuilds and invalidation."""
        ...

    async def delete_where(self, predicate: Callable[[EntryMeta], bool]) -> list[EntryMeta]:
        """Delete entries whose metadata matches; returns what was deleted."""
        ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class EntryAdded:
    """Another replica (or this one) stored an entry."""

    entry: CacheEntry


@dataclass(frozen=True, slots=True)
class Resync:
    """The follower may have missed entries (start-up, reconnect): rebuild from a full scan."""


class FollowableStore(CacheStore, Protocol):
    """A store shared by several replicas: ``follow`` yields ``Resync`` first, then new entries
    (and ``Resync`` again whenever it may have missed some)."""

    def follow(self) -> AsyncIterator[EntryAdded | Resync]: ...


def followable(store: CacheStore) -> FollowableStore | None:
    """The store as a shared one, if it is. (Not a runtime-checkable protocol: the compiled
    build's protocols are not.)"""
    return cast(FollowableStore, store) if callable(getattr(store, "follow", None)) else None


class StoreInUse(RuntimeError):
    """Another process holds the cache folder (:class:`DirectoryLock`)."""

    def __init__(self, directory: Path, holder: str) -> None:
        super().__init__(
            f"in use by another proxy{f' (pid {holder})' if holder else ''}: give each proxy its"
            " own cache folder (replicas share one cache through cache.backend: redis)"
        )
        self.directory = directory


class DirectoryLock:
    """An exclusive lock on a cache folder, held while a proxy uses it.

    Two proxies on one folder would not corrupt the database (SQLite takes turns), but each
    keeps what only a folder's single user may keep: the ids it numbers its puts with (counted
    on from those it found at start: the two would write over each other's entries), the index
    of what is stored (the other's answers become misses), the entries read lately and the
    semantic index (an invalidation through one proxy would not reach the other's copies, which
    it would go on serving). So the second proxy is refused at start-up, naming the folder.
    ``flock``: the kernel lets go when the holder exits, however it exits, so a killed proxy
    leaves no stale lock; the writer process does not inherit it (its descriptors are closed at
    exec)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreInUse(directory, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the refusal's message
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None when it names none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _is_corrupt(error: sqlite3.DatabaseError) -> bool:
    return getattr(error, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _read_cache(directory: Path, size_limit: int) -> tuple[diskcache.Cache, list[tuple[str, int]]]:
    # No culling inside each set (an expired-entry query per write): the writer culls now and
    # then instead (disk_writer.CULL_EVERY_S), so the size limit may be passed for a moment.
    cache = diskcache.Cache(
        str(directory), size_limit=size_limit, cull_limit=0, **DISKCACHE_SETTINGS
    )
    try:
        dropped = prepare(cache)
        if dropped:
            log.warning(
                "cache.disk.old_format_dropped",
                extra={"directory": str(directory), "entries": dropped},
            )
        # every key and id (the index's), which also reads the whole id table: most damage
        # shows here rather than on the first request
        return cache, stored_ids(cache)
    except BaseException:
        cache.close()
        raise


def _open_cache(directory: Path, size_limit: int) -> tuple[diskcache.Cache, list[tuple[str, int]]]:
    """The directory's diskcache and its keys. A database SQLite finds damaged (a crash of the
    disk, not of the proxy: a proxy's crash leaves it sound) is moved aside and the store starts
    empty: a cache may lose its answers, a proxy must not fail to start over them."""
    try:
        return _read_cache(directory, size_limit)
    except sqlite3.DatabaseError as exc:
        if not _is_corrupt(exc):
            raise
        moved = _quarantine(directory)
        log.error(
            "cache.disk.corrupt_store",
            extra={"file": str(directory / "cache.db"), "moved_to": str(moved), "error": str(exc)},
        )
        return _read_cache(directory, size_limit)


def _quarantine(directory: Path) -> Path:
    """Move the store's files (database, WAL, value files) into a new ``corrupt-*`` folder of
    ``directory``: the same file system (the directory may be a mount point), kept for a
    post-mortem, and out of diskcache's way. Lock files and earlier quarantines stay."""
    aside = directory / time.strftime("corrupt-%Y%m%dT%H%M%S", time.gmtime())
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
    aside.mkdir()
    for path in directory.iterdir():
        if path != aside and not path.name.startswith("corrupt-") and path.name != LOCK_FILE:
            path.rename(aside / path.name)
    return aside


class DiskStore:
    """Embedded store: diskcache in ``directory``. Entries expire at their TTL."""

    def __init__(
        self,
        directory: Path,
        *,
        size_limit: int = 4 * 2**30,
        batch_size: int = 256,
        max_pending: int = 10_000,
        linger_s: float = 0.005,
        writer: Literal["thread", "process"] = "thread",
        recent_bytes: int = 32 * 2**20,
        filter_slack: int = 100_000,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._cache, stored = _open_cache(directory, size_limit)
        self._next_id = last_id(self._cache) + 1
        self._database = directory / diskcache.core.DBNAME
        self._database_id = _file_id(self._database)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")
        self._batches: BatchWriter = (
            ProcessWriter(
                directory,
                size_limit,
                fallback=self._thread_writer,
                on_gone=lambda error: self._error("writer", error),
            )
            if writer == "process"
            else self._thread_writer()
        )
        self._batch_size = batch_size
        self._max_pending = max_pending
        # told of every batch that could not be written ("write") and every writer process
        # lost ("writer"): the proxy's cache-error metric. The answers were counted stored when
        # queued, so nothing else would show them lost.
        self._on_error = on_error
        self._dropped = 0  # entries dropped by the batches failing since the last success
        # key -> (entry queued for the writer, when it expires on the store's clock as diskcache
        # would count it): the newest put of each key; lookups read it first
        self._pending: dict[str, Queued] = {}
        self._queue: deque[Queued] = deque()  # (entry, expiry time, id, replaced id)
        self._flushing: asyncio.Task[None] | None = None
        # The writer waits up to linger_s for a batch to fill: one hand-over and one commit per
        # several answers (a commit costs ~80 µs, an entry ~16 µs). Not longer: each batch's
        # hand-over work lands on the request that meets it, and at one connection 50 ms batches
        # (~125 answers) made a p99 of 3.9 ms where 5 ms batches make 1.5 ms (bench_overhead).
        self._linger_s = linger_s
        self._hurry = asyncio.Event()  # a full batch or a flush: write now
        # entries queued / written (or dropped) so far; a flush waits for the count at its call
        self._queued = 0
        self._written = 0
        self._progress: asyncio.Future[None] | None = None
        # hash(key) -> the id its entry is stored under (the module doc's index). Only ever too
        # high (expiry, eviction), never too low.
        self._index: dict[int, int] = {}
        # key -> (entry, expiry time): entries read lately, decoded, most recent last, up to
        # ``recent_bytes`` of answers and embeddings. A semantic lookup reads up to four
        # candidates, often the same recent questions, and a popular answer is read again and
        # again: from here that costs no SQLite read and no decode (~35 µs an entry). Not the
        # entries written: with every answer a miss (bench_overhead's frugal-full) memory then
        # filled with ~35,000 entries nobody read, and the one-connection p99 went from 1.3 to
        # 2.2-2.5 ms (2026-11-29).
        self._recent: OrderedDict[str, tuple[CacheEntry, float]] = OrderedDict()
        self._recent_size = 0
        self._recent_limit = recent_bytes
        for key, id_ in stored:  # (oldest first: a later id of a key wins)
            self._index[hash(key)] = id_
        # The index takes every put, and eviction takes nothing off it until a lookup meets the
        # entry gone: under sustained unique answers it grew by one key per answer for the
        # proxy's whole life (~100 bytes each: gigabytes over weeks) while the disk held a
        # bounded number. So once it holds twice what the disk held at its last load (and
        # ``filter_slack`` more), it is loaded again from the directory, off the event loop.
        self._filter_slack = filter_slack
        self._reload_at = 2 * len(self._index) + filter_slack
        self._reloading: asyncio.Task[None] | None = None
        # keys put (or queued) since the reload began reading: the reload's read may miss them
        self._put_since: set[str] | None = None

    def _thread_writer(self) -> BatchWriter:
        return ThreadWriter(self._cache, self._writer)

    def _unindex(self, key: str, id_: int, back_to: int = 0) -> None:
        """Take ``key`` off ``id_`` in the index, if it still names that id: back to the id
        ``back_to`` (a put not written: what it replaced), or out of the index (0)."""
        h = hash(key)
        if self._index.get(h) == id_:
            if back_to:
                self._index[h] = back_to
            else:
                del self._index[h]

    def _new_id(self, key: str) -> tuple[int, int]:
        """An id for a put of ``key``, indexed; and the id it replaces (0: none)."""
        id_ = self._next_id
        self._next_id = id_ + 1
        h = hash(key)
        replaced = self._index.get(h, 0)
        self._index[h] = id_
        return id_, replaced

    def may_contain(self, key: str) -> bool:
        """False only when ``key`` is certainly not stored (True may be stale)."""
        return hash(key) in self._index

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    def get_sync(self, key: str) -> CacheEntry | None:
        queued = self._pending.get(key)
        if queued is not None:
            return queued[0] if queued[1] > time.time() else None
        recent = self._recent.get(key)
        if recent is not None:
            if recent[1] > time.time():
                self._recent.move_to_end(key)
                return recent[0]
            self._forget_recent((key,))  # expired: diskcache no longer returns it either
            return None
        id_ = self._index.get(hash(key))
        if id_ is None:
            return None
        found = self._cache.get(id_, expire_time=True)
        blob, expires = found if isinstance(found, tuple) else (None, None)
        if not isinstance(blob, bytes):
            self._unindex(key, id_)  # evicted or expired: later lookups need not read
            return None
        try:
            entry = decode_entry(blob)
        except EntryDecodeError:
            log.warning("cache.disk.corrupt_entry", extra={"key": key})
            # Out of the index: later lookups of it are misses without a read or a warning (a
            # store of another proxy version's format would log on every request that asks).
            # It stays on disk until the size limit evicts it.
            self._unindex(key, id_)
            return None
        if entry.meta.key != key:
            return None  # another key with the same hash(key), put since: not this one's
        self._remember(entry, math.inf if expires is None else float(expires))
        return entry

    def _remember(self, entry: CacheEntry, expires: float) -> None:
        key = entry.meta.key
        self._forget_recent((key,))
        size = _footprint(entry)
        if size > self._recent_limit // 4:
            return  # one large answer must not push out many small ones
        if entry.embedding is not None:
            entry.embedding.flags.writeable = False  # served to every later lookup as it is
        self._recent[key] = (entry, expires)
        self._recent_size += size
        while self._recent_size > self._recent_limit:
            _, (old, _) = self._recent.popitem(last=False)
            self._recent_size -= _footprint(old)

    def _forget_recent(self, keys: Iterable[str]) -> None:
        for key in keys:
            found = self._recent.pop(key, None)
            if found is not None:
                self._recent_size -= _footprint(found[0])

    async def get(self, key: str) -> CacheEntry | None:
        return self.get_sync(key)

    async def get_many(self, keys: Collection[str]) -> dict[str, CacheEntry]:
        found = {k: self.get_sync(k) for k in keys}
        return {k: e for k, e in found.items() if e is not None}

    def put_sync(self, entry: CacheEntry) -> None:
        """Write one entry now (no queue; for scripts and tests outside an event loop)."""
        key = entry.meta.key
        self._forget_recent((key,))
        id_, replaced = self._new_id(key)
        expires = time.time() + entry.meta.ttl
        write_batch(self._cache, [(id_, key, encode_entry(entry), expires, replaced)])

    async def start_writer(self) -> None:
        """Start the writer now (with ``writer="process"``: the child, until it answers) rather
        than with the first answer to store: a child starting up (an interpreter and its
        imports, ~0.2 s of CPU) inside the first requests took a core from them, and one stalled
        30 ms. A writer that cannot start falls back as in :meth:`put`."""
        try:
            await self._batches.write([])
        except Exception:
            log.warning("cache.disk.writer_start_failed", exc_info=True)

    async def put(self, entry: CacheEntry) -> None:
        self.put_nowait(entry)

    def put_nowait(self, entry: CacheEntry) -> None:
        """``put`` without a coroutine: it only queues (the event loop must be running)."""
        if len(self._queue) >= self._max_pending:
            # Dropped rather than waited for: a waiting put per answer would pile up without
            # bound (they run in background tasks), and a cache may skip a write.
            raise StoreBusy(f"{len(self._queue)} answers already queued for the disk")
        key = entry.meta.key
        id_, replaced = self._new_id(key)
        if self._put_since is not None:
            self._put_since.add(key)
        # an older copy in memory must not be served once this put is written (or outlive it
        # if its write fails: the disk then holds whatever it held)
        if key in self._recent:
            self._forget_recent((key,))
        queued = (entry, time.time() + entry.meta.ttl, id_, replaced)
        self._pending[key] = queued
        self._queue.append(queued)
        self._queued += 1
        if len(self._queue) >= self._batch_size:
            self._hurry.set()
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._write_queue())

    async def _write_queue(self) -> None:
        try:
            while self._queue:
                if len(self._queue) < self._batch_size and not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._linger_s):
                            await self._hurry.wait()
                self._hurry.clear()
                batch = [
                    self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))
                ]
                try:
                    await self._batches.write(batch)
                    self._check_in_place()
                except Exception as exc:
                    # Dropped like a failed write before: those answers are simply not cached.
                    self._write_failed(len(batch), exc)
                    # Not written, nor what they replaced deleted: each key's index goes back
                    # to the id before (latest put first, so a key put twice in the batch goes
                    # back past both).
                    for entry, _, id_, replaced in reversed(batch):
                        self._unindex(entry.meta.key, id_, back_to=replaced)
                else:
                    self._write_ok()
                    if len(self._index) > self._reload_at and self._reloading is None:
                        self._reloading = asyncio.get_running_loop().create_task(
                            self._reload_filter(), name="cache-disk-filter"
                        )
                finally:
                    for entry, *_ in batch:
                        queued = self._pending.get(entry.meta.key)
                        if queued is not None and queued[0] is entry:
                            del self._pending[entry.meta.key]
                    self._written += len(batch)
                    self._wake_flushers()
        finally:
            self._flushing = None
            self._wake_flushers()

    def _disk_keys(self) -> list[tuple[str, int]]:
        return stored_ids(self._cache)

    async def _reload_filter(self) -> None:
        """Load the index again from the directory: what is stored now, and every key put
        since the read began or queued then (written after the read passed it, it would be
        a stored entry the index calls absent). Deletes meanwhile may leave a stale "maybe"."""
        self._put_since = set(self._pending)
        try:
            # (a thread of its own: diskcache gives each thread its own SQLite connection, and
            # the store's thread stays free for its writes and deletes)
            stored = await asyncio.to_thread(self._disk_keys)
        except Exception:
            log.warning("cache.disk.filter_reload_failed", exc_info=True)
            self._reload_at = 2 * len(self._index) + self._filter_slack  # not again at once
            return
        finally:
            put_since, self._put_since = self._put_since, None
            self._reloading = None
        before = len(self._index)
        index = {hash(key): id_ for key, id_ in stored}
        for h in map(hash, put_since):
            if h in self._index:
                index[h] = self._index[h]
        self._index = index
        self._reload_at = 2 * len(index) + self._filter_slack
        log.info("cache.disk.filter_reloaded", extra={"before": before, "after": len(index)})

    async def settled(self) -> None:
        """Wait for a filter reload under way (tests, shutdown)."""
        if self._reloading is not None:
            await asyncio.shield(self._reloading)

    def _check_in_place(self) -> None:
        """SQLite writes on into a database whose file was deleted or replaced (the folder
        removed by hand, a volume swapped): its open handles outlive the name, so the batch
        looks committed but no restart will find it. Counted as a failed write instead."""
        if _file_id(self._database) != self._database_id:
            raise FileNotFoundError(
                errno.ENOENT, "the cache database was removed or replaced", str(self._database)
            )

    def _write_failed(self, entries: int, error: Exception) -> None:
        # A full disk fails every batch until it has room again, hundreds a second under load:
        # the first failure is logged (with why), the rest only counted, and the end logged.
        if self._dropped == 0:
            log.warning("cache.disk.write_failed", extra={"entries": entries}, exc_info=error)
        self._dropped += entries
        self._error("write", error)

    def _error(self, operation: str, error: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(operation, error)

    def _write_ok(self) -> None:
        if self._dropped:
            log.warning("cache.disk.write_recovered", extra={"dropped": self._dropped})
            self._dropped = 0

    def _wake_flushers(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and not progress.done():
            progress.set_result(None)

    async def flush(self) -> None:
        """Wait until every entry put before this call is written (later puts may still be
        queued: a steady stream of answers cannot hold a flush up)."""
        target = self._queued
        while self._written < target and self._flushing is not None:
            self._hurry.set()
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._progress)

    async def delete(self, keys: Collection[str]) -> int:
        await self.flush()  # a queued put of a deleted key must not land after the delete

        ids = {k: id_ for k in keys if (id_ := self._index.get(hash(k))) is not None}

        def delete_all() -> list[tuple[str, int]]:
            # (the id's own key checked: another key with the same hash(key) may hold it)
            return [
                (k, id_)
                for k, id_ in ids.items()
                if key_of(self._cache, id_) == k and self._cache.delete(id_)
            ]

        self._forget_recent(keys)
        try:
            deleted = await self._run(delete_all)
        finally:
            # (again: a lookup meanwhile may have read one from the disk before it went)
            self._forget_recent(keys)
        for key, id_ in deleted:
            self._unindex(key, id_)
        return len(deleted)

    def _iter_blobs(self) -> Iterator[tuple[int, bytes]]:
        for id_ in self._cache.iterkeys():
            blob = self._cache.get(id_)
            if isinstance(id_, int) and isinstance(blob, bytes):
                yield id_, blob

    async def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        await self.flush()
        blobs = self._iter_blobs()

        def next_batch() -> list[CacheEntry]:
            batch: list[CacheEntry] = []
            for _id, blob in blobs:
                try:
                    batch.append(decode_entry(blob, with_embedding=with_embedding))
                except EntryDecodeError:
                    continue
                if len(batch) >= SCAN_BATCH:
                    break
            return batch

        while batch := await self._run(next_batch):
            for entry in batch:
                yield entry

    async def delete_where(self, predicate: Callable[[EntryMeta], bool]) -> list[EntryMeta]:
        """Delete the entries whose metadata matches (and those whose header is unreadable).

        Streamed in batches of ``SWEEP_BATCH`` rows, each one job on the store's thread (its
        other work, a thread writer's batches, goes between them) that reads only each entry's
        header and deletes the batch's matches in one transaction; SQLite's own work releases
        the GIL, so what holds it beside the requests is the headers' decoding and
        ``predicate``, which runs on that thread."""
        await self.flush()
        deleted: list[EntryMeta] = []
        after = 0
        # Entries in memory that the sweep does not meet (diskcache evicted them for size) are
        # judged here, once the sweep is done.
        remembered = frozenset(self._recent)
        met: set[str] = set()
        while True:
            batch = await self._run(
                functools.partial(self._sweep, after, predicate, remembered, met)
            )
            if batch is None:
                break
            after, matched, gone = batch
            # (remembered before or while the batch was swept: served until now, as from disk)
            self._forget_recent(key for key, _ in gone)
            for key, id_ in gone:
                self._unindex(key, id_)
            deleted += matched
        now = time.time()
        for key in remembered - met:
            found = self._recent.get(key)
            if found is None:
                continue
            if found[1] <= now:  # expired: gone, as the sweep treats it
                self._forget_recent((key,))
            elif predicate(found[0].meta):
                self._forget_recent((key,))
                deleted.append(found[0].meta)
        return deleted

    def _sweep(
        self,
        after: int,
        predicate: Callable[[EntryMeta], bool],
        remembered: frozenset[str] = frozenset(),
        met: set[str] | None = None,
    ) -> tuple[int, list[EntryMeta], list[tuple[str, int]]] | None:
        """One batch of ``delete_where``: the rows after rowid ``after``. Returns the last rowid
        read, the metadata of the entries deleted and every (key, id) deleted (corrupt ones
        too), or None past the last row; adds the keys of ``remembered`` it reads to ``met``.
        Blocking: runs on the store's thread."""
        cache = self._cache
        rows = cache._sql(_SWEEP, (HEAD_BYTES, after, time.time(), SWEEP_BATCH)).fetchall()
        if not rows:
            return None
        doomed: list[tuple[int, float, str | None, tuple[str, int], EntryMeta | None]] = []
        for rowid, id_, key, stored, filename, size, head in rows:
            if met is not None and key in remembered:
                met.add(key)
            try:
                meta = self._meta_of(rowid, filename, size, head)
            except EntryDecodeError:
                doomed.append((rowid, stored, filename, (key, id_), None))  # not an entry: dropped
                continue
            if meta is not None and predicate(meta):
                doomed.append((rowid, stored, filename, (key, id_), meta))
        matched: list[EntryMeta] = []
        gone: list[tuple[str, int]] = []
        files: list[str] = []
        if doomed:
            with cache.transact():
                for rowid, stored, filename, key, meta in doomed:
                    if cache._sql(_DELETE_ROW, (rowid, stored)).rowcount:
                        gone.append(key)
                        if meta is not None:
                            matched.append(meta)
                        if filename is not None:
                            files.append(filename)
            for name in files:
                cache.disk.remove(name)  # after the commit, as diskcache's own delete does
        return rows[-1][0], matched, gone

    def _meta_of(
        self, rowid: int, filename: str | None, size: int | None, head: bytes | None
    ) -> EntryMeta | None:
        """An entry's metadata from the first ``HEAD_BYTES`` of its blob, read whole only when
        the header is longer; None if it is gone meanwhile. Raises ``EntryDecodeError`` for a
        blob that is not an entry."""
        if filename is not None:  # stored in a file (a large answer)
            path = os.path.join(self._cache.directory, filename)
            try:
                with open(path, "rb") as file:
                    head = file.read(HEAD_BYTES)
                    size = os.fstat(file.fileno()).st_size
            except OSError:
                return None  # replaced or evicted since the row was read
        if head is None or size is None:
            return None
        try:
            return decode_meta(head)
        except EntryDecodeError:
            if len(head) >= size:
                raise  # that was the whole blob
        whole = self._whole_blob(rowid, filename)
        return None if whole is None else decode_meta(whole)

    def _whole_blob(self, rowid: int, filename: str | None) -> bytes | None:
        if filename is not None:
            try:
                with open(os.path.join(self._cache.directory, filename), "rb") as file:
                    return file.read()
            except OSError:
                return None
        row = self._cache._sql("SELECT value FROM Cache WHERE rowid = ?", (rowid,)).fetchone()
        return bytes(row[0]) if row is not None and isinstance(row[0], bytes) else None

    async def count(self) -> int:
        await self.flush()
        return await self._run(lambda: len(self._cache))

    async def close(self) -> None:
        await self.flush()  # answers stored just before a clean shutdown survive it
        await self.settled()  # (its thread reads the database the close is about to close)
        await self._batches.close()
        self._forget_recent(list(self._recent))
        await self._run(self._cache.close)
        self._writer.shutdown(wait=True)

    def close_sync(self) -> None:
        self._forget_recent(list(self._recent))
        self._cache.close()
        self._writer.shutdown(wait=True)
