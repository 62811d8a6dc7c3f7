"""Where the disk store's batches are written: on a thread of the proxy, or in a writer process.

``DiskStore`` queues answers and hands them over in batches (write-behind, see store.py). A
batch is one SQLite transaction (``write_batch``: one upsert for the entries stored inline, as
diskcache's own ``set`` would store them, ``set`` for file-sized ones), and on a thread of the
proxy its Python part competes with the event loop for the GIL.

How entries sit in diskcache's table: each under an integer id, not under its cache key. The
proxy numbers its puts (``DiskStore``), and a table of our own beside diskcache's,
``Frugal_keys``, maps each id to its cache key. A cache key is a sha256 digest: as diskcache's
key, every put landed on a random page of its key index, and SQLite's work per entry (~21 µs of
CPU, batches of 12 in a store of 30,000) was what made the cache's one-connection p99: the
writer's work on the other core slowed the engine's answers (docs/benchmarks.md). Ids that only
grow append to the right edge of every index (~9 µs). The id table is kept in step by a trigger:
whatever deletes a row (diskcache's eviction and expiry, a delete, an invalidation) deletes its
id's key. Under load the loop then waits for the writer at every hand-over (in
``scripts/bench_cpu_ab.py --config frugal-full`` the writes cost the proxy ~60 µs of CPU per
answer, four times their own cost, and the answers that meet a batch make the one-connection
p99). ``ProcessWriter`` moves the writes into a child process that owns no other work: the proxy
only encodes each entry and writes one framed batch to a pipe, and reads a short acknowledgement
once it is committed.

Both writers keep the store's contract: ``write`` returns once the batch is committed (a
``flush`` that waits for it sees it on disk), and raises if it was not. A writer process that
dies (or stops answering) is reported and the store carries on with a thread writer, starting
with the batch that found the process gone (the cache has counted those answers stored), until
a new process is started a little later: a proxy running for weeks does not keep paying the
thread's cost for one lost child.

The pipe protocol (little-endian): a batch is ``<II`` (payload bytes, entries) and then per entry
``<IIdqq`` (key bytes, blob bytes, expiry as a Unix time, id, replaced id or 0) followed by the
key (UTF-8) and the blob;
the child answers ``<Ii`` (entries, status): status 0 committed, 1 failed (the child logged why
on its stderr, which is the proxy's: the first of failures in a row, then that they ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Final, Protocol

import diskcache

from proxy.cache.entry import CacheEntry, encode_entry

log = logging.getLogger(__name__)

# (entry, expiry as a Unix time, id, the id of the entry it replaces or 0)
Queued = tuple[CacheEntry, float, int, int]
Batch = list[Queued]
# (id, cache key, encoded entry, expiry as a Unix time, replaced id or 0)
Row = tuple[int, str, bytes, float, int]
BATCH = struct.Struct("<II")
_ITEM = struct.Struct("<IIdqq")
ACK = struct.Struct("<Ii")
OK, FAILED = 0, 1

# SQLite's WAL is written back into the database (a checkpoint, with its fsync) once it holds
# this many pages, not SQLite's default 1,000: every answer is a new row, and a checkpoint
# writes each page once however many rows changed it since the last, so fewer checkpoints write
# far fewer pages (the writer's CPU an entry, batches of 25 in a store of 30,000: 26.5 -> 20.5
# µs). The WAL file grows to ~40 MB; commits stay as durable as before. A diskcache setting, so
# every connection to the store, the proxy's own included, uses it.
DISKCACHE_SETTINGS: Final = {"sqlite_wal_autocheckpoint": 10_000}

# The id -> cache key table, and the trigger that deletes an id's key with its row. Rows of
# another format (a text key: this store before ids) are not ours to read: ``prepare`` drops them.
_KEYS_TABLE = "CREATE TABLE IF NOT EXISTS Frugal_keys (id INTEGER PRIMARY KEY, key TEXT NOT NULL)"
_KEYS_TRIGGER = (
    "CREATE TRIGGER IF NOT EXISTS Frugal_keys_gone AFTER DELETE ON Cache FOR EACH ROW"
    " BEGIN DELETE FROM Frugal_keys WHERE id = OLD.key; END"
)
_INSERT_KEY = "INSERT OR REPLACE INTO Frugal_keys (id, key) VALUES (?, ?)"
_OLD_ROWS = "SELECT key FROM Cache WHERE typeof(key) != 'integer' OR raw != 1"
# Cull (expired entries, then the oldest past the size limit) once a second or once this share
# of the size limit has been written since the last, not after every batch (its queries cost
# ~4 µs an entry): the limit may be passed by that much for a moment.
CULL_EVERY_S: Final = 1.0
CULL_SHARE: Final = 0.01


def prepare(cache: diskcache.Cache) -> int:
    """Make the id table and its trigger (idempotent), and drop rows not keyed by an id; returns
    how many were dropped."""
    cache._sql(_KEYS_TABLE)
    cache._sql(_KEYS_TRIGGER)
    old = [key for (key,) in cache._sql(_OLD_ROWS).fetchall()]
    if old:
        with cache.transact(retry=True):  # (one transaction: a large old store drops at once)
            for key in old:
                cache.delete(key)
    return len(old)


def stored_ids(cache: diskcache.Cache) -> list[tuple[str, int]]:
    """(cache key, id) of every entry stored, oldest first."""
    return cache._sql("SELECT key, id FROM Frugal_keys ORDER BY id").fetchall()  # type: ignore[no-any-return]


def key_of(cache: diskcache.Cache, id_: int) -> str | None:
    """The cache key stored under ``id_`` (None: no entry)."""
    row = cache._sql("SELECT key FROM Frugal_keys WHERE id = ?", (id_,)).fetchone()
    return None if row is None else str(row[0])


def last_id(cache: diskcache.Cache) -> int:
    """The highest id stored (0 in an empty store). (An entry's row and its id's key are
    written and deleted together; an id deleted may be numbered again, its row being gone.)"""
    ((top,),) = cache._sql("SELECT coalesce(max(id), 0) FROM Frugal_keys").fetchall()
    return int(top)


class BatchWriter(Protocol):
    async def write(self, batch: Batch) -> None:
        """Commit ``batch`` to the store's directory; raises if it was not committed."""
        ...

    async def close(self) -> None: ...


