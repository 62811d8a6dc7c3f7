"""Benchmark the cache's semantic index (and, optionally, the disk store and the embedder).

    .venv/bin/python scripts/bench_index.py --n 1000000            # ANN build + search at 1M
    .venv/bin/python scripts/bench_index.py --n 100000 --store --embed

Index: builds one ``SemanticIndex`` partition of ``--n`` synthetic unit vectors (clustered, like
sentence embeddings of related questions), then times single-query ``search`` calls through the
same code path the cache uses (normalisation, usearch HNSW, result conversion) and measures
recall@1 against exact brute force on a sample. Target: p99 <= 2 ms at 1,000,000 entries.

Store: per-operation latency of the diskcache store (reads run inline on the event loop, so they
must stay far below a millisecond) and the worst event-loop stall while writes run.

Embed: all-MiniLM-L6-v2 throughput per batch size, and through ``EmbeddingWorker`` under load.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.cache.entry import CacheEntry, EntryMeta
from proxy.cache.index import HnswParams, SemanticIndex, _Hnsw, _Partition
from proxy.cache.store import DiskStore


def log(message: str) -> None:
    print(message, flush=True)


def percentiles(samples_s: list[float]) -> str:
    ms = np.array(samples_s) * 1000
    return (
        f"p50 {np.percentile(ms, 50):.3f} ms  p90 {np.percentile(ms, 90):.3f} ms  "
        f"p99 {np.percentile(ms, 99):.3f} ms  max {ms.max():.3f} ms"
    )


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 2000) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        stop = min(n, start + step)
        picks = rng.integers(0, clusters, stop - start)
        block = centres[picks] + 0.8 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build_index(args: argparse.Namespace, data: np.ndarray, params: HnswParams) -> SemanticIndex:
    index = SemanticIndex(args.dim, flat_limit=1, hnsw=params)  # one big graph
    path = Path(args.index_file) if args.index_file else None
    if path is not None and path.exists():
        # reuse a saved graph (search parameters can be swept without a rebuild)
        index._partitions["p"] = _Partition(args.dim)
        graph = _Hnsw(args.dim, params)
        graph.index.load(str(path))
        index._partitions["p"].flat = None
        index._partitions["p"].hnsw = graph
        log(f"loaded {len(index):,} vectors from {path}")
        return index
    labels = np.arange(args.n, dtype=np.uint64)
    log(f"building (usearch HNSW {params}) ...")
    started = time.perf_counter()
    # one bulk add, as the start-up rebuild does; progress every 10%
    chunk = max(1, args.n // 10)
    index.add_many("p", labels[:chunk].tolist(), data[:chunk])
    for begin in range(chunk, args.n, chunk):
        part = index._partitions["p"]
        assert part.hnsw is not None
        part.hnsw.add_many(labels[begin : begin + chunk], data[begin : begin + chunk])
        log(f"  {min(args.n, begin + chunk):,} added, {time.perf_counter() - started:.1f} s")
    build = time.perf_counter() - started
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log(
        f"build: {build:.1f} s ({args.n / build:,.0f} vectors/s, {args.threads} threads), "
        f"peak RSS {rss_gb:.2f} GB (includes the float32 source matrix)"
    )
    if path is not None:
        part = index._partitions["p"]
        assert part.hnsw is not None
        part.hnsw.index.save(str(path))
        log(f"saved the graph to {path}")
    return index


def bench_index(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    log(f"generating {args.n:,} x {args.dim} vectors")
    data = clustered(args.n, args.dim, rng)
    params = HnswParams(
        dtype=args.dtype,
        connectivity=args.connectivity,
        expansion_add=args.expansion_add,
        expansion_search=args.expansion_search,
        threads=args.threads,
    )
    index = build_index(args, data, params)
    graph = index._partitions["p"].hnsw
    assert graph is not None

    # queries: paraphrase-like perturbations of stored vectors, cosine ~args.query_cos to them
    sources = rng.integers(0, args.n, args.queries)
    sigma = np.sqrt((1 / args.query_cos**2 - 1) / args.dim)
    queries = data[sources] + sigma * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    sample = min(args.recall_sample, len(queries))
    unit = queries[:sample] / np.linalg.norm(queries[:sample], axis=1, keepdims=True)
    best = np.full(sample, -np.inf, dtype=np.float32)
    truth = np.zeros(sample, dtype=np.int64)
    for begin in range(0, args.n, 100_000):
        scores = unit @ data[begin : begin + 100_000].T
        local = scores.argmax(axis=1)
        value = scores[np.arange(sample), local]
        better = value > best
        best[better] = value[better]
        truth[better] = local[better] + begin

    for expansion in args.sweep or [args.expansion_search]:
        graph.index.expansion_search = expansion
        for q in queries[:50]:  # warm-up
            index.search("p", q, args.k)
        times: list[float] = []
        cpu: list[float] = []
        results: list[list[int]] = []
        for q in queries:
            t0, c0 = time.perf_counter(), time.thread_time()
            found = index.search("p", q, args.k)
            cpu.append(time.thread_time() - c0)
            times.append(time.perf_counter() - t0)
            results.append([label for label, _ in found])
        top1 = np.mean([results[i][0] == truth[i] for i in range(sample)])
        topk = np.mean([truth[i] in results[i] for i in range(sample)])
        source = np.mean([sources[i] in results[i] for i in range(len(queries))])
        log(
            f"search top-{args.k} at {args.n:,}, expansion_search={expansion}: {percentiles(times)}"
            f"\n    CPU time per search (excludes waiting for a core on a busy host): "
            f"{percentiles(cpu)}"
            f"\n    recall@1 {top1:.3f}, true NN in top-{args.k} {topk:.3f} "
            f"(brute force, {sample} queries); source question in top-{args.k} {source:.3f}"
        )


def bench_store(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    response = b'{"choices": [{"message": {"content": "' + b"x" * 1500 + b'"}}]}'

    def entry(n: int) -> CacheEntry:
        meta = EntryMeta(
            key=f"{n:064x}",
            context="c" * 64,
            endpoint="chat",
            engine="large",
            version="v1",
            partition='["global"]',
            scope="global",
            created_at=time.time(),
            ttl=3600.0,
            compute_seconds=1.0,
            query_text=f"what is the meaning of question {n}?",
        )
        return CacheEntry(meta, response, rng.normal(size=384).astype(np.float32))

    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            store = DiskStore(Path(folder))
            n = args.store_n
            lags: list[float] = []
            stop = asyncio.Event()

            async def watch_loop() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.001)
                    lags.append(time.perf_counter() - t0 - 0.001)

            # baseline: the same loop-lag probe with no cache work (the host's own noise)
            watcher = asyncio.create_task(watch_loop())
            await asyncio.sleep(2.0)
            stop.set()
            await watcher
            baseline, lags = lags, []
            stop.clear()
            watcher = asyncio.create_task(watch_loop())
            puts: list[float] = []
            for i in range(n):
                t0 = time.perf_counter()
                await store.put(entry(i))
                puts.append(time.perf_counter() - t0)
            stop.set()
            await watcher
            gets: list[float] = []
            for i in rng.integers(0, n, n):
                t0 = time.perf_counter()
                found = await store.get(f"{int(i):064x}")
                gets.append(time.perf_counter() - t0)
                assert found is not None
            misses: list[float] = []
            for i in range(n, n + 2000):
                t0 = time.perf_counter()
                await store.get(f"{i:064x}")
                misses.append(time.perf_counter() - t0)
            log(f"disk store, {n} entries of ~2.4 KB:")
            log(f"  put (awaited, writer thread): {percentiles(puts)}")
            log(f"  get hit (inline):  {percentiles(gets)}")
            log(f"  get miss (inline): {percentiles(misses)}")
            log(f"  event-loop lag, idle baseline: {percentiles(baseline)}")
            log(f"  event-loop lag while writing:  {percentiles(lags)}")
            t0 = time.perf_counter()
            count = sum([1 async for _ in store.scan()])
            scan_s = time.perf_counter() - t0
            log(f"  full scan (start-up rebuild): {count} entries in {scan_s:.2f} s")
            await store.close()

    asyncio.run(run())


def bench_embed(args: argparse.Namespace) -> None:
    from proxy.embeddings.minilm import load_minilm
    from proxy.embeddings.worker import EmbeddingWorker

    encode = load_minilm(threads=args.threads)
    words = ["how", "what", "why", "when", "cache", "proxy", "model", "question", "answer"]
    rng = np.random.default_rng(2)
    texts = [" ".join(rng.choice(words, size=rng.integers(6, 20))) for _ in range(512)]
    encode(texts[:8])  # warm-up
    for batch in (1, 8, 32, 64):
        rounds = max(1, 256 // batch)
        t0 = time.perf_counter()
        for r in range(rounds):
            encode(texts[(r * batch) % 256 : (r * batch) % 256 + batch])
        elapsed = time.perf_counter() - t0
        log(
            f"minilm batch {batch:>2}: {rounds * batch / elapsed:,.0f} texts/s, "
            f"{elapsed / rounds * 1000:.1f} ms/batch"
        )

    async def load() -> None:
        sizes: list[int] = []
        async with EmbeddingWorker(encode, on_batch=lambda n, s: sizes.append(n)) as worker:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker.embed(t) for t in texts))
            elapsed = time.perf_counter() - t0
        log(
            f"worker, {len(texts)} concurrent embeds: {len(texts) / elapsed:,.0f} texts/s, "
            f"mean batch {np.mean(sizes):.1f}"
        )

    asyncio.run(load())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--recall-sample", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="i8")
    parser.add_argument("--connectivity", type=int, default=16)
    parser.add_argument("--expansion-add", type=int, default=128)
    parser.add_argument("--expansion-search", type=int, default=256)
    parser.add_argument("--query-cos", type=float, default=0.9, help="query-to-source cosine")
    parser.add_argument("--sweep", type=int, nargs="*", help="expansion_search values to try")
    parser.add_argument("--index-file", help="save the built graph here / load it if present")
    parser.add_argument("--no-index", action="store_true", help="skip the index benchmark")
    parser.add_argument("--store", action="store_true", help="benchmark the diskcache store")
    parser.add_argument("--store-n", type=int, default=5000)
    parser.add_argument("--embed", action="store_true", help="benchmark MiniLM + worker")
    args = parser.parse_args()
    if not args.no_index:
        bench_index(args)
    if args.store:
        bench_store(args)
    if args.embed:
        bench_embed(args)


if __name__ == "__main__":
    main()
