"""Cache speed through the proxy, on loopback, against a zero-delay fake engine.

    .venv/bin/python scripts/bench_cache_speed.py [--out out/cache_speed] [--precision int8]

Measures (targets from the cache issue):
  * exact hit: p50 <= 0.3 ms and p99 <= 1 ms at concurrency 1 (wrk, one cached request)
  * semantic path (embedding + ANN search + guards + verifier): p99 <= 10 ms at concurrency 1,
    for lookups that hit (a paraphrase of a stored question) and that miss (a new question;
    the zero-delay engine's answer time is subtracted by measuring the same request with the
    cache off); requests back to back, or with ``--pause-ms`` a user's think time after each
    answer (on these VMs a request after an idle pause is slower: docs/benchmarks.md, section 4)
  * semantic lookups/s at concurrency 64 (>= 400 on a 2-core machine): the c=1 phases' traffic
    at c=64 (the questions of ``--c64-pairs`` pairs not used at c=1, then their paraphrases),
    and, to compare with runs before 2026-11-29 07:30 UTC, the earlier workload (the stored
    paraphrases with a " (variant r-i)" suffix, which made every text ~6 word pieces longer)

On a shared, busy machine the wall-clock figures measure the share of the CPU the run got, so the
CPU time each process spent per request is reported too (proxy, fake engine, this client): on an
otherwise idle 2-core machine the c=64 rate is bounded by 2 cores / (their sum).

Questions come from ../shared/data/cache_paraphrases_mock.json.gz (read at run time).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from proc_cpu import cpu_seconds  # noqa: E402  (a sibling module: the proxy's process tree)

DATA = REPO.parent / "shared" / "data" / "cache_paraphrases_mock.json.gz"
CONFIG = """\
server: {{host: 127.0.0.1, port: {port}}}
engines:
  - name: bench
    model: bench-model
    urls: ["http://127.0.0.1:{engine_port}"]