# One statement for a whole batch of inline entries, writing the row ``Cache.set`` would write
# for an integer key (an id) and a bytes value below ``min_file_size`` (diskcache 5.6's table:
# raw key, value inline in MODE_RAW, size 0). An upsert, not INSERT OR REPLACE: diskcache keeps
# its count and size totals with triggers, and REPLACE's implicit delete fires none (its insert
# would count a replaced row twice); the upsert's UPDATE fires the size trigger as ``set``'s own
# UPDATE does (only a batch written again takes that path: every id is new). Batches of 12 in a
# store of 30,000: 11.8 µs of CPU an entry, against 24.9 for this upsert keyed by the cache keys
# themselves and 31.0 through ``set`` (scripts/bench_disk_writer.py). On this 2-core machine
# every µs the writer spends slows whichever request shares its core.
_UPSERT_INLINE = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size,"
    " mode, filename, value) VALUES (?, 1, ?, ?, ?, 0, NULL, 0, ?, NULL, ?)"
    " ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time,"
    " expire_time = excluded.expire_time, access_time = excluded.access_time, access_count = 0,"
    " tag = NULL, size = 0, mode = excluded.mode, filename = NULL, value = excluded.value"
)


class CullSchedule:
    """When a writer culls: see ``CULL_EVERY_S``."""

    def __init__(self, size_limit: int) -> None:
        self._step = size_limit * CULL_SHARE
        self._written = 0
        self._at = 0.0  # (monotonic)

    def due(self, rows: list[Row]) -> bool:
        for row in rows:
            self._written += len(row[2])
        now = time.monotonic()
        if self._written < self._step and now < self._at:
            return False
        self._written = 0
        self._at = now + CULL_EVERY_S
        return True


