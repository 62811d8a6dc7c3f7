"""Where the proxy's CPU goes per semantic lookup: CPU time per request of each proxy thread.

    .venv/bin/python scripts/bench_cache_threads.py [--pairs 200]

Starts a zero-delay fake engine and a proxy with the cache on (as scripts/bench_cache_speed.py
does), then sends the originals of ../shared/data/cache_paraphrases_mock.json.gz at c=1 (misses,
stored), their paraphrases at c=1 (semantic lookups) and new texts at c=64, and reads every
proxy thread's CPU time from /proc/PID/task/*/stat around each phase. Thread names come from
``py-spy dump`` (the OS does not know Python's names); a thread py-spy cannot name shows as
``tid-N``. CPU time per request depends far less on the machine's load than wall-clock figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_cache_speed import CONFIG, DATA, free_port, start, stop, timed_posts, wait_ready  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
_THREAD_LINE = re.compile(r'Thread (\d+) \(\w+\): "([^"]+)"')


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of a process, by thread id."""
    spent = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        spent[task.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return spent


def thread_names(pid: int) -> dict[str, str]:
    """Python thread names by thread id, from ``py-spy dump`` (empty without py-spy)."""
    if not PY_SPY.exists():
        return {}
    out = subprocess.run(
        [str(PY_SPY), "dump", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return {m.group(1): m.group(2) for m in _THREAD_LINE.finditer(out)}


def per_request(
    before: dict[str, float], after: dict[str, float], names: dict[str, str], requests: int
) -> dict[str, float]:
    """CPU milliseconds per request by thread name (threads of one name summed)."""
    out: dict[str, float] = {}
    for tid, seconds in after.items():
        name = names.get(tid, f"tid-{tid}")
        out[name] = out.get(name, 0.0) + 1000 * (seconds - before.get(tid, 0.0)) / requests
    return out


async def run(pairs: int) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    with gzip.open(DATA, "rt") as f:
        rows = json.load(f)
    chosen = [(r["origin"], r["similar"]) for r in rows if r.get("origin") and r.get("similar")]
    chosen = chosen[:pairs]
    work = Path(tempfile.mkdtemp(prefix="frugal-cache-threads-"))
    engine_port, port = free_port(), free_port()
    config = work / "proxy.yaml"
    config.write_text(
        CONFIG.format(port=port, engine_port=engine_port, cache="true", data_dir=work / "data")
    )
    engine = start(
        [sys.executable, "-m", "proxy", "fake-engine", "--port", str(engine_port),
         "--model", "bench-model"],
        work / "engine.log",
    )  # fmt: skip
    proxy = start([sys.executable, "-m", "proxy", "serve", "--config", str(config)], work / "p.log")
    url = f"http://127.0.0.1:{port}"
    phases = {
        "miss c=1": ([o for o, _ in chosen], 1),
        "lookup c=1": ([s for _, s in chosen], 1),
        "c=64": ([f"{s} (variant {r}-{i})" for r in range(2) for i, (_, s) in enumerate(chosen)],
                 64),
    }  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    try:
        await wait_ready(url)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await timed_posts(session, url, ["warm-up question one", "warm-up question two"], 2)
            for phase, (texts, concurrency) in phases.items():
                before = thread_cpu(proxy.pid)
                await timed_posts(session, url, texts, concurrency)
                await asyncio.sleep(0.5)  # background stores land
                after = thread_cpu(proxy.pid)
                names.update(thread_names(proxy.pid))
                results[phase] = per_request(before, after, names, len(texts))
    finally:
        stop(proxy)
        stop(engine)
        shutil.rmtree(work, ignore_errors=True)
    return results, names


def report(results: dict[str, dict[str, float]], load: tuple[float, ...]) -> str:
    phases = list(results)
    threads = sorted(
        {name for by_thread in results.values() for name in by_thread},
        key=lambda name: -sum(results[p].get(name, 0.0) for p in phases),
    )
    lines = [
        f"# Proxy CPU per request by thread ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", load average {[round(x, 1) for x in load]} -> "
        f"{[round(x, 1) for x in os.getloadavg()]})",
        "",
        "| thread | " + " | ".join(phases) + " |",
        "| --- | " + " | ".join("---" for _ in phases) + " |",
    ]
    for name in threads:
        values = [results[p].get(name, 0.0) for p in phases]
        if max(values) >= 0.005:
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f} ms" for v in values) + " |")
    totals = [sum(results[p].values()) for p in phases]
    lines.append("| **total** | " + " | ".join(f"**{v:.2f} ms**" for v in totals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    load = os.getloadavg()
    results, _ = asyncio.run(run(args.pairs))
    print(report(results, load))


if __name__ == "__main__":
    main()
