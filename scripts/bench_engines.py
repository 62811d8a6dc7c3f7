"""Streaming through a proxy vs straight to real vLLM engines: tokens/s and time to first token.

    .venv/bin/python scripts/bench_engines.py --engine http://127.0.0.1:8101 \\
        --engine http://127.0.0.1:8102 --proxy http://127.0.0.1:8000 [--header "Authorization: ..."]

For each engine (its model name is read from its /v1/models), 16 concurrent streamed chat
requests run for ``--duration-s``, once straight to the engine and once through the proxy (with
``model`` set to that engine's model, so the proxy routes there), alternating which goes first,
for ``--rounds`` rounds; medians are reported. With several ``--proxy NAME=URL`` (two configurations
of a proxy, say), every round measures the direct side and each proxy, each side first in turn,
and each proxy is compared with the direct side of its own round: on an engine whose speed drifts
from minute to minute, that separates configurations that runs at different times cannot.

To resolve a few per cent on a CPU engine (docs/benchmarks.md, 2026-11-30 12:34):

    .venv/bin/python scripts/bench_engines.py --engine http://127.0.0.1:8101 \
        --proxy aa=http://127.0.0.1:8101 --proxy frugal=http://127.0.0.1:8000 \
        --misses --requests-per-stream 3 --rounds 12

``aa`` is the engine itself measured as a proxy: a control for what the harness alone reports.

Every request samples (temperature 0.7, no seed) so a caching proxy cannot answer from its cache,
or with ``--misses`` is greedy (temperature 0) on questions that are all different (from
``--prompts``, default ``../shared/data/routing_dev.csv.gz``'s prompts, shuffled), so a caching
proxy looks each one up, misses, and stores the answer once the stream has ended (the cache's
cost on the streaming path, measured). A handful of questions told apart only by a counter would
not do: a semantic cache takes them for paraphrases and answers some from memory. Each round
takes its own slice of the questions, and every side of the round asks that slice in the same
order: prompts of different lengths cost a CPU engine very different prefill time, and sides
given different questions differed by up to 10% with the same URL on both. Each question starts
with a run-unique counter, so vLLM's prefix cache cannot carry one side's prefill into another's
and no proxy sees a question twice. The proxy's cache hits during each
proxied phase (``frugal_cache_hits_total``) are reported, and should be 0 with ``--misses``.
Each request asks vLLM for exactly ``--max-tokens`` tokens (``ignore_eos``), so both sides
generate the same amount. Tokens come from the usage chunk (``stream_options.include_usage``).
TTFT is the time from sending the request to the first non-empty content delta.

Client: aiohttp (16 streams at CPU-engine speeds is a light load for it). Targets: proxied
tokens/s >= 0.98x direct; added TTFT (median) <= 2 ms. Output: ``--out``/engines.{md,json}.

Where the engines queue for seconds (a CPU host), the difference of two sides' TTFT medians
is mostly the engine's own spread. So each proxied phase also reads the proxy's own account of
what it added, ``frugal_proxy_overhead_seconds`` from its /metrics (request time not spent
waiting on the engine: parsing, policy, cache lookup and embedding, routing, the relay of the
first chunk), before and after the phase: its mean, and the bucket bounds of its p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import gzip
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.sse import DONE_PAYLOAD, SSEParser  # noqa: E402

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List the steps to bake bread at home, with brief reasons for each.",
    "Describe the water cycle and why it matters for farming.",
    "Write a polite email asking a colleague to review a document by Friday.",
    "Summarise the causes of the French Revolution in a few sentences.",
    "Give advice to someone learning to play the guitar as an adult.",
    "Explain the difference between a list and a tuple in Python.",
)


@dataclass
class Phase:
    """One side (direct or proxied) of one round."""

    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    first_error: str | None = None  # what the first failed request was told
    wall_s: float = 0.0
    # Steady-state throughput: content chunks that arrived inside [window_start, window_end].
    # Counting whole requests instead quantises by waves of `concurrency` requests.
    window_start: float = 0.0
    window_end: float = 0.0
    window_tokens: int = 0
    overhead: Overhead | None = None  # the proxy's own account (proxied side of a Frugal)
    cache_hits: float | None = None  # the proxy's cache hits during the phase (a Frugal)

    fixed_work: bool = False  # --requests-per-stream: every token over the whole phase

    @property
    def tokens_per_s(self) -> float:
        if self.fixed_work:
            return self.tokens / self.wall_s if self.wall_s > 0 else 0.0
        window = self.window_end - self.window_start
        return self.window_tokens / window if window > 0 else 0.0


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    phase: Phase,
) -> None:
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    counted = 0
    parser = SSEParser()
    try:
        # vLLM refuses a body without a JSON content type (415); the proxy does not care.
        headers = {"Content-Type": "application/json", **headers}
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                told = await resp.read()
                phase.errors += 1
                if phase.first_error is None:
                    phase.first_error = f"{resp.status} {told[:300]!r}"
                return
            async for piece in resp.content.iter_any():
                for payload in parser.feed(piece):
                    if payload == DONE_PAYLOAD:
                        continue
                    event = orjson.loads(payload)
                    if event.get("usage"):
                        tokens = int(event["usage"].get("completion_tokens") or 0)
                    for choice in event.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            counted += 1
                            now = time.perf_counter()
                            if phase.window_start <= now <= phase.window_end:
                                phase.window_tokens += 1
                            if first is None:
                                first = time.perf_counter()
    except (TimeoutError, aiohttp.ClientError) as exc:
        phase.errors += 1
        if phase.first_error is None:
            phase.first_error = repr(exc)
        return
    phase.requests += 1
    phase.tokens += tokens or counted  # usage when the server sent it, else content chunks
    if first is not None:
        phase.ttft_s.append(first - started)


async def run_phase(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    headers: dict[str, str],
    args: argparse.Namespace,
    proxy: str | None = None,
    questions: list[str] | None = None,
) -> Phase:
    """One side's phase; ``proxy``: that proxy's base URL, to read its own overhead account;
    ``questions``: with --misses, the round's questions, asked in order."""
    phase = Phase(fixed_work=args.requests_per_stream is not None)
    before = await proxy_metrics(session, proxy) if proxy else None
    shared = iter(questions) if questions is not None else itertools.cycle(PROMPTS)
    begin = time.perf_counter()
    deadline = begin + args.duration_s
    # Skip the first quarter: all workers start at once, so it is one big prefill burst.
    phase.window_start, phase.window_end = begin + args.duration_s / 4, deadline

    async def worker(index: int) -> None:
        prompts: Iterator[str] = shared
        if phase.fixed_work:
            # The same work on every side: stream ``index`` asks the same questions in the same
            # order, so only the speed of the path differs.
            count = args.requests_per_stream
            source = questions if questions is not None else list(PROMPTS) * count
            mine = source[index :: args.concurrency][:count]
            if len(mine) < count:
                raise SystemExit("too few questions a round for --requests-per-stream")
            prompts = iter(mine)
        while phase.fixed_work or time.perf_counter() < deadline:
            prompt = next(prompts, None)
            if prompt is None:
                if phase.fixed_work:
                    return
                if phase.errors:  # (failures are fast: they run through the questions)
                    raise SystemExit(
                        f"{url}: {phase.errors} requests failed, the first with {phase.first_error}"
                    )
                raise SystemExit("ran out of distinct questions: pass a larger --prompts file")
            if args.misses:
                # In front: a shared start would let vLLM reuse another side's prefill.
                prompt = f"(request {args.run_id}-{next(args.unique)}) {prompt}"
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": args.max_tokens,
                "temperature": 0 if args.misses else 0.7,
                "ignore_eos": True,  # vLLM: always generate max_tokens, on both sides
            }
            await one_stream(session, url, body, headers, phase)

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(args.concurrency)))
    phase.wall_s = time.perf_counter() - started
    after = await proxy_metrics(session, proxy) if proxy and before else None
    if before is not None and after is not None:
        start, end = parse_overhead(before), parse_overhead(after)
        if start is not None and end is not None:
            phase.overhead = end.minus(start)
        phase.cache_hits = parse_total(after, HITS_METRIC) - parse_total(before, HITS_METRIC)
    return phase


