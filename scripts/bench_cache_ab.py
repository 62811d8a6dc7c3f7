"""Semantic-cache latency and CPU of several proxy builds at once, interleaved.

    .venv/bin/python scripts/bench_cache_ab.py \
        --variant before=/tmp/main-export:2 --variant after=.:2 --variant one-thread=.:1 [--c64 4]

Each variant is ``name=REPO:THREADS[:PRECISION]``: a proxy started from that source tree (``python
-m proxy serve`` with ``PYTHONPATH=REPO``) with ``embeddings.threads: THREADS`` (and
``embeddings.precision: PRECISION``, e.g. ``int8``, when given), all in front of one
zero-delay fake engine. The originals of ../shared/data/cache_paraphrases_mock.json.gz (those
the proxy looks up by meaning: bench_cache_speed.semantic_pairs) are sent (misses: stored), then
their paraphrases (semantic lookups), each text to every proxy in rotating order. With ``--c64
ROUNDS``, new texts (semantic lookups, as in bench_cache_speed's c=64 phase) are then sent at
concurrency 64 in rounds of 128 per variant, the variants taking turns. Each
phase reports every proxy's CPU time per request (from ``/proc``), which depends far less on the
machine's load than wall-clock figures. On a shared, busy machine the variants then see the same
load, which back-to-back runs of scripts/bench_cache_speed.py do not: use this for A/B latency
and CPU, that one for absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_cache_speed import (  # noqa: E402
    CONFIG,
    body,
    cpu_seconds,
    free_port,
    semantic_pairs,
    stop,
    timed_posts,
    wait_ready,
)

C64_ROUND = 128  # texts per variant per round of the c=64 phase


def parse_variant(text: str) -> tuple[str, Path, int, str | None]:
    name, _, rest = text.partition("=")
    repo, _, tail = rest.partition(":")
    threads, _, precision = tail.partition(":")
    if not name or not repo or not threads.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=REPO:THREADS[:PRECISION], got {text!r}")
    return name, Path(repo).resolve(), int(threads), precision or None


def launch(command: list[str], repo: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        command, cwd=repo, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def launch_fake_engine(port: int, work: Path) -> subprocess.Popen[bytes]:
    """The zero-delay fake engine every variant talks to (this checkout's), its log in ``work``."""
    command = [sys.executable, "-m", "proxy", "fake-engine", "--port", str(port)]
    return launch([*command, "--model", "bench-model"], REPO, work / "engine.log")


def _sheds(repo: Path) -> bool:
    """Whether that checkout's proxy can shed embeddings (``embeddings.max_queue_ms``)."""
    return "max_queue_ms" in (repo / "proxy" / "settings.py").read_text()


async def run(
    variants: list[tuple[str, Path, int, str | None]], pairs: int, c64_rounds: int = 0
) -> str:
    chosen, _ = semantic_pairs(pairs)
    work = Path(tempfile.mkdtemp(prefix="frugal-cache-ab-"))
    engine_port = free_port()
    procs = [launch_fake_engine(engine_port, work)]
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        for name, repo, threads, precision in variants:
            port = free_port()
            config = work / f"{name}.yaml"
            config.write_text(
                CONFIG.format(
                    port=port, engine_port=engine_port, cache="true", data_dir=work / f"data-{name}"
                )
                + f"embeddings: {{threads: {threads}"
                + (f", precision: {precision}" if precision else "")
                # no shedding, so every c=64 request is a semantic lookup (older checkouts have
                # no such setting and never shed)
                + (", max_queue_ms: null" if _sheds(repo) else "")
                + "}\n"
            )
            command = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
            procs.append(launch(command, repo, work / f"{name}.log"))
            pids[name] = procs[-1].pid
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            await wait_ready(url)
        names = list(urls)
        latencies: dict[tuple[str, str], list[float]] = {
            (n, phase): [] for n in names for phase in ("miss", "lookup")
        }
        outcomes: dict[tuple[str, str], dict[str, int]] = {key: {} for key in latencies}
        cpu_ms: dict[tuple[str, str], float] = {key: 0.0 for key in latencies}
        load_before = os.getloadavg()
        async with aiohttp.ClientSession() as session:

            async def post(name: str, text: str, phase: str) -> None:
                started = time.perf_counter()
                async with session.post(
                    urls[name] + "/v1/chat/completions", json=body(text)
                ) as resp:
                    await resp.read()
                    outcome = resp.headers.get("x-frugal-cache", "?")
                latencies[(name, phase)].append(1000 * (time.perf_counter() - started))
                counts = outcomes[(name, phase)]
                counts[outcome] = counts.get(outcome, 0) + 1

            for name in names:  # model load, connections
                async with session.post(
                    urls[name] + "/v1/chat/completions", json=body("warm-up question one")
                ) as resp:
                    await resp.read()
            for phase, texts in (
                ("miss", [o for o, _ in chosen]),
                ("lookup", [s for _, s in chosen]),
            ):
                for i, text in enumerate(texts):
                    for name in names[i % len(names) :] + names[: i % len(names)]:
                        before = cpu_seconds(pids[name])
                        await post(name, text, phase)
                        cpu_ms[(name, phase)] += 1000 * (cpu_seconds(pids[name]) - before)
                await asyncio.sleep(1.0)  # background stores land
            rates: dict[str, list[float]] = {n: [] for n in names}
            for r in range(c64_rounds):
                fresh = [f"{s} (variant {r}-{i})" for i, (_, s) in enumerate(chosen)]
                fresh = (fresh * (C64_ROUND // max(1, len(fresh)) + 1))[:C64_ROUND]
                fresh = [f"{t} #{j}" for j, t in enumerate(fresh)]  # all new to the worker
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    before = cpu_seconds(pids[name])
                    lat, counts, wall = await timed_posts(session, urls[name], fresh, 64)
                    await asyncio.sleep(0.3)  # the proxy's background work for this round
                    cpu_ms[(name, "c=64")] = cpu_ms.get((name, "c=64"), 0.0) + 1000 * (
                        cpu_seconds(pids[name]) - before
                    )
                    latencies.setdefault((name, "c=64"), []).extend(1000 * x for x in lat)
                    total = outcomes.setdefault((name, "c=64"), {})
                    for key, n in counts.items():
                        total[key] = total.get(key, 0) + n
                    rates[name].append(len(fresh) / wall)
        load_after = os.getloadavg()
    finally:
        for proc in procs:
            stop(proc)
    lines = [
        f"c=1, interleaved, {len(chosen)} pairs; load average before "
        f"{[round(x, 1) for x in load_before]}, after {[round(x, 1) for x in load_after]}",
        "",
        "| variant | phase | p50 ms | p90 ms | p99 ms | proxy CPU ms per request | outcomes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, phase), values in latencies.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        cpu = cpu_ms[(name, phase)] / len(values)
        lines.append(
            f"| {name} | {phase} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {cpu:.2f} "
            f"| {outcomes[(name, phase)]} |"
        )
    if c64_rounds:
        lines.append("")
        lines.append(
            "c=64 lookups/s per round: "
            + "; ".join(f"{n} {', '.join(f'{r:.0f}' for r in rates[n])}" for n in names)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument(
        "--c64", type=int, default=0, metavar="ROUNDS", help="rounds of the c=64 phase (0: none)"
    )
    args = parser.parse_args()
    print(asyncio.run(run(args.variant, args.pairs, args.c64)))


if __name__ == "__main__":
    main()
