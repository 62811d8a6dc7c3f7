"""CPU per entry of the disk store's batch write, against one diskcache ``set`` per entry.

    .venv/bin/python scripts/bench_disk_writer.py [--entries 4400] [--prefill 10000]

Both write the same batches (hashed keys like the cache's, ~700-byte answers) into a diskcache
that already holds ``--prefill`` entries, one transaction per batch and one cull after it, as the
writer process does: ``write_batch`` (proxy/cache/disk_writer.py: one upsert for the batch's
inline entries) and the reference, a ``set`` per entry. Figures are process CPU time (user +
system, so SQLite's own page writes count), the minimum over ``--rounds`` rounds.
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

from proxy.cache.disk_writer import write_batch  # noqa: E402

Items = list[tuple[str, bytes, float]]


def set_each(cache: diskcache.Cache, items: Items) -> None:
    """The reference: what ``write_batch`` did before it wrote rows itself."""
    with cache.transact():
        now = time.time()
        for key, blob, expires in items:
            cache.set(key, blob, expire=expires - now)
    cache.cull()


def batches(counter: Iterator[int], size: int, count: int) -> Iterator[Items]:
    blob = os.urandom(700)
    for _ in range(count):
        keys = (hashlib.sha256(str(next(counter)).encode()).hexdigest() for _ in range(size))
        yield [(key, blob, time.time() + 3600) for key in keys]


def cpu_per_entry(
    write: Callable[[diskcache.Cache, Items], None], batch: int, entries: int, prefill: int
) -> float:
    with tempfile.TemporaryDirectory(prefix="frugal-writer-") as directory:
        cache = diskcache.Cache(directory, size_limit=4 * 2**30, cull_limit=0)
        counter = itertools.count()
        for items in batches(counter, 100, prefill // 100):
            write_batch(cache, items)
        work = list(batches(counter, batch, max(1, entries // batch)))
        started = time.process_time()
        for items in work:
            write(cache, items)
        spent = time.process_time() - started
        cache.close()
    return spent * 1e6 / (len(work) * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=4400, help="entries written per measure")
    parser.add_argument("--prefill", type=int, default=10_000)
    parser.add_argument("--batches", default="1,11,64", help="batch sizes to measure")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"prefill {args.prefill}, {args.entries} entries per measure; µs of CPU per entry")
    for batch in (int(b) for b in args.batches.split(",")):
        writers = {"write_batch": write_batch, "set per entry": set_each}
        found: dict[str, list[float]] = {name: [] for name in writers}
        for _ in range(args.rounds):  # interleaved: the machine is shared
            for name, write in writers.items():
                found[name].append(cpu_per_entry(write, batch, args.entries, args.prefill))
        line = ", ".join(f"{name} {min(values):.1f}" for name, values in found.items())
        print(f"batch {batch:3}: {line}", flush=True)
    print("load average", ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