def write_batch(cache: diskcache.Cache, rows: list[Row], *, cull: bool = True) -> None:
    """One transaction for the batch; then, with ``cull``, diskcache's cull (the store opens
    diskcache with ``cull_limit=0``: no expired-entry query inside every write).

    Entries small enough to live in the database row go in with one upsert; larger ones, which
    diskcache keeps in files, through ``Cache.set``. Each id is new (a batch written again
    after its writer was lost rewrites the same rows), so no inline row replaces a file. The
    entries a put replaces (the same key put before, under an older id) are deleted."""
    limit = cache.disk.min_file_size
    now = time.time()
    replaced = {row[4] for row in rows if row[4]}
    if replaced:  # a key put twice in one batch: only its last put is written
        rows = [row for row in rows if row[0] not in replaced]
    # the TTL runs from the put, not from this later write: the expiry is the put's
    inline = [
        (id_, now, expires, now, diskcache.core.MODE_RAW, blob)
        for id_, _, blob, expires, _ in rows
        if len(blob) < limit
    ]
    with cache.transact():
        if inline:
            cache._con.executemany(_UPSERT_INLINE, inline)
        for id_, _, blob, expires, _ in rows:
            if len(blob) >= limit:
                cache.set(id_, blob, expire=expires - now)
        cache._con.executemany(_INSERT_KEY, [(id_, key) for id_, key, *_ in rows])
        for id_ in replaced:
            cache.delete(id_)  # (its id's key goes with it: the trigger)
    if cull:
        cache.cull()


def _encoded(batch: Batch) -> list[Row]:
    return [
        (id_, entry.meta.key, encode_entry(entry), expires, replaced)
        for entry, expires, id_, replaced in batch
    ]


class ThreadWriter:
    """Writes on the store's own thread with the store's diskcache handle."""

    def __init__(self, cache: diskcache.Cache, executor: ThreadPoolExecutor) -> None:
        self._cache = cache
        self._executor = executor
        self._culls = CullSchedule(cache.size_limit)

    def _write(self, batch: Batch) -> None:
        rows = _encoded(batch)
        write_batch(self._cache, rows, cull=self._culls.due(rows))

    async def write(self, batch: Batch) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batch)

    async def close(self) -> None:
        pass


def frame(items: list[Row]) -> bytes:
    parts: list[bytes] = []
    for id_, key, blob, expires, replaced in items:
        raw = key.encode()
        parts += (_ITEM.pack(len(raw), len(blob), expires, id_, replaced), raw, blob)
    payload = b"".join(parts)
    return BATCH.pack(len(payload), len(items)) + payload


def unframe(payload: bytes, count: int) -> list[Row]:
    items: list[Row] = []
    at = 0
    for _ in range(count):
        key_len, blob_len, expires, id_, replaced = _ITEM.unpack_from(payload, at)
        at += _ITEM.size
        key = payload[at : at + key_len].decode()
        at += key_len
        items.append((id_, key, payload[at : at + blob_len], expires, replaced))
        at += blob_len
    if at != len(payload):
        raise ValueError(f"batch frame of {len(payload)} bytes holds {at} bytes of entries")
    return items


