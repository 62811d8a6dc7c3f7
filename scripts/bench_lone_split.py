"""A lone question's encoder pass with and without its shared layers' rows split over two threads.

    .venv/bin/python scripts/bench_lone_split.py [--per-bucket 15] [--repeats 3]

The packed encoder (the proxy's runtime, ``split_single`` as the proxy builds it) encodes each
question of ../shared/data/cache_paraphrases_mock.json.gz alone, from a worker thread like the
embedding worker's, once with the row split (``SPLIT_ROWS`` at its value) and once without it
(``SPLIT_ROWS`` out of reach), interleaved; medians per 16-token bucket of question length. The
split's threshold ``SPLIT_ROWS`` comes from this table: below it the barriers cost more than the
halved products save.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "cache_paraphrases_mock.json.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-bucket", type=int, default=15, help="questions per length bucket")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from proxy.cache import packed_encoder
    from proxy.cache.verifier import Verifier

    torch.set_num_threads(1)  # as the proxy: one torch thread per encoding thread
    encoder = packed_encoder.pack_verifier(Verifier.load(), split_single=True)
    encoder.warm_shapes()
    threshold = packed_encoder.SPLIT_ROWS
    with gzip.open(DATA, "rt") as f:
        rows = json.load(f)
    texts = sorted({row[k] for row in rows for k in ("origin", "similar") if row.get(k)}, key=len)
    buckets: dict[int, list[str]] = {}
    for text in texts:
        tokens = len(encoder._tokens.encode(text).ids)
        buckets.setdefault(min(tokens // 16 * 16, 112), []).append(text)
    print(f"SPLIT_ROWS = {threshold}; precision {encoder.precision}; medians of "
          f"{args.repeats} passes over up to {args.per_bucket} questions a bucket\n")  # fmt: skip
    print("| tokens | questions | whole on one thread (ms) | rows split (ms) | saved (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with ThreadPoolExecutor(1, thread_name_prefix="embed") as worker:
        for bucket in sorted(buckets):
            sample = buckets[bucket][: args.per_bucket]
            times: dict[int, list[float]] = {threshold: [], 10**9: []}
            for text in sample:
                for _ in range(args.repeats):
                    for rows_from in times:
                        packed_encoder.SPLIT_ROWS = rows_from
                        started = time.perf_counter()
                        worker.submit(encoder.encode, [text]).result()
                        times[rows_from].append(time.perf_counter() - started)
            whole, split = (1000 * statistics.median(times[k]) for k in (10**9, threshold))
            print(f"| {bucket}-{bucket + 15} | {len(sample)} | {whole:.2f} | {split:.2f} | "
                  f"{whole - split:+.2f} |")  # fmt: skip
    packed_encoder.SPLIT_ROWS = threshold
    encoder.close()


if __name__ == "__main__":
    main()
