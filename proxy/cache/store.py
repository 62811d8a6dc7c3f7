"""Cache storage: the ``CacheStore`` protocol and the embedded diskcache backend.

diskcache keeps entries in SQLite (WAL, one transaction per write) in the data directory, so they
survive restarts and a crash mid-write leaves either the old state or the new, never a torn entry.
A read is a single indexed SQLite lookup (tens of microseconds) and runs inline; writes, deletes
and scans run on one dedicated thread so a slow fsync or a WAL checkpoint never stalls the event
loop (and SQLite sees a single writer). ``scripts/bench_index.py --store`` measures both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import diskcache

from proxy.cache.entry import CacheEntry, EntryDecodeError, EntryMeta, decode_entry, encode_entry

log = logging.getLogger(__name__)

SCAN_BATCH = 512
_T = TypeVar("_T")


class CacheBackendError(ConnectionError):
    """The store is unreachable; the cache treats the operation as a miss / skipped write."""


@runtime_checkable
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


@runtime_checkable
class FollowableStore(CacheStore, Protocol):
    """A store shared by several replicas: ``follow`` yields ``Resync`` first, then new entries
    (and ``Resync`` again whenever it may have missed some)."""

    def follow(self) -> AsyncIterator[EntryAdded | Resync]: ...


class DiskStore:
    """Embedded store: diskcache in ``directory``. Entries expire at their TTL."""

    def __init__(self, directory: Path, *, size_limit: int = 4 * 2**30) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(str(directory), size_limit=size_limit)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    def get_sync(self, key: str) -> CacheEntry | None:
        blob = self._cache.get(key)
        if not isinstance(blob, bytes):
            return None
        try:
            return decode_entry(blob)
        except EntryDecodeError:
            log.warning("cache.disk.corrupt_entry", extra={"key": key})
            return None

    async def get(self, key: str) -> CacheEntry | None:
        return self.get_sync(key)

    async def get_many(self, keys: Collection[str]) -> dict[str, CacheEntry]:
        found = {k: self.get_sync(k) for k in keys}
        return {k: e for k, e in found.items() if e is not None}

    def put_sync(self, entry: CacheEntry) -> None:
        self._cache.set(entry.meta.key, encode_entry(entry), expire=entry.meta.ttl)

    async def put(self, entry: CacheEntry) -> None:
        blob = encode_entry(entry)
        await self._run(lambda: self._cache.set(entry.meta.key, blob, expire=entry.meta.ttl))

    async def delete(self, keys: Collection[str]) -> int:
        def delete_all() -> int:
            return sum(1 for k in keys if self._cache.delete(k))

        return await self._run(delete_all)

    def _iter_blobs(self) -> Iterator[tuple[str, bytes]]:
        for key in self._cache.iterkeys():
            blob = self._cache.get(key)
            if isinstance(key, str) and isinstance(blob, bytes):
                yield key, blob

    async def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        blobs = self._iter_blobs()

        def next_batch() -> list[CacheEntry]:
            batch: list[CacheEntry] = []
            for _key, blob in blobs:
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
        def sweep() -> list[EntryMeta]:
            deleted: list[EntryMeta] = []
            for key, blob in list(self._iter_blobs()):
                try:
                    meta = decode_entry(blob, with_embedding=False).meta
                except EntryDecodeError:
                    self._cache.delete(key)
                    continue
                if predicate(meta) and self._cache.delete(key):
                    deleted.append(meta)
            return deleted

        return await self._run(sweep)

    async def count(self) -> int:
        return await self._run(lambda: len(self._cache))

    async def close(self) -> None:
        await self._run(self._cache.close)
        self._writer.shutdown(wait=True)

    def close_sync(self) -> None:
        self._cache.close()
        self._writer.shutdown(wait=True)