OVERHEAD_METRIC = "frugal_proxy_overhead_seconds"
HITS_METRIC = "frugal_cache_hits_total"
_LE = re.compile(r'le="([^"]+)"')


@dataclass
class Overhead:
    """The proxy's overhead histogram (summed over tiers), or its change over a phase."""

    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    total_s: float = 0.0
    count: float = 0.0

    def plus(self, other: Overhead, sign: float = 1.0) -> Overhead:
        bounds = self.buckets.keys() | other.buckets.keys()
        return Overhead(
            {le: self.buckets.get(le, 0.0) + sign * other.buckets.get(le, 0.0) for le in bounds},
            self.total_s + sign * other.total_s,
            self.count + sign * other.count,
        )

    def minus(self, before: Overhead) -> Overhead:
        return self.plus(before, sign=-1.0)

    def bound(self, q: float) -> float:
        """The smallest bucket bound that holds at least ``q`` of the requests (seconds)."""
        for le in sorted(self.buckets):
            if self.buckets[le] >= q * self.count:
                return le
        return math.inf


async def proxy_metrics(session: aiohttp.ClientSession, base: str) -> str | None:
    """The proxy's /metrics page, or None when it has none (not Frugal)."""
    try:
        async with session.get(f"{base}/metrics") as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except aiohttp.ClientError:
        return None


