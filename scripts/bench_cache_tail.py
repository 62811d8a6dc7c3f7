"""The c=1 tail of bench_cache_speed's two semantic phases, for several builds taking turns.

    .venv/bin/python scripts/bench_cache_tail.py \
        --variant before=/tmp/main-export --variant after=. [--rounds 3]

Each round starts, for each variant in turn, a fresh proxy (``python -m proxy serve`` from that
source tree, default settings, cache on, routing off) in front of a zero-delay fake engine and
sends, one request at a time as bench_cache_speed.py does, the originals of
../shared/data/cache_paraphrases_mock.json.gz (misses, stored) and then their paraphrases
(semantic lookups). Requests follow each other at once, so background work a request leaves
behind (a store, a cache audit) lands on the next request, as in bench_cache_speed.py; the
interleaved bench_cache_ab.py sends every text to each proxy in turn, which gives a proxy's
background work the other proxies' requests to finish in and so hides it.

Reports per variant and round: p50 / p99 / max of each phase, and the slowest requests with
their length and outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_cache_ab import launch, launch_fake_engine  # noqa: E402
from bench_cache_speed import CONFIG, DATA, body, free_port, pct, stop, wait_ready  # noqa: E402

Row = tuple[float, int, str]  # latency ms, characters, x-frugal-cache


def parse_variant(text: str) -> tuple[str, Path]:
    name, _, repo = text.partition("=")
    if not name or not repo:
        raise argparse.ArgumentTypeError(f"expected NAME=REPO, got {text!r}")
    return name, Path(repo).resolve()


async def one_run(repo: Path, pairs: list[tuple[str, str]]) -> dict[str, list[Row]]:
    work = Path(tempfile.mkdtemp(prefix="frugal-cache-tail-"))
    engine_port, port = free_port(), free_port()
    config = work / "proxy.yaml"
    config.write_text(
        CONFIG.format(port=port, engine_port=engine_port, cache="true", data_dir=work / "data")
    )
    procs = [
        launch_fake_engine(engine_port, work),
        launch(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            repo,
            work / "proxy.log",
        ),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    phases: dict[str, list[Row]] = {}
    try:
        await wait_ready(url)
        async with aiohttp.ClientSession() as session:

            async def post(text: str) -> Row:
                started = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", json=body(text)) as resp:
                    await resp.read()
                    outcome = resp.headers.get("x-frugal-cache", "?")
                return 1000 * (time.perf_counter() - started), len(text), outcome

            await post("warm-up question one")
            for phase, texts in (
                ("miss", [o for o, _ in pairs]),
                ("lookup", [s for _, s in pairs]),
            ):
                phases[phase] = [await post(text) for text in texts]
                await asyncio.sleep(1.0)  # background stores land (as in bench_cache_speed.py)
    finally:
        for proc in procs:
            stop(proc)
    return phases


async def run(variants: list[tuple[str, Path]], rounds: int, pairs: int) -> str:
    with gzip.open(DATA, "rt") as f:
        rows = json.load(f)
    chosen = [(r["origin"], r["similar"]) for r in rows if r.get("origin") and r.get("similar")]
    chosen = chosen[:pairs]
    lines = [
        f"c=1 tails, {len(chosen)} pairs, {rounds} rounds; load average before "
        f"{[round(x, 1) for x in os.getloadavg()]}",
        "",
        "| variant | round | phase | p50 ms | p99 ms | max ms | slowest: ms, characters, outcome |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in range(rounds):
        for name, repo in variants:
            phases = await one_run(repo, chosen)
            for phase, results in phases.items():
                latencies = [lat / 1000 for lat, _, _ in results]
                slowest = sorted(results, reverse=True)[:3]
                lines.append(
                    f"| {name} | {r + 1} | {phase} | {pct(latencies, 0.5):.1f} "
                    f"| {pct(latencies, 0.99):.1f} | {max(latencies) * 1000:.1f} | "
                    + ", ".join(f"{lat:.1f} {n} {outcome}" for lat, n, outcome in slowest)
                    + " |"
                )
    lines.append("")
    lines.append(f"load average after {[round(x, 1) for x in os.getloadavg()]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    print(asyncio.run(run(args.variant, args.rounds, args.pairs)))


if __name__ == "__main__":
    main()
