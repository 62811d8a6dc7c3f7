"""Model rollout end to end: a canary of the small engine, traffic, promotion, and the cache.

    # everything in one command: both vLLM engines (scripts/rollout_demo.yaml), the proxy in this
    # process on a fresh data directory, then the demo (engines start in 1-2 minutes)
    .venv/bin/python scripts/bench_rollout.py --launch

    # or against a proxy you started yourself with a canary in its config (e.g.
    # `frugal up --config scripts/rollout_demo.yaml --port 9100`) and its rollout not yet decided
    .venv/bin/python scripts/bench_rollout.py --url http://127.0.0.1:9100

Phases (greedy chat requests, ``--conversations`` distinct conversations each):

1. ``fresh``: every conversation once; the canary takes its share (sticky per conversation).
2. ``repeat``: the same again: exact cache hits, each carrying the version that stored it.
3. ``promote``: ``POST /admin/rollout/small/promote``; the figures per version just before.
4. ``after``: the same conversations: entries stored by the retired stable version no longer
   serve (those conversations are answered fresh by the promoted version); the canary's do.
5. ``again``: everything is now a hit of the promoted version.

Every response's ``x-frugal-model-version`` and ``x-frugal-cache`` headers are tallied per phase.
Output: a Markdown report on stdout and ``--out``/rollout.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.rollout.commands import format_status  # noqa: E402

CONFIG = REPO / "scripts" / "rollout_demo.yaml"
TOPICS = (
    "a lighthouse", "the moon", "bread", "a river", "a violin", "the desert", "a glacier",
    "a library", "a bicycle", "the ocean", "a volcano", "a garden", "a train", "a forest",
)  # fmt: skip


def question(i: int) -> str:
    return f"In one sentence, question {i}: what is special about {TOPICS[i % len(TOPICS)]}?"


async def ask(
    session: aiohttp.ClientSession, base: str, model: str, i: int, max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question(i)}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    t0 = time.perf_counter()
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        payload = await resp.read()
        return {
            "i": i,
            "status": resp.status,
            "version": resp.headers.get("x-frugal-model-version", "?"),
            "cache": resp.headers.get("x-frugal-cache", "?"),
            "latency_s": time.perf_counter() - t0,
            "model": json.loads(payload).get("model") if resp.status == 200 else None,
        }


async def phase(
    session: aiohttp.ClientSession, base: str, model: str, n: int, concurrency: int, max_tokens: int
) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict[str, Any]:
        async with gate:
            return await ask(session, base, model, i, max_tokens)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def tally(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = Counter(f"{r['version']} {r['cache']}" for r in results)
    return {
        "requests": len(results),
        "errors": sum(r["status"] != 200 for r in results),
        "by_version_and_cache": dict(sorted(by.items())),
    }


async def admin(session: aiohttp.ClientSession, base: str, method: str, path: str) -> Any:
    headers = {}
    if os.environ.get("FRUGAL_ADMIN_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['FRUGAL_ADMIN_KEY']}"
    async with session.request(method, base + path, headers=headers) as resp:
        body = await resp.json()
        if resp.status >= 400:
            raise SystemExit(f"{method} {path}: {resp.status} {body}")
        return body


async def demo(base: str, args: argparse.Namespace) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status = await admin(session, base, "GET", f"/admin/rollout/{args.engine}")
        if status["status"] != "canary":
            raise SystemExit(
                f"engine {args.engine!r} has no canary running (status {status['status']!r}); "
                "a promoted or rolled-back state persists: use --launch (fresh data dir) or "
                "delete <data dir>/rollout.json and restart the proxy"
            )
        stable, canary = status["stable_version"], status["canary_version"]
        model = (await admin(session, base, "GET", "/admin/engines"))[args.engine]["model"]
        go = (session, base, model, args.conversations, args.concurrency, args.max_tokens)
        phases: dict[str, Any] = {}
        results: dict[str, list[dict[str, Any]]] = {}
        for name in ("fresh", "repeat"):
            results[name] = await phase(*go)
            phases[name] = tally(results[name])
            print(f"{name}: {phases[name]}", file=sys.stderr)
        before = await admin(session, base, "GET", f"/admin/rollout/{args.engine}")
        promoted = await admin(session, base, "POST", f"/admin/rollout/{args.engine}/promote")
        for name in ("after", "again"):
            results[name] = await phase(*go)
            phases[name] = tally(results[name])
            print(f"{name}: {phases[name]}", file=sys.stderr)
        after = await admin(session, base, "GET", f"/admin/rollout/{args.engine}")
    fresh_version = {r["i"]: r["version"] for r in results["fresh"]}
    hits = [r for r in results["repeat"] if r["cache"].startswith("hit")]
    checks = {
        "repeat_hits_carry_the_storing_version": all(
            r["version"] == fresh_version[r["i"]] for r in hits
        ),
        "no_answer_from_the_retired_version_after_promotion": all(
            r["version"] == canary for r in results["after"] + results["again"]
        ),
        "old_stable_conversations_miss_after_promotion": all(
            not r["cache"].startswith("hit")
            for r in results["after"]
            if fresh_version[r["i"]] == stable
        ),
        "canary_conversations_still_hit_after_promotion": all(
            r["cache"].startswith("hit")
            for r in results["after"]
            if fresh_version[r["i"]] == canary
        ),
        "everything_hits_the_promoted_version_again": all(
            r["cache"].startswith("hit") and r["version"] == canary for r in results["again"]
        ),
    }
    canary_share = sum(v == canary for v in fresh_version.values()) / len(fresh_version)
    return {
        "stable": stable,
        "canary": canary,
        "configured_share": status["share"],
        "measured_share": canary_share,
        "phases": phases,
        "checks": checks,
        "status_before_promotion": before,
        "promoted": promoted["status"],
        "status_after": after,
    }


def render(meta: dict[str, Any], out: dict[str, Any]) -> str:
    lines = [
        f"### Model rollout ({meta['date']}, load average {meta['load']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Stable `{out['stable']}`, canary `{out['canary']}` at share {out['configured_share']:g}"
        f" (measured over {meta['conversations']} conversations: {out['measured_share']:.1%}).",
        "",
        "| phase | requests | errors | answers by `version cache` |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, p in out["phases"].items():
        mix = ", ".join(f"`{k}` {v}" for k, v in p["by_version_and_cache"].items())
        lines.append(f"| {name} | {p['requests']} | {p['errors']} | {mix} |")
    lines += ["", "Per-version figures just before the promotion:", "", "```"]
    lines += [format_status(out["status_before_promotion"]), "```", "", "Checks:", ""]
    lines += [f"- {name}: {'yes' if ok else '**NO**'}" for name, ok in out["checks"].items()]
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def launched(args: argparse.Namespace) -> AsyncIterator[str]:
    """Both vLLM engines of the demo config and the proxy (in this process, fresh data dir)."""
    from aiohttp import web

    from proxy.app import create_app
    from proxy.demo.launcher import launch_engines
    from proxy.demo.models import prepare_demo_models
    from proxy.demo.up import launch_specs, load_up_settings, with_launch_results
    from proxy.demo.vllm_env import ensure_vllm_python
    from proxy.observability.logging import configure_logging
    from proxy.settings import default_data_dir

    settings = load_up_settings(args.config)
    models_dir = default_data_dir()
    demo_dirs = await asyncio.to_thread(prepare_demo_models, models_dir)
    python = await asyncio.to_thread(ensure_vllm_python, models_dir)
    run_dir = Path(tempfile.mkdtemp(prefix="frugal-rollout-"))
    specs = launch_specs(settings, python=python, demo_dirs=demo_dirs)
    settings = with_launch_results(
        settings, data_dir=run_dir, port=settings.server.port, demo_dirs=demo_dirs
    )
    configure_logging(json=False, level="warning")
    print(f"starting {len(specs)} engines (logs in {run_dir}/logs) ...", file=sys.stderr)
    async with launch_engines(specs, run_dir):
        runner = web.AppRunner(create_app(settings, access_log=False))
        await runner.setup()
        site = web.TCPSite(runner, settings.server.host, settings.server.port)
        await site.start()
        try:
            yield f"http://{settings.server.host}:{settings.server.port}"
        finally:
            await runner.cleanup()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.launch:
        async with launched(args) as base:
            return await demo(base, args)
    return await demo(args.url.rstrip("/"), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running proxy with a canary")
    where.add_argument("--launch", action="store_true", help="start engines + proxy here")
    parser.add_argument("--config", type=Path, default=CONFIG, help="with --launch")
    parser.add_argument("--engine", default="small")
    parser.add_argument("--conversations", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "out")
    args = parser.parse_args()
    out = asyncio.run(run(args))
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": "scripts/bench_rollout.py " + " ".join(sys.argv[1:]),
        "conversations": args.conversations,
    }
    report = render(meta, out)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout.md").write_text(report + "\n")
    (args.out / "rollout.json").write_text(json.dumps({"meta": meta, **out}, indent=2) + "\n")
    if not all(out["checks"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
