"""c=1 semantic-cache latency of several proxy builds at once, interleaved request by request.

    .venv/bin/python scripts/bench_cache_ab.py \
        --variant before=/tmp/main-export:2 --variant after=.:2 --variant one-thread=.:1

Each variant is ``name=REPO:THREADS``: a proxy started from that source tree (``python -m proxy
serve`` with ``PYTHONPATH=REPO``) with ``embeddings.threads: THREADS``, all in front of one
zero-delay fake engine. The originals of ../shared/data/cache_paraphrases_mock.json.gz are sent
(misses: stored), then their paraphrases (semantic lookups), each text to every proxy in rotating
order. On a shared, busy machine the variants then see the same load, which back-to-back runs of
scripts/bench_cache_speed.py do not: use this for A/B latency, that one for absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_cache_speed import CONFIG, DATA, body, free_port, wait_ready  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, int]:
    name, _, rest = text.partition("=")
    repo, _, threads = rest.rpartition(":")
    if not name or not repo or not threads.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=REPO:THREADS, got {text!r}")
    return name, Path(repo).resolve(), int(threads)


def launch(command: list[str], repo: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        command, cwd=repo, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def run(variants: list[tuple[str, Path, int]], pairs: int) -> str:
    with gzip.open(DATA, "rt") as f:
        rows = json.load(f)
    chosen = [(r["origin"], r["similar"]) for r in rows if r.get("origin") and r.get("similar")]
    chosen = chosen[:pairs]
    work = Path(tempfile.mkdtemp(prefix="frugal-cache-ab-"))
    engine_port = free_port()
    procs = [
        launch(
            [sys.executable, "-m", "proxy", "fake-engine", "--port", str(engine_port),
             "--model", "bench-model"],
            REPO,
            work / "engine.log",
        )
    ]  # fmt: skip
    urls: dict[str, str] = {}
    try:
        for name, repo, threads in variants:
            port = free_port()
            config = work / f"{name}.yaml"
            config.write_text(
                CONFIG.format(
                    port=port, engine_port=engine_port, cache="true", data_dir=work / f"data-{name}"
                )
                + f"embeddings: {{threads: {threads}}}\n"
            )
            command = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
            procs.append(launch(command, repo, work / f"{name}.log"))
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            await wait_ready(url)
        names = list(urls)
        latencies: dict[tuple[str, str], list[float]] = {
            (n, phase): [] for n in names for phase in ("miss", "lookup")
        }
        outcomes: dict[tuple[str, str], dict[str, int]] = {key: {} for key in latencies}
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
                        await post(name, text, phase)
                await asyncio.sleep(1.0)  # background stores land
        load_after = os.getloadavg()
    finally:
        for proc in procs:
            stop(proc)
    lines = [
        f"c=1, interleaved, {len(chosen)} pairs; load average before "
        f"{[round(x, 1) for x in load_before]}, after {[round(x, 1) for x in load_after]}",
        "",
        "| variant | phase | p50 ms | p90 ms | p99 ms | outcomes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (name, phase), values in latencies.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        lines.append(
            f"| {name} | {phase} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {outcomes[(name, phase)]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    print(asyncio.run(run(args.variant, args.pairs)))


if __name__ == "__main__":
    main()
