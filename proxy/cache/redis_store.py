"""Fleet cache store: Redis, shared by every proxy replica.

Layout under ``prefix``:
- ``{prefix}:e:{exact key}``: the encoded entry (``entry.py``), expiring with the entry's TTL;
- ``{prefix}:new``: a stream of newly stored keys (capped), which every replica follows to add
  other replicas' entries to its own semantic index.

Replicas rebuild their index from a full scan at start-up and after any outage (``Resync``): the
stream position is taken *before* the scan, so nothing stored during the scan is missed.
Entries invalidated or expired elsewhere stay in a replica's index until a lookup finds them gone
(the service then drops them): the store, not the index, is the source of truth.

When Redis is unreachable every operation fails fast with ``CacheBackendError`` (short socket
timeouts, no client retries, and for ``retry_after`` seconds after a failure no attempt at all, so
requests do not each pay a connect timeout); the cache turns that into misses. Recovery is
automatic: the next attempt after ``retry_after`` reconnects.

A failed operation is reported (counted, logged) by whoever called it, as the cache does with
every store; ``on_error`` hears only of what no caller sees: the follower's failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.backoff import Backoff
from proxy.cache.entry import CacheEntry, EntryDecodeError, EntryMeta, decode_entry, encode_entry
from proxy.cache.store import CacheBackendError, EntryAdded, Resync
from proxy.tasks import cancelling

log = logging.getLogger(__name__)

_T = TypeVar("_T")
SCAN_COUNT = 1000
_FAILURES = (RedisError, ConnectionError, TimeoutError, OSError)


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "frugal:cache",
        timeout: float = 0.5,
        retry_after: float = 1.0,
        stream_maxlen: int = 200_000,
        follow_block_ms: int = 1000,
        on_error: Callable[[str, BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self._entry_prefix = f"{prefix}:e:"
        self._stream = f"{prefix}:new"
        self._backoff = Backoff(retry_after, clock)
        self._maxlen = stream_maxlen
        self._block_ms = follow_block_ms
        self._on_error = on_error
        no_retry = Retry(NoBackoff(), 0)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retry
        )
        # The follower blocks in XREAD, so it needs its own connection with a longer timeout.
        self._follow_client = redis.Redis.from_url(
            url,
            socket_timeout=timeout + follow_block_ms / 1000.0,
            socket_connect_timeout=timeout,
            retry=no_retry,
        )

    def _key(self, key: str) -> str:
        return self._entry_prefix + key

    async def _call(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        if self._backoff.waiting():
            raise CacheBackendError(f"redis unavailable (retrying after back-off): {operation}")
        try:
            return await call()
        except _FAILURES as exc:
            self._backoff.failed()
            raise CacheBackendError(f"redis {operation} failed: {exc}") from exc

    @staticmethod
    def _decode(blob: Any) -> CacheEntry | None:
        if not isinstance(blob, bytes):
            return None
        try:
            return decode_entry(blob)
        except EntryDecodeError:
            return None

    async def get(self, key: str) -> CacheEntry | None:
        blob = await self._call("get", lambda: self._client.get(self._key(key)))
        return self._decode(blob)

    async def get_many(self, keys: Collection[str]) -> dict[str, CacheEntry]:
        wanted = list(keys)
        if not wanted:
            return {}
        blobs = await self._call("mget", lambda: self._client.mget([self._key(k) for k in wanted]))
        found = {k: self._decode(b) for k, b in zip(wanted, blobs, strict=True)}
        return {k: e for k, e in found.items() if e is not None}

    async def put(self, entry: CacheEntry) -> None:
        blob = encode_entry(entry)
        ttl_ms = max(1, int(entry.meta.ttl * 1000))

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key(entry.meta.key), blob, px=ttl_ms)
                pipe.xadd(
                    self._stream, {"k": entry.meta.key}, maxlen=self._maxlen, approximate=True
                )
                await pipe.execute()

        await self._call("put", write)

    async def delete(self, keys: Collection[str]) -> int:
        names = [self._key(k) for k in keys]
        if not names:
            return 0
        deleted = await self._call("delete", lambda: self._client.delete(*names))
        return int(deleted)

    async def _scan_names(self) -> AsyncIterator[list[bytes]]:
        cursor = 0
        while True:
            cursor, names = await self._call(
                "scan",
                lambda c=cursor: self._client.scan(  # type: ignore[misc]
                    c, match=self._entry_prefix + "*", count=SCAN_COUNT
                ),
            )
            if names:
                yield [n if isinstance(n, bytes) else str(n).encode() for n in names]
            if cursor == 0:
                return

    async def scan(self, *, with_embedding: bool = True) -> AsyncIterator[CacheEntry]:
        async for names in self._scan_names():
            blobs = await self._call("mget", lambda n=names: self._client.mget(n))  # type: ignore[misc]
            for blob in blobs:
                if not isinstance(blob, bytes):
                    continue  # expired between SCAN and MGET
                try:
                    yield decode_entry(blob, with_embedding=with_embedding)
                except EntryDecodeError:
                    continue

    async def delete_where(self, predicate: Callable[[EntryMeta], bool]) -> list[EntryMeta]:
        deleted: list[EntryMeta] = []
        async for names in self._scan_names():
            blobs = await self._call("mget", lambda n=names: self._client.mget(n))  # type: ignore[misc]
            doomed: list[bytes] = []
            metas: list[EntryMeta] = []
            for name, blob in zip(names, blobs, strict=True):
                if not isinstance(blob, bytes):
                    continue
                try:
                    meta = decode_entry(blob, with_embedding=False).meta
                except EntryDecodeError:
                    doomed.append(name)
                    continue
                if predicate(meta):
                    doomed.append(name)
                    metas.append(meta)
            if doomed:
                await self._call("delete", lambda d=doomed: self._client.delete(*d))  # type: ignore[misc]
                deleted.extend(metas)
        return deleted

    async def count(self) -> int:
        total = 0
        async for names in self._scan_names():
            total += len(names)
        return total

    async def _stream_position(self) -> str:
        last: Any = await self._follow_client.xrevrange(self._stream, count=1)
        return _text(last[0][0]) if last else "0-0"

    async def follow(self) -> AsyncIterator[EntryAdded | Resync]:
        """``Resync`` at start and after every outage, then entries as they are stored."""
        position: str | None = None
        while True:
            try:
                if position is None:
                    position = await self._stream_position()
                    yield Resync()
                reply: Any = await self._follow_client.xread(
                    {self._stream: position}, count=500, block=self._block_ms
                )
                if not reply:
                    continue
                messages = reply[0][1]
                position = _text(messages[-1][0])
                keys = [_text(fields[b"k"]) for _, fields in messages if b"k" in fields]
                blobs = await self._follow_client.mget([self._key(k) for k in keys])
                for blob in blobs:
                    entry = self._decode(blob)
                    if entry is not None:
                        yield EntryAdded(entry)
            except _FAILURES as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc  # a stop that surfaced as a timeout
                if self._on_error is not None:
                    self._on_error("follow", exc)
                log.warning("cache.redis.follow_failed", extra={"error": str(exc)})
                position = None  # we may miss entries while down: resync after reconnecting
                await asyncio.sleep(self._backoff.retry_after)

    async def close(self) -> None:
        await self._client.aclose()
        await self._follow_client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._call("ping", self._client.ping))
        except CacheBackendError:
            return False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