def parse_total(text: str, metric: str) -> float:
    """A counter summed over its labels, out of a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and line[len(metric) : len(metric) + 1] in ("{", " "):
            total += float(line.rpartition(" ")[2])
    return total


def parse_overhead(text: str) -> Overhead | None:
    """``frugal_proxy_overhead_seconds`` out of a Prometheus text page, summed over tiers."""
    found = Overhead()
    for line in text.splitlines():
        if not line.startswith(OVERHEAD_METRIC):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(f"{OVERHEAD_METRIC}_bucket"):
            match = _LE.search(name)
            if match:
                le = float(match.group(1))  # "+Inf" reads as inf
                found.buckets[le] = found.buckets.get(le, 0.0) + float(value)
        elif name.startswith(f"{OVERHEAD_METRIC}_sum"):
            found.total_s += float(value)
        elif name.startswith(f"{OVERHEAD_METRIC}_count"):
            found.count += float(value)
    return found if found.buckets else None


async def engine_model(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/v1/models") as resp:
        resp.raise_for_status()
        data = await resp.json()
    model: str = data["data"][0]["id"]
    return model


DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "routing_dev.csv.gz"
# More than a timed phase asks: 16 streams x (duration / a request's ~15 s on a CPU engine).
TIMED_QUESTIONS_PER_ROUND = 400


def load_questions(path: Path) -> list[str]:
    """Distinct questions of ordinary length (20-400 characters), shuffled with a fixed seed so
    runs send the same sequence: ``prompt`` column of a CSV (gzip if .gz), or lines of text."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if ".csv" in path.name:
            texts = [row["prompt"] for row in csv.DictReader(f)]
        else:
            texts = f.read().splitlines()
    questions = sorted({t.strip() for t in texts if 20 <= len(t.strip()) <= 400})
    random.Random(0).shuffle(questions)
    if not questions:
        raise SystemExit(f"no questions of 20-400 characters in {path}")
    return questions


