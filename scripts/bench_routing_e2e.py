"""Difficulty routing on the real demo engines: strong share and load-driven moves.

    .venv/bin/python scripts/bench_routing_e2e.py --launch          # starts both vLLM engines
    .venv/bin/python scripts/bench_routing_e2e.py --small http://127.0.0.1:8101 \\
        --large http://127.0.0.1:8102                                # engines already running

The proxy runs in this process (create_app on a free port) with three tiers written to a
throwaway policy folder; requests go over HTTP like any client's.

Part 1, strong share: a mixed workload (shuffled prompts of ../shared/data/routing_dev.csv.gz:
maths, multiple choice, open chat) for the `auto` model in a tier with `strong_share: 0.3`;
``max_tokens: 1`` since the decision does not depend on the answer, 4 requests in flight. The
share is counted over the requests after the warm-up (the tier's share tracker calibrates its
threshold from the traffic it sees). Target: 30% ± 3% to the large engine.

Part 2, load: two tiers send every request to the large engine by difficulty
(``score_threshold: 0``): `tight` with a TTFT target the large engine meets idle but not under
load (3x its idle time to first token), `control` with a target it always meets. The large engine
has an admission cap (``--large-cap`` requests in flight, as a production config would set near
its best batch size). Idle, both tiers go to the large engine. Then a third tier (`load`) keeps
``--load-streams`` long generations running on it, filling its batch and the proxy's queue in
front of it, and the two tiers send requests again: `tight`'s are moved to the small engine with
the reason `load`, while `control`'s stay on the large one (served ahead of the queue by their
higher priority). The script prints the headers' route and reason counts and
the proxy's `frugal_route_decisions` series.

Output: a Markdown summary on stdout and in ``--out``/routing_e2e.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import gzip
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.app import create_app  # noqa: E402
from proxy.policy.keys import hash_key  # noqa: E402
from proxy.settings import Settings  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "routing_dev.csv.gz"
SMALL_MODEL, LARGE_MODEL = "smollm2-135m", "qwen2.5-coder-0.5b"
KEYS = {tier: f"sk-bench-{tier}" for tier in ("share", "tight", "control", "load")}
HARD_PROMPTS = (
    "Write a Python function that merges overlapping intervals and explain its complexity.",
    "Prove that the square root of 2 is irrational.",
    "Implement an LRU cache in Python with O(1) get and put.",
    "Solve for x: 3x^2 - 12x + 9 = 0, showing each step.",
    "Explain the CAP theorem and give an example of a CP system.",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _policy(tier: str, **fields: Any) -> dict[str, Any]:
    return {
        "tier": tier,
        "keys": [{"hash": hash_key(KEYS[tier]), "tenant": f"{tier}-tenant"}],
        "models": ["auto", SMALL_MODEL, LARGE_MODEL],
        "limits": {"requests_per_minute": 100_000, "concurrent": 64, "max_tokens": 512},
        "cache": {"scope": "tenant"},
        "priority": 1,
        **fields,
    }


def _settings(
    small: str, large: str, policies: Path, data_dir: Path, tight_ms: int, large_cap: int
) -> Settings:
    tiers = [
        _policy("share", routing={"strong_share": 0.3}, latency={"ttft_p95_ms": 600_000}),
        _policy("tight", routing={"score_threshold": 0.0}, latency={"ttft_p95_ms": tight_ms}),
        # Served before the load tier when the large engine's admission queue is full, so its
        # probes measure the engine, not the whole queue.
        _policy(
            "control",
            routing={"score_threshold": 0.0},
            latency={"ttft_p95_ms": 600_000},
            priority=2,
            queue={"max_wait_ms": 120_000},
        ),
        _policy(
            "load",
            routing={"score_threshold": 0.0},
            latency={"ttft_p95_ms": 600_000},
            queue={"max_wait_ms": 120_000},
        ),
    ]
    policies.mkdir(parents=True, exist_ok=True)
    for tier in tiers:
        (policies / f"{tier['tier']}.yaml").write_text(yaml.safe_dump(tier))
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "engines": [
                {"name": "small", "model": SMALL_MODEL, "urls": [small]},
                {
                    "name": "large",
                    "model": LARGE_MODEL,
                    "urls": [large],
                    "cost": {"input_per_mtok": 0.5, "output_per_mtok": 1.5},
                    "max_concurrency": large_cap,
                },
            ],
            "policies": str(policies),
            "data_dir": str(data_dir),
            # The cache would answer repeated prompts without routing them again.
            "cache": {"enabled": False},
            "logging": {"level": "warning", "format": "console"},
        }
    )


def _prompts(count: int, seed: int) -> list[str]:
    with gzip.open(DATA, "rt", newline="") as f:
        prompts = [row["prompt"].split(" [TURN2] ")[0] for row in csv.DictReader(f)]
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


async def _chat(
    session: aiohttp.ClientSession, base: str, tier: str, prompt: str, max_tokens: int
) -> tuple[int, dict[str, str], float]:
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {KEYS[tier]}"}
    start = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        raw = await resp.read()
        out = dict(resp.headers)
        if resp.status != 200:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out["error-code"] = json.loads(raw)["error"]["code"]
        return resp.status, out, time.perf_counter() - start


async def part_share(
    session: aiohttp.ClientSession, base: str, warm_up: int, measured: int, in_flight: int
) -> dict[str, Any]:
    prompts = _prompts(warm_up + measured, seed=7)
    routes: list[str | None] = [None] * len(prompts)
    errors = 0
    next_index = 0
    done = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index, errors, done
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            status, headers, _ = await _chat(session, base, "share", prompts[i], 1)
            if status == 200:
                routes[i] = headers.get("x-frugal-route")
            else:
                errors += 1
            done += 1
            if done % 100 == 0:
                rate = done / (time.monotonic() - started)
                print(f"  share: {done}/{len(prompts)} requests ({rate:.1f}/s)", flush=True)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    tail = [r for r in routes[warm_up:] if r is not None]
    large = tail.count("large")
    return {
        "requests": len(prompts),
        "warm_up": warm_up,
        "measured": len(tail),
        "errors": errors,
        "large": large,
        "share": large / len(tail) if tail else float("nan"),
    }


async def _ttft_ms(session: aiohttp.ClientSession, large: str, samples: int) -> float:
    """The large engine's time to a one-token answer for a short prompt (median of a few)."""
    times = []
    for i in range(samples):
        body = {
            "model": LARGE_MODEL,
            "messages": [{"role": "user", "content": HARD_PROMPTS[i % len(HARD_PROMPTS)]}],
            "max_tokens": 1,
            "temperature": 0,
        }
        start = time.perf_counter()
        async with session.post(f"{large}/v1/chat/completions", json=body) as resp:
            await resp.read()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def _ttft_idle_and_loaded(
    session: aiohttp.ClientSession, large: str, streams: int
) -> tuple[float, float]:
    """Straight to the engine, before the proxy exists: idle, then under the load of part 2."""
    idle = await _ttft_ms(session, large, 5)
    stop = asyncio.Event()
    loaders = [
        asyncio.create_task(_load_stream(session, large, stop, auth=False)) for _ in range(streams)
    ]
    await asyncio.sleep(8)
    loaded = await _ttft_ms(session, large, 5)
    stop.set()
    await asyncio.gather(*loaders, return_exceptions=True)
    return idle, loaded


