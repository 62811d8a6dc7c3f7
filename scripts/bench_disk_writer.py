"""CPU per entry of the disk store's batch write: rows keyed by id, against rows keyed by the
cache key (the store before ids) and one diskcache ``set`` per entry.

    .venv/bin/python scripts/bench_disk_writer.py [--entries 4400] [--prefill 10000]

Each writer writes the same batches (~700-byte answers, sha256 cache keys like the cache's) into
a diskcache that already holds ``--prefill`` entries, one transaction per batch, as the writer
process does:
- ``write_batch`` (proxy/cache/disk_writer.py): each entry under a new id, its cache key in the
  id table, culling as the writer process culls (``CullSchedule``);
- ``by cache key``: one upsert of the batch keyed by the cache keys themselves, and a cull after
  every batch (what ``write_batch`` did before ids);
- ``set per entry``: ``Cache.set`` per entry, and a cull after the batch.
Figures are process CPU time (user + system, so SQLite's own page writes count), the minimum over
``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import diskcache

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.cache.disk_writer import (  # noqa: E402
    _UPSERT_INLINE,
    CullSchedule,
    Row,
    prepare,
    write_batch,
)

Writer = Callable[[diskcache.Cache, list[Row]], None]


def by_id() -> Writer:
    culls: CullSchedule | None = None

    def write(cache: diskcache.Cache, rows: list[Row]) -> None:
        nonlocal culls
        if culls is None:
            culls = CullSchedule(cache.size_limit)
        write_batch(cache, rows, cull=culls.due(rows))

    return write


def by_cache_key() -> Writer:
    def write(cache: diskcache.Cache, rows: list[Row]) -> None:
        now = time.time()
        with cache.transact():
            cache._con.executemany(
                _UPSERT_INLINE,
                [
                    (key, now, expires, now, diskcache.core.MODE_RAW, blob)
                    for _, key, blob, expires, _ in rows
                ],
            )
        cache.cull()

    return write


def set_each() -> Writer:
    def write(cache: diskcache.Cache, rows: list[Row]) -> None:
        with cache.transact():
            now = time.time()
            for _, key, blob, expires, _ in rows:
                cache.set(key, blob, expire=expires - now)
        cache.cull()

    return write


WRITERS: dict[str, Callable[[], Writer]] = {
    "write_batch": by_id,
    "by cache key": by_cache_key,
    "set per entry": set_each,
}


def batches(counter: Iterator[int], size: int, count: int) -> Iterator[list[Row]]:
    blob = os.urandom(700)
    for _ in range(count):
        ids = [next(counter) for _ in range(size)]
        yield [
            (id_, hashlib.sha256(str(id_).encode()).hexdigest(), blob, time.time() + 3600, 0)
            for id_ in ids
        ]


def cpu_per_entry(make: Callable[[], Writer], batch: int, entries: int, prefill: int) -> float:
    with tempfile.TemporaryDirectory(prefix="frugal-writer-") as directory:
        cache = diskcache.Cache(directory, size_limit=4 * 2**30, cull_limit=0)
        prepare(cache)
        write = make()
        counter = itertools.count(1)
        for rows in batches(counter, 100, prefill // 100):
            write(cache, rows)  # (the store as this writer would have filled it)
        work = list(batches(counter, batch, max(1, entries // batch)))
        started = time.process_time()
        for rows in work:
            write(cache, rows)
        spent = time.process_time() - started
        cache.close()
    return spent * 1e6 / (len(work) * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=4400, help="entries written per measure")
    parser.add_argument("--prefill", type=int, default=10_000)
    parser.add_argument("--batches", default="1,12,64", help="batch sizes to measure")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"prefill {args.prefill}, {args.entries} entries per measure; µs of CPU per entry")
    for batch in (int(b) for b in args.batches.split(",")):
        found: dict[str, list[float]] = {name: [] for name in WRITERS}
        for _ in range(args.rounds):  # interleaved: the machine is shared
            for name, make in WRITERS.items():
                found[name].append(cpu_per_entry(make, batch, args.entries, args.prefill))
        line = ", ".join(f"{name} {min(values):.1f}" for name, values in found.items())
        print(f"batch {batch:3}: {line}", flush=True)
    print("load average", ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