class ProcessWriter:
    """Writes in a child process (``python -m proxy.cache.disk_writer DIR SIZE_LIMIT``), one
    batch in flight at a time; started with the first batch. When the child is gone (killed,
    crashed, cannot start) or stuck (no acknowledgement within ``ack_timeout_s``: it is killed),
    this batch and those of the next ``retry_s`` go to ``fallback`` (a thread writer), then a new
    child is started; ``retry_s`` doubles with each child lost in a row, up to ``retry_max_s``.
    Each loss is logged and told to ``on_gone``."""

    def __init__(
        self,
        directory: Path,
        size_limit: int,
        fallback: Callable[[], BatchWriter],
        *,
        on_gone: Callable[[BaseException], None] | None = None,
        # Far above a batch's own time (milliseconds) and SQLite's wait for a lock diskcache
        # holds (60 s): only a child that will never answer (stopped, wedged) meets it.
        ack_timeout_s: float = 120.0,
        retry_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self._directory = directory
        self._size_limit = size_limit
        self._fallback_factory = fallback
        self._fallback: BatchWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._on_gone = on_gone
        self._ack_timeout_s = ack_timeout_s
        self._retry_s = self._retry_first_s = retry_s
        self._retry_max_s = retry_max_s
        self._retry_at = 0.0  # (monotonic) until then batches go to the fallback

    async def _child(self) -> asyncio.subprocess.Process:
        if self._process is None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.cache.disk_writer",
                str(self._directory),
                str(self._size_limit),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # Out of the terminal's process group: a Ctrl-C meant for the proxy must not
                # stop the writer before the proxy's last flush reaches it.
                start_new_session=True,
            )
        return self._process

    async def write(self, batch: Batch) -> None:
        if self._fallback is not None and time.monotonic() < self._retry_at:
            await self._fallback.write(batch)
            return
        items = _encoded(batch)
        try:
            async with asyncio.timeout(self._ack_timeout_s):
                child = await self._child()
                assert child.stdin is not None and child.stdout is not None
                if child.stdin.is_closing():
                    # The child has exited: say so as asyncio's pipe would. uvloop's (the
                    # proxy's loop) raises RuntimeError on a write to it, which fell through to
                    # the store as a failed batch, every batch, for ever.
                    raise BrokenPipeError(f"the writer process exited ({child.returncode})")
                child.stdin.write(frame(items))
                await child.stdin.drain()
                count, status = ACK.unpack(await child.stdout.readexactly(ACK.size))
        except asyncio.CancelledError:
            # This batch's acknowledgement is still on its way: a later batch must not read it
            # as its own. That child is let go; the next batch starts another.
            self._abandon()
            raise
        except (OSError, asyncio.IncompleteReadError) as exc:  # (TimeoutError is an OSError)
            await self._lost(exc)
            assert self._fallback is not None
            # Written again on the thread: the child may have committed it before dying, but
            # an upsert of the same entries is harmless, and a batch dropped here would be
            # answers the cache counted stored yet never served.
            await self._fallback.write(batch)
            return
        self._retry_s = self._retry_first_s  # this child works: a later loss starts over
        if status != OK or count != len(items):
            raise OSError(f"the writer process did not commit the batch (status {status})")

    async def _lost(self, error: BaseException) -> None:
        """The child is gone or stuck: let it go, write on the fallback for a while."""
        stuck = isinstance(error, TimeoutError)
        log.warning(
            "cache.disk.writer_process_stuck" if stuck else "cache.disk.writer_process_gone",
            extra={
                "pid": self._process.pid if self._process else None,
                "error": repr(error),
                "retry_s": self._retry_s,
            },
        )
        if self._on_gone is not None:
            self._on_gone(error)
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(2 * self._retry_s, self._retry_max_s)
        if stuck:
            self._abandon()  # it would not read the end of its input either
        else:
            await self._stop()

    def _abandon(self) -> None:
        child, self._process = self._process, None
        if child is not None and child.returncode is None:
            child.kill()  # asyncio's child watcher reaps it

    async def _stop(self) -> None:
        child, self._process = self._process, None
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()
            with contextlib.suppress(OSError):
                await child.stdin.wait_closed()
        try:
            async with asyncio.timeout(30):
                await child.wait()  # it commits what it has read, then exits on end of input
        except TimeoutError:
            child.kill()
            await child.wait()

    async def close(self) -> None:
        await self._stop()
        if self._fallback is not None:
            await self._fallback.close()


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes, or None at a clean end of input between batches."""
    data = stream.read(size)
    if not data:
        return None
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            raise EOFError(f"input ended inside a batch ({len(data)} of {size} bytes)")
        data += more
    return data


def serve(directory: Path, size_limit: int, source: BinaryIO, sink: BinaryIO) -> int:
    """The writer process: commit each batch read from ``source``, acknowledge it on ``sink``;
    return at the end of input (the proxy closed the pipe, or died)."""
    cache = diskcache.Cache(
        str(directory), size_limit=size_limit, cull_limit=0, **DISKCACHE_SETTINGS
    )
    prepare(cache)  # (the proxy made them when it opened the store: nothing to do but check)
    culls = CullSchedule(size_limit)
    failing = 0  # batches failed in a row: a full disk is logged when it fills and empties
    try:
        while (head := _read_exactly(source, BATCH.size)) is not None:
            size, count = BATCH.unpack(head)
            payload = _read_exactly(source, size) if size else b""
            if payload is None:
                raise EOFError("input ended inside a batch")
            status = OK
            try:
                rows = unframe(payload, count)
                write_batch(cache, rows, cull=culls.due(rows))
            except Exception:
                if not failing:
                    log.exception("cache.disk.writer_batch_failed")
                failing += 1
                status = FAILED
            else:
                if failing:
                    log.warning("cache.disk.writer_recovered after %d failed batches", failing)
                failing = 0
            sink.write(ACK.pack(count, status))
            sink.flush()
    finally:
        cache.close()
    return 0


def main(argv: list[str]) -> int:
    # The proxy decides when the writer stops (by closing the pipe); signals for the proxy's
    # group are not for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="frugal disk writer %(process)d: %(message)s")
    directory, size_limit = Path(argv[0]), int(argv[1])
    with os.fdopen(0, "rb", buffering=1 << 16) as source, os.fdopen(1, "wb") as sink:
        return serve(directory, size_limit, source, sink)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