async def _probe(
    session: aiohttp.ClientSession, base: str, tiers: tuple[str, ...], rounds: int
) -> dict[str, dict[str, Any]]:
    """Requests of each tier, one at a time: where they went, why, and how long they took."""
    routes: dict[str, collections.Counter[str]] = {t: collections.Counter() for t in tiers}
    elapsed_ms: dict[str, list[float]] = {t: [] for t in tiers}
    details: dict[str, list[str]] = {t: [] for t in tiers}
    for i in range(rounds):
        for tier in tiers:
            status, headers, elapsed = await _chat(session, base, tier, HARD_PROMPTS[i % 5], 1)
            elapsed_ms[tier].append(elapsed * 1000)
            details[tier].append(headers.get("x-frugal-route-detail", ""))
            if status != 200:
                routes[tier][f"error {status} {headers.get('error-code', '')}".strip()] += 1
                continue
            reason = headers.get("x-frugal-route-reason", "?")
            routes[tier][f"{headers.get('x-frugal-route')} ({reason})"] += 1
        await asyncio.sleep(0.2)
    return {
        t: {
            "routes": dict(routes[t]),
            "median_ms": statistics.median(elapsed_ms[t]),
            "details": details[t],
        }
        for t in tiers
    }


async def _load_stream(
    session: aiohttp.ClientSession, base: str, stop: asyncio.Event, *, auth: bool = True
) -> int:
    """Keep one long generation running on the large engine until told to stop."""
    finished = 0
    body = {
        "model": LARGE_MODEL,
        "messages": [{"role": "user", "content": "Write a long essay about the history of ships."}],
        "max_tokens": 120,
        "temperature": 0.7,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {KEYS['load']}"} if auth else {}
    while not stop.is_set():
        async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
            async for _ in resp.content.iter_any():
                if stop.is_set():
                    break
        finished += 1
    return finished


async def part_load(
    session: aiohttp.ClientSession, base: str, streams: int, rounds: int
) -> dict[str, Any]:
    idle = await _probe(session, base, ("tight", "control"), rounds)
    stop = asyncio.Event()
    loaders = [asyncio.create_task(_load_stream(session, base, stop)) for _ in range(streams)]
    # Let the engine fill its batch and the proxy's TTFT estimate catch up with it.
    await asyncio.sleep(8)
    loaded = await _probe(session, base, ("tight", "control"), rounds)
    stop.set()
    await asyncio.gather(*loaders, return_exceptions=True)
    async with session.get(f"{base}/metrics") as resp:
        metrics = await resp.text()
    series = [
        line
        for line in metrics.splitlines()
        if line.startswith("frugal_route_decisions") and 'tier="share"' not in line
    ]
    return {
        "idle": idle,
        "loaded": loaded,
        "metrics": series,
    }


@contextlib.contextmanager
def _engines(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if not args.launch:
        yield args.small, args.large
        return
    from proxy.demo.launcher import engines_running
    from proxy.demo.models import prepare_demo_models
    from proxy.demo.up import launch_specs, load_up_settings
    from proxy.demo.vllm_env import ensure_vllm_python
    from proxy.settings import default_data_dir

    data_dir = default_data_dir()
    python = ensure_vllm_python(data_dir)
    demo_dirs = prepare_demo_models(data_dir)
    demo = load_up_settings(None)
    demo = demo.model_copy(
        update={
            "engines": [
                e.model_copy(update={"urls": [f"http://127.0.0.1:{_free_port()}"]})
                for e in demo.engines
            ]
        }
    )
    specs = launch_specs(demo, python=python, demo_dirs=demo_dirs)
    with engines_running(specs, data_dir) as running:
        by_name = {engine.name: engine.url for engine in running}
        yield by_name["small"], by_name["large"]


async def run(args: argparse.Namespace, small: str, large: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        idle_ms, loaded_ms = await _ttft_idle_and_loaded(session, large, args.load_streams)
        # Met idle with room to spare (an idle engine's TTFT wobbles on a busy box); broken once
        # the large engine's admission queue holds a batch-worth of long answers.
        tight_ms = int(3 * idle_ms)
        print(
            f"large engine TTFT idle {idle_ms:.0f} ms, under {args.load_streams} streams "
            f"{loaded_ms:.0f} ms; tight tier target {tight_ms} ms",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="frugal-route-e2e-") as tmp:
            settings = _settings(
                small,
                large,
                Path(tmp) / "policies",
                Path(tmp) / "data",
                tight_ms,
                args.large_cap,
            )
            runner = web.AppRunner(create_app(settings, access_log=False))
            await runner.setup()
            port = _free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            base = f"http://127.0.0.1:{port}"
            try:
                share = None
                if args.measured > 0:
                    print("part 1: strong share 0.3 on a mixed workload", flush=True)
                    share = await part_share(session, base, args.warm_up, args.measured, 4)
                    print(f"  share to large: {share['share']:.3f}", flush=True)
                print("part 2: a tight latency target under load", flush=True)
                load = await part_load(session, base, args.load_streams, args.rounds)
            finally:
                await runner.cleanup()
    return {
        "idle_ttft_ms": idle_ms,
        "loaded_ttft_ms": loaded_ms,
        "tight_target_ms": tight_ms,
        "share": share,
        "load": load,
    }


def render(meta: dict[str, Any], result: dict[str, Any]) -> str:
    share = result["share"]
    lines = [
        f"Routing on the real demo engines, {meta['date']} (load average before: {meta['load']})",
        "",
    ]
    if share is not None:
        lines += [
            f"Strong share (tier strong_share 0.3): {share['large']} of {share['measured']} "
            f"requests after a {share['warm_up']}-request warm-up went to the large engine: "
            f"**{share['share']:.1%}** (target 30% ± 3%); errors {share['errors']}.",
            "",
        ]
    lines += [
        f"Load: large engine TTFT idle {result['idle_ttft_ms']:.0f} ms, under load "
        f"{result['loaded_ttft_ms']:.0f} ms (straight to the engine); tier `tight` target "
        f"{result['tight_target_ms']} ms (3x idle), tier `control` 600 s; the large engine's "
        f"admission cap {meta['large_cap']} in flight, {meta['load_streams']} long streams of "
        "the `load` tier during the loaded phase.",
        "",
        "| phase | tier | routes (reason): requests | median time to a 1-token answer |",
        "| --- | --- | --- | --- |",
    ]
    for phase in ("idle", "loaded"):
        for tier, seen in result["load"][phase].items():
            text = ", ".join(f"{k}: {v}" for k, v in sorted(seen["routes"].items()))
            lines.append(f"| {phase} | {tier} | {text} | {seen['median_ms']:.0f} ms |")
    lines += ["", "```", *result["load"]["metrics"], "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", action="store_true", help="start both demo vLLM engines")
    parser.add_argument("--small", default="http://127.0.0.1:8101")
    parser.add_argument("--large", default="http://127.0.0.1:8102")
    parser.add_argument("--warm-up", type=int, default=250)
    parser.add_argument("--measured", type=int, default=600, help="0 skips the share part")
    parser.add_argument("--load-streams", type=int, default=16)
    parser.add_argument(
        "--large-cap", type=int, default=8, help="the large engine's admission cap (in flight)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="probes per tier and phase")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "routing_e2e")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"needs {DATA}")
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "large_cap": args.large_cap,
        "load_streams": args.load_streams,
    }
    with _engines(args) as (small, large):
        result = asyncio.run(run(args, small, large))
    text = render(meta, result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing_e2e.md").write_text(text + "\n")
    (args.out / "routing_e2e.json").write_text(json.dumps({**meta, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