cache: {{enabled: {cache}, semantic: true, scope: global}}
routing: {{enabled: false}}
policies: null
data_dir: {data_dir}
logging: {{format: json, level: warning}}
"""


def semantic_pairs(count: int) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    """The first ``count`` (question, paraphrase) pairs of the data file that the proxy looks up
    by meaning, and the lengths of those left out on the way: a question past the encoder's
    window is matched exactly only (there is no semantic lookup to time)."""
    with gzip.open(DATA, "rt") as f:
        rows = json.load(f)
    whole = reads_whole()
    kept: list[tuple[str, str]] = []
    left_out = []
    for row in rows:
        if len(kept) == count:
            break
        origin, similar = row.get("origin"), row.get("similar")
        if not (origin and similar):
            continue
        if whole(origin) and whole(similar):
            kept.append((origin, similar))
        else:
            left_out.append((len(origin), len(similar)))
    return kept, left_out


def reads_whole() -> Callable[[str], bool]:
    """Whether MiniLM reads a text whole (the proxy's window check, on its tokenizer)."""
    from tokenizers import Tokenizer

    from proxy.cache.verifier import MAX_TOKENS, base_model_folder

    tokenizer = Tokenizer.from_file(str(base_model_folder() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: len(tokenizer.encode(text).ids) <= MAX_TOKENS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} never became ready")


def body(text: str) -> dict[str, Any]:
    return {
        "model": "bench-model",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 16,
    }


async def timed_posts(
    session: aiohttp.ClientSession,
    url: str,
    texts: list[str],
    concurrency: int,
    pause_s: float = 0.0,
) -> tuple[list[float], dict[str, int], float]:
    """Post each text (``concurrency`` at a time), each worker pausing ``pause_s`` after each
    answer; returns the latencies, the ``x-frugal-cache`` outcomes and the wall time."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    queue = list(reversed(texts))

    async def worker() -> None:
        while queue:
            text = queue.pop()
            t0 = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=body(text)) as resp:
                await resp.read()
                outcome = resp.headers.get("x-frugal-cache", "?")
            latencies.append(time.perf_counter() - t0)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if pause_s:
                await asyncio.sleep(pause_s)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, outcomes, time.perf_counter() - started


class CpuMeter:
    """CPU milliseconds per request of the proxy, the fake engine and this client over a phase."""

    def __init__(self, proxy: int, engine: int) -> None:
        self.pids = {"proxy": proxy, "engine": engine}

    def __enter__(self) -> CpuMeter:
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.client = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.spent = {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}
        self.spent["client"] = time.process_time() - self.client

    def per_request(self, requests: int) -> dict[str, float]:
        return {name: 1000 * seconds / requests for name, seconds in self.spent.items()}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def by_length(texts: list[str], latencies: list[float]) -> list[dict[str, float]]:
    """p50/p99 of a c=1 phase for the shortest, middle and longest third of its texts (the tail
    at c=1 is the longest questions' encoder pass)."""
    ranked = sorted(zip(texts, latencies, strict=True), key=lambda pair: len(pair[0]))
    size = -(-len(ranked) // 3)
    thirds = [ranked[i : i + size] for i in range(0, len(ranked), size)]
    return [
        {
            "chars_min": len(part[0][0]),
            "chars_max": len(part[-1][0]),
            "p50_ms": pct([lat for _, lat in part], 0.5),
            "p99_ms": pct([lat for _, lat in part], 0.99),
        }
        for part in thirds
    ]


def slowest(texts: list[str], latencies: list[float], count: int = 4) -> list[dict[str, float]]:
    """The slowest requests of a c=1 phase (sent one by one, so in the texts' order): with a few
    hundred questions the p99 is one of these, and their lengths and places show whether it is
    the encoder on a long question or an event of the proxy (the first lookup, say)."""
    ranked = sorted(enumerate(zip(texts, latencies, strict=True)), key=lambda r: -r[1][1])
    return [
        {"ms": lat * 1000, "chars": len(text), "position": index}
        for index, (text, lat) in ranked[:count]
    ]


def wrk_latency(url: str, text: str, seconds: int) -> dict[str, float]:
    lua = Path(tempfile.mkstemp(suffix=".lua")[1])
    payload = json.dumps(body(text)).replace("'", "\\'")
    lua.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{payload}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("P50 %f\\nP99 %f\\n", latency:percentile(50), '
        "latency:percentile(99)))\nend\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", str(lua), url + "/v1/chat/completions"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split() for line in out.splitlines() if line.startswith(("P50", "P99")))
    return {"p50_ms": float(values["P50"]) / 1000, "p99_ms": float(values["P99"]) / 1000}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    chosen, left_out = semantic_pairs(args.pairs + args.c64_pairs)
    pairs, new_pairs = chosen[: args.pairs], _unseen(chosen[args.pairs :], chosen[: args.pairs])
    work = Path(tempfile.mkdtemp(prefix="frugal-cache-speed-"))
    engine_port = free_port()
    procs = [
        start(
            [sys.executable, "-m", "proxy", "fake-engine", "--port", str(engine_port),
             "--model", "bench-model"],
            work / "engine.log",
        )
    ]  # fmt: skip
    results: dict[str, Any] = {
        "pairs": len(pairs),
        "left_out_past_window": left_out,
        "load_avg_before": os.getloadavg(),
    }
    try:
        urls = {}
        for name, cache in (("cached", "true"), ("uncached", "false")):
            port = free_port()
            config = work / f"{name}.yaml"
            config.write_text(
                CONFIG.format(
                    port=port, engine_port=engine_port, cache=cache, data_dir=work / f"data-{name}"
                ).replace(
                    "semantic: true,",
                    f"semantic: true, cross_encoder: {str(args.cross).lower()}, "
                    f"lookup_beside_engine: {str(not args.lookup_first).lower()},",
                )
                + embeddings_section(args.precision, args.max_queue_ms)
            )
            procs.append(
                start(
                    [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                    work / f"{name}.log",
                )
            )
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            await wait_ready(url)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            cached, uncached = urls["cached"], urls["uncached"]
            # Warm both (model load, connections), then store the originals one by one.
            await timed_posts(session, cached, ["warm-up question one"], 1)
            await timed_posts(session, uncached, ["warm-up question one"], 1)
            pause = args.pause_ms / 1000
            base, _, _ = await timed_posts(session, uncached, [o for o, _ in pairs], 1, pause)
            engine_pid, cached_pid = procs[0].pid, procs[1].pid
            with CpuMeter(cached_pid, engine_pid) as miss_cpu:
                miss, miss_outcomes, _ = await timed_posts(
                    session, cached, [o for o, _ in pairs], 1, pause
                )
                await asyncio.sleep(1.0)  # background stores land
            with CpuMeter(cached_pid, engine_pid) as hit_cpu:
                hit, hit_outcomes, _ = await timed_posts(
                    session, cached, [s for _, s in pairs], 1, pause
                )
            results["uncached_request"] = {"p50_ms": pct(base, 0.5), "p99_ms": pct(base, 0.99)}
            results["semantic_miss_c1"] = {
                "p50_ms": pct(miss, 0.5),
                "p99_ms": pct(miss, 0.99),
                "added_p99_ms": pct(miss, 0.99) - pct(base, 0.99),
                "outcomes": miss_outcomes,
                "cpu_ms_per_request": miss_cpu.per_request(len(miss)),
                "by_length": by_length([o for o, _ in pairs], miss),
                "slowest": slowest([o for o, _ in pairs], miss),
            }
            hits_only = [lat for lat in hit]
            results["semantic_lookup_c1"] = {
                "p50_ms": pct(hits_only, 0.5),
                "p99_ms": pct(hits_only, 0.99),
                "outcomes": hit_outcomes,
                "cpu_ms_per_request": hit_cpu.per_request(len(hit)),
                "by_length": by_length([s for _, s in pairs], hit),
                "slowest": slowest([s for _, s in pairs], hit),
            }
            # Throughput: new texts only (each one a semantic lookup: no exact hit, and no text
            # the embedding worker has seen before). The traffic of the c=1 phases at c=64: the
            # questions of pairs not used above, then their paraphrases (the first half misses
            # and stores, the second mostly hits).
            new_texts = [o for o, _ in new_pairs] + [s for _, s in new_pairs]
            results["semantic_lookups_c64"] = await _c64(
                session, cached, new_texts, CpuMeter(cached_pid, engine_pid)
            )
            # The earlier workload, kept to compare runs across days: the stored paraphrases with
            # a suffix (" (variant 0-12)", 6 more word pieces, about 18% longer texts).
            variants = [
                f"{s} (variant {r}-{i})"
                for r in range(args.repeat)
                for i, (_, s) in enumerate(pairs)
            ]
            results["semantic_lookups_c64_variants"] = await _c64(
                session, cached, variants, CpuMeter(cached_pid, engine_pid)
            )
            # Exact hits: the first original is stored; wrk at concurrency 1.
        results["exact_hit_c1"] = wrk_latency(urls["cached"], pairs[0][0], args.wrk_seconds)
        results["uncached_c1_wrk"] = wrk_latency(urls["uncached"], pairs[0][0], args.wrk_seconds)
    finally:
        for proc in procs:
            stop(proc)
        results["load_avg_after"] = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)
    return results


def embeddings_section(precision: str | None, max_queue_ms: float | None) -> str:
    """The proxies' embeddings settings: by default no shedding (``max_queue_ms: null``), so every
    c=64 request is a semantic lookup, as the target counts them."""
    fields = [f"max_queue_ms: {'null' if max_queue_ms is None else max_queue_ms}"]
    if precision:
        fields.append(f"precision: {precision}")
    return f"embeddings: {{{', '.join(fields)}}}\n"


async def shed_total(session: aiohttp.ClientSession, url: str) -> float:
    """Texts the proxy did not embed because its encoder was too far behind."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("frugal_embeddings_shed_total{")
    )


def _unseen(
    candidates: list[tuple[str, str]], used: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The pairs none of whose texts was sent before (a repeat would be an exact hit)."""
    seen = {text for pair in used for text in pair}
    out = []
    for origin, similar in candidates:
        if origin not in seen and similar not in seen and origin != similar:
            out.append((origin, similar))
            seen.update((origin, similar))
    return out


async def _c64(
    session: aiohttp.ClientSession, url: str, texts: list[str], meter: CpuMeter
) -> dict[str, Any]:
    shed_before = await shed_total(session, url)
    with meter:
        latencies, outcomes, wall = await timed_posts(session, url, texts, 64)
    cpu = meter.per_request(len(texts))
    return {
        "requests": len(texts),
        "not_embedded": int(await shed_total(session, url) - shed_before),
        "per_s": len(texts) / wall,
        "p99_ms": pct(latencies, 0.99),
        "outcomes": outcomes,
        "cpu_ms_per_request": cpu,
        "idle_2_core_bound_per_s": 2000 / sum(cpu.values()),
    }


def report(results: dict[str, Any], command: str) -> str:
    day = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    e, s, m, t, v = (
        results["exact_hit_c1"],
        results["semantic_lookup_c1"],
        results["semantic_miss_c1"],
        results["semantic_lookups_c64"],
        results["semantic_lookups_c64_variants"],
    )
    lines = [
        f"# Cache speed through the proxy ({day})",
        "",
        f"Command: `{command}`; {results['pairs']} paraphrase pairs; load average before "
        f"{[round(x, 1) for x in results['load_avg_before']]}, after "
        f"{[round(x, 1) for x in results['load_avg_after']]}. Left out (a question past the "
        f"encoder's 128-word-piece window, matched exactly only): "
        f"{len(results['left_out_past_window'])} pair(s), characters "
        f"{results['left_out_past_window']}.",
        "",
        "| measure | figure | target |",
        "| --- | --- | --- |",
        f"| exact hit, c=1 (wrk) | p50 {e['p50_ms']:.3f} ms, p99 {e['p99_ms']:.3f} ms | "
        "p50 <= 0.3 ms, p99 <= 1 ms |",
        f"| uncached request, c=1 (wrk, for scale) | p50 {results['uncached_c1_wrk']['p50_ms']:.3f}"
        f" ms, p99 {results['uncached_c1_wrk']['p99_ms']:.3f} ms | |",
        f"| semantic lookup of a paraphrase, c=1 | p50 {s['p50_ms']:.1f} ms, p99 "
        f"{s['p99_ms']:.1f} ms; outcomes {s['outcomes']} | p99 <= 10 ms |",
        f"| semantic miss, c=1 (whole request) | p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f}"
        f" ms (+{m['added_p99_ms']:.1f} ms over no cache) | p99 <= 10 ms |",
        f"| semantic lookups, c=64: {t['requests'] // 2} new questions, then their paraphrases |"
        f" {t['per_s']:.0f}/s, p99 {t['p99_ms']:.0f} ms; outcomes {t['outcomes']}{_shed(t)} |"
        " >= 400/s |",
        f"| semantic lookups, c=64: stored paraphrases + a variant suffix (earlier workload) | "
        f"{v['per_s']:.0f}/s, p99 {v['p99_ms']:.0f} ms; outcomes {v['outcomes']}{_shed(v)} | |",
        "",
        "CPU time per request (ms; proxy / fake engine / client), load-independent: "
        f"hit c=1 {_cpu(s)}; miss c=1 {_cpu(m)}; c=64 {_cpu(t)} (variants {_cpu(v)}), so on an "
        f"idle 2-core machine c=64 could reach at most {t['idle_2_core_bound_per_s']:.0f}/s "
        f"(variants {v['idle_2_core_bound_per_s']:.0f}/s).",
        "",
        "c=1 by question length (thirds, shortest first; p50 / p99 ms): paraphrase lookups "
        f"{_thirds(s)}; misses {_thirds(m)}.",
        "",
        f"c=1 slowest requests (ms, characters, place in the phase): paraphrase lookups "
        f"{_slowest(s)}; misses {_slowest(m)}.",
    ]
    return "\n".join(lines) + "\n"


def _shed(phase: dict[str, Any]) -> str:
    shed = phase.get("not_embedded", 0)
    return f"; {shed} not embedded (encoder busy: exact lookup only)" if shed else ""


def _thirds(phase: dict[str, Any]) -> str:
    return ", ".join(
        f"{t['chars_min']}-{t['chars_max']} chars {t['p50_ms']:.1f} / {t['p99_ms']:.1f}"
        for t in phase["by_length"]
    )


def _slowest(phase: dict[str, Any]) -> str:
    return ", ".join(
        f"{r['ms']:.1f} ms / {r['chars']} / #{r['position']}" for r in phase.get("slowest", [])
    )


def _cpu(phase: dict[str, Any]) -> str:
    c = phase["cpu_ms_per_request"]
    return f"{c['proxy']:.2f} / {c['engine']:.2f} / {c['client']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the variants phase")
    parser.add_argument(
        "--c64-pairs", type=int, default=400, help="new pairs for the c=64 phase (2 texts each)"
    )
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="the c=1 phases' think time: a pause after each answer before the next request "
        "(default none: back to back)",
    )
    parser.add_argument(
        "--max-queue-ms",
        type=float,
        default=None,
        help="embeddings.max_queue_ms of the proxies (default: null, no shedding, so every c=64 "
        "request is a semantic lookup; the proxy's own default is 100)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "cache_speed")
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16", "int8"),
        help="embeddings.precision of the proxies (default: the config default, auto)",
    )
    parser.add_argument(
        "--lookup-first",
        action="store_true",
        help="cache.lookup_beside_engine: false (the engine is asked after the semantic lookup "
        "has missed; by default it is asked while the lookup runs)",
    )
    parser.add_argument(
        "--cross",
        action="store_true",
        help="cache.cross_encoder: true (the verifier's optional cross-encoder stage)",
    )
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results, "python scripts/bench_cache_speed.py " + " ".join(sys.argv[1:]))
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