class QuestionSlices:
    """Consecutive slices of the questions, one a round (and one for the warm-up): no question is
    asked in two rounds."""

    def __init__(self, questions: list[str]) -> None:
        self._questions, self._next = questions, 0

    def take(self, size: int) -> list[str]:
        taken = self._questions[self._next : self._next + size]
        if len(taken) < size:
            raise SystemExit("ran out of distinct questions: pass a larger --prompts file")
        self._next += size
        return taken


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    # --misses: prompts unique to this run, so a cache kept from an earlier run misses too
    args.run_id, args.unique = os.urandom(4).hex(), itertools.count()
    slices = QuestionSlices(load_questions(args.prompts) if args.misses else [])
    # Fixed work asks exactly its requests; a phase of fixed time, as many as its streams reach.
    per_round = (
        args.concurrency * args.requests_per_stream
        if args.requests_per_stream
        else TIMED_QUESTIONS_PER_ROUND
    )

    def next_slice(size: int) -> list[str] | None:
        """The next round's questions (every side of a round asks the same ones)."""
        return slices.take(size) if args.misses else None

    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for engine in args.engine:
            base = engine.rstrip("/")
            model = await engine_model(session, base)
            sides: dict[str, tuple[str, dict[str, str], str | None]] = {
                "direct": (f"{base}/v1/chat/completions", {}, None)
            }
            for name, proxy in args.proxies:
                sides[name] = (f"{proxy}/v1/chat/completions", headers, proxy)
            # Warm-up both paths (connections, engine prefix cache, proxy start-up work).
            warm = argparse.Namespace(
                **{**vars(args), "duration_s": args.warmup_s, "requests_per_stream": None}
            )
            warm_questions = next_slice(TIMED_QUESTIONS_PER_ROUND)
            for url, side_headers, _ in sides.values():
                await run_phase(session, url, model, side_headers, warm, None, warm_questions)
            rounds = []
            names = list(sides)
            for index in range(args.rounds):
                # each side first in turn (two sides: alternating), so none always follows another
                shift = index % len(names)
                order = names[shift:] + names[:shift]
                measured: dict[str, Phase] = {}
                round_questions = next_slice(per_round)
                for side in order:
                    url, side_headers, account = sides[side]
                    measured[side] = await run_phase(
                        session, url, model, side_headers, args, account, round_questions
                    )
                    p = measured[side]
                    own, o = "", p.overhead
                    if o is not None and o.count:
                        own = f", proxy's own time mean {o.total_s / o.count * 1000:.2f} ms"
                        own += f" (p99 <= {o.bound(0.99) * 1000:g} ms)"
                    if p.cache_hits is not None:
                        own += f", {p.cache_hits:g} cache hits"
                        if p.cache_hits and args.misses:
                            own += " (NOT all misses: the ratio is not the misses' figure)"
                    print(
                        f"{model} round {index + 1} {side}: {p.tokens_per_s:.1f} tok/s,"
                        f" TTFT p50 {statistics.median(p.ttft_s or [float('nan')]) * 1000:.1f}"
                        f" ms, {p.requests} requests, {p.errors} errors{own}",
                        flush=True,
                    )
                rounds.append(measured)
            for name, _ in args.proxies:
                label = model if len(args.proxies) == 1 else f"{model} via {name}"
                results[label] = summarise(
                    [{"direct": r["direct"], "proxied": r[name]} for r in rounds]
                )
    return results


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(mean, mean - 2 SE, mean + 2 SE) of the rounds' ratios: about a 95% interval for the
    ratio. One round's ratio moves by several per cent on a CPU engine, so whether a 0.98
    target is met or missed shows in the interval, not in a median of three rounds."""
    mean = statistics.fmean(ratios)
    if len(ratios) < 2:
        return mean, float("-inf"), float("inf")
    half = 2 * statistics.stdev(ratios) / math.sqrt(len(ratios))
    return mean, mean - half, mean + half


def summarise(rounds: list[dict[str, Phase]]) -> dict[str, Any]:
    def med(side: str, fn: Callable[[Phase], float]) -> float:
        return statistics.median(fn(r[side]) for r in rounds)

    row: dict[str, Any] = {}
    ratios = [
        r["proxied"].tokens_per_s / r["direct"].tokens_per_s
        for r in rounds
        if r["direct"].tokens_per_s
    ]
    row["ratios"] = [round(ratio, 3) for ratio in ratios]
    for side in ("direct", "proxied"):
        row[side] = {
            "tokens_per_s": med(side, lambda p: p.tokens_per_s),
            "ttft_p50_ms": med(side, lambda p: pct(p.ttft_s, 0.5) * 1000),
            "ttft_p90_ms": med(side, lambda p: pct(p.ttft_s, 0.9) * 1000),
            "requests": sum(r[side].requests for r in rounds),
            "errors": sum(r[side].errors for r in rounds),
        }
    row["tokens_ratio"] = statistics.median(ratios)
    row["added_ttft_p50_ms"] = statistics.median(
        (pct(r["proxied"].ttft_s, 0.5) - pct(r["direct"].ttft_s, 0.5)) * 1000 for r in rounds
    )
    hits = [r["proxied"].cache_hits for r in rounds if r["proxied"].cache_hits is not None]
    if hits:
        row["proxied"]["cache_hits"] = sum(hits)
    accounts = [r["proxied"].overhead for r in rounds if r["proxied"].overhead is not None]
    if accounts:
        merged = functools.reduce(Overhead.plus, accounts, Overhead())
        if merged.count:
            row["proxy_own"] = {
                "requests": int(merged.count),
                "mean_ms": merged.total_s / merged.count * 1000,
                "p50_le_ms": merged.bound(0.5) * 1000,
                "p99_le_ms": merged.bound(0.99) * 1000,
            }
    if ratios:
        row["ratio_mean"], row["ratio_low"], row["ratio_high"] = ratio_interval(ratios)
    row["pass_tokens"] = row["tokens_ratio"] >= 0.98
    row["pass_ttft"] = row["added_ttft_p50_ms"] <= 2.0
    return row


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
    work = (
        f"{meta['requests_per_stream']} requests per stream (the same on every side)"
        if meta.get("requests_per_stream")
        else f"{meta['duration_s']} s per side"
    )
    lines = [
        f"# Engines direct vs proxied ({meta['date']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['concurrency']} concurrent streamed chats, max_tokens {meta['max_tokens']}"
        f" (ignore_eos), {work}, {meta['rounds']} rounds, each side"
        f" first in turn; medians. Load average before {meta['load_before']},"
        f" after {meta['load_after']}.",
        "",
        "| model | direct tok/s | proxied tok/s | ratio (>= 0.98) | mean ratio, ±2 SE |"
        " ratio by round | direct TTFT p50 ms | proxied TTFT p50 ms | added TTFT p50 ms (<= 2) |"
        " errors d/p | proxy cache hits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, row in results.items():
        d, p = row["direct"], row["proxied"]
        lines.append(
            f"| {model} | {d['tokens_per_s']:.1f} | {p['tokens_per_s']:.1f} |"
            f" {row['tokens_ratio']:.3f} {'PASS' if row['pass_tokens'] else 'FAIL'} |"
            f" {row.get('ratio_mean', math.nan):.3f} ({row.get('ratio_low', math.nan):.3f}"
            f" to {row.get('ratio_high', math.nan):.3f}) |"
            f" {', '.join(f'{x:.2f}' for x in row['ratios'])} |"
            f" {d['ttft_p50_ms']:.1f} | {p['ttft_p50_ms']:.1f} |"
            f" {row['added_ttft_p50_ms']:+.1f} {'PASS' if row['pass_ttft'] else 'FAIL'} |"
            f" {d['errors']}/{p['errors']} | {p.get('cache_hits', '-')} |"
        )
    own = {model: row["proxy_own"] for model, row in results.items() if "proxy_own" in row}
    if own:
        lines += [
            "",
            "The proxy's own account of the time it added per proxied request"
            " (`frugal_proxy_overhead_seconds`, read from its /metrics before and after each"
            " phase; p50 and p99 as the histogram's bucket bounds):",
            "",
            "| model | requests | mean ms | p50 <= ms | p99 <= ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for model, o in own.items():
            lines.append(
                f"| {model} | {o['requests']} | {o['mean_ms']:.2f} | {o['p50_le_ms']:g} |"
                f" {o['p99_le_ms']:g} |"
            )
    return "\n".join(lines) + "\n"


def proxy_side(value: str, count: int) -> tuple[str, str]:
    """``NAME=URL`` or ``URL`` (named "proxied" when it is the only one, else by its port)."""
    name, sep, url = value.partition("=")
    if not sep or "://" in name:
        url = value
        name = "proxied" if count == 1 else url.rstrip("/").rsplit(":", 1)[-1]
    return name, url.rstrip("/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", action="append", required=True, help="vLLM base URL")
    parser.add_argument(
        "--proxy",
        action="append",
        required=True,
        help="proxy base URL, or NAME=URL; several proxies are measured in the same rounds, "
        "each first in turn, each against the direct side of its round",
    )
    parser.add_argument("--header", action="append", default=[], help="'Name: value' to proxy")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--misses",
        action="store_true",
        help="greedy, run-unique prompts: a caching proxy misses and stores every answer",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="with --misses: distinct questions, a CSV with a prompt column or a text file",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--requests-per-stream",
        type=int,
        help="fixed work instead of --duration-s: each stream sends this many requests, the "
        "same ones on every side, and tokens/s is all tokens over the phase's wall time "
        "(a window of a fixed time catches the waves of prefill at different points)",
    )
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "engines")
    args = parser.parse_args()
    args.proxies = [proxy_side(value, len(args.proxy)) for value in args.proxy]
    if len({name for name, _ in args.proxies} | {"direct"}) != len(args.proxies) + 1:
        parser.error("each --proxy needs its own NAME (and none called direct)")
    load_before = os.getloadavg()
    results = asyncio.run(bench(args))
    now = datetime.now(UTC)
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "duration_s": args.duration_s,
        "requests_per_stream": args.requests_per_stream,
        "rounds": args.rounds,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    markdown = render(meta, results)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    for stem in ("engines", f"engines-{stamp}"):
        (args.out / f"{stem}.md").write_text(markdown)
        (args.out / f"{stem}.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=2)
        )
    print(markdown)


if __name__ == "__main__":
    main()
