"""Pure summary of a replay: percentiles, hit rates, route mix, tokens, cost, quality.

Everything here works on finished :class:`RequestResult` records, so the numbers can be tested
without a server and recomputed from a saved results file.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CACHE_KINDS = ("hit-exact", "hit-semantic", "miss", "bypass")
HIT_KINDS = frozenset({"hit-exact", "hit-semantic"})
NO_HEADER = "none"


@dataclass(frozen=True, slots=True)
class EngineCost:
    """Price of one engine's tokens, per million (any currency, as long as it is one)."""

    input_per_mtok: float
    output_per_mtok: float

    def of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok
        ) / 1e6


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What one replayed request produced; ``started_s`` is seconds from the start of the run."""

    index: int
    status: int | None
    latency_s: float | None
    started_s: float = 0.0
    error: str | None = None
    ttft_s: float | None = None
    stream: bool = False
    endpoint: str = "chat"
    cache: str | None = None
    route: str | None = None
    route_reason: str | None = None
    engine: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    answer_digest: str | None = None
    group: str | None = None
    kind: str | None = None
    sampled: bool = False
    ref: dict[str, float] = field(default_factory=dict)
    # How late the request left compared with its planned send time (a saturated concurrency
    # limit delays sends; latencies alone would hide that, the "coordinated omission" trap).
    lag_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def cache_kind(self) -> str:
        return self.cache or NO_HEADER

    @property
    def answered_by(self) -> str | None:
        """The engine whose answer this is (for a hit: the engine that made the cached entry)."""
        return self.engine or self.route

    @property
    def engine_called(self) -> bool:
        """A hit costs no engine tokens; anything else that succeeded did call an engine."""
        return self.ok and self.cache_kind not in HIT_KINDS


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def latency_stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "count": float(len(values)),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def error_key(result: RequestResult) -> str | None:
    """How an error is counted: by HTTP status, or by what went wrong before/after the status."""
    if result.ok:
        return None
    if result.status is not None and result.status != 200:
        return str(result.status)
    return result.error or "unknown"


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {key: (count / total if total else 0.0) for key, count in sorted(counts.items())}


def engine_roles(
    costs: Mapping[str, EngineCost], explicit: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Map engine names to the trace's reference roles (``weak``/``strong``).

    Explicit pairs win; otherwise the cheapest engine plays ``weak`` and the dearest ``strong``,
    which is how a two-engine router deployment is built.
    """
    roles: dict[str, str] = {}
    by_price = sorted(
        costs, key=lambda name: (costs[name].input_per_mtok + costs[name].output_per_mtok, name)
    )
    if len(by_price) >= 2:
        cheapest, dearest = costs[by_price[0]], costs[by_price[-1]]
        if cheapest != dearest:
            roles[by_price[0]] = "weak"
            roles[by_price[-1]] = "strong"
    roles.update(explicit or {})
    return roles


def tokens_by_engine(results: Iterable[RequestResult]) -> dict[str, dict[str, int]]:
    """Tokens the engines actually processed (hits excluded), per engine."""
    out: dict[str, dict[str, int]] = {}
    for result in results:
        if not result.engine_called:
            continue
        name = result.answered_by or "unknown"
        entry = out.setdefault(name, {"requests": 0, "prompt": 0, "completion": 0})
        entry["requests"] += 1
        entry["prompt"] += result.prompt_tokens
        entry["completion"] += result.completion_tokens
    return dict(sorted(out.items()))


def cost_summary(
    results: Sequence[RequestResult], costs: Mapping[str, EngineCost]
) -> dict[str, Any]:
    """Engine spend, per 1,000 requests, and the spend the cache's hits avoided.

    Engines missing from the cost table are listed under ``unpriced`` instead of counting as free
    silently.
    """
    by_engine: dict[str, float] = {}
    unpriced: set[str] = set()
    avoided = 0.0
    for result in results:
        if not result.ok:
            continue
        name = result.answered_by or "unknown"
        price = costs.get(name)
        if price is None:
            unpriced.add(name)
            continue
        spend = price.of(result.prompt_tokens, result.completion_tokens)
        if result.engine_called:
            by_engine[name] = by_engine.get(name, 0.0) + spend
        else:
            avoided += spend
    total = sum(by_engine.values())
    return {
        "total": total,
        "per_1k_requests": 1000.0 * total / len(results) if results else 0.0,
        "by_engine": dict(sorted(by_engine.items())),
        "avoided_by_cache": avoided,
        "unpriced_engines": sorted(unpriced),
    }


def cache_quality(results: Iterable[RequestResult]) -> dict[str, dict[str, Any]]:
    """False-hit estimate from the trace's ``group`` labels.

    The proxy does not say which request created a cache entry, but a hit returns that request's
    answer, so the answer's digest leads back to the requests that produced it (the misses and
    bypasses of this run). A hit is *false* when none of those producers asked the same question
    (group); *unknown* when the answer was made before this run or the request has no group;
    *ambiguous* when several groups produced the same answer text (only the own group is credited).
    """
    producers: dict[str, set[str]] = {}
    hits: list[RequestResult] = []
    for result in results:
        if not result.ok or result.answer_digest is None:
            continue
        if result.cache_kind in HIT_KINDS:
            hits.append(result)
        elif result.group is not None:
            producers.setdefault(result.answer_digest, set()).add(result.group)
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(HIT_KINDS):
        tally = Counter[str]()
        for hit in (h for h in hits if h.cache_kind == kind):
            groups = producers.get(hit.answer_digest or "")
            if hit.group is None or not groups:
                tally["unknown"] += 1
            elif hit.group not in groups:
                tally["false"] += 1
            else:
                tally["correct"] += 1
                if len(groups) > 1:
                    tally["ambiguous"] += 1
            if hit.sampled:
                tally["sampled"] += 1
        judged = tally["false"] + tally["correct"]
        out[kind] = {
            "hits": sum(tally[k] for k in ("unknown", "false", "correct")),
            "correct": tally["correct"],
            "false": tally["false"],
            "unknown": tally["unknown"],
            "ambiguous": tally["ambiguous"],
            "sampled_requests_hit": tally["sampled"],
            "false_hit_rate": tally["false"] / judged if judged else None,
        }
    return out


def routing_quality(
    results: Iterable[RequestResult], roles: Mapping[str, str]
) -> dict[str, Any] | None:
    """Expected quality of the answers given, from per-prompt reference scores.

    A request's score is its reference score for the engine that answered it (looked up by the
    engine's name, then its role). Baselines send everything to the weak or the strong engine;
    ``gap_recovered`` is the share of the weak-to-strong quality gap the routing kept.
    """
    scores: list[float] = []
    weak: list[float] = []
    strong: list[float] = []
    to_strong = 0
    unscored = 0
    for result in results:
        if not result.ok or not result.ref:
            continue
        engine = result.answered_by
        role = roles.get(engine or "")
        score = result.ref.get(engine or "", result.ref.get(role or ""))
        if score is None:
            unscored += 1
            continue
        scores.append(score)
        to_strong += role == "strong"
        if "weak" in result.ref and "strong" in result.ref:
            weak.append(result.ref["weak"])
            strong.append(result.ref["strong"])
    if not scores:
        return None if not unscored else {"scored": 0, "unscored": unscored}
    mean = sum(scores) / len(scores)
    summary: dict[str, Any] = {
        "scored": len(scores),
        "unscored": unscored,
        "mean_quality": mean,
        "share_to_strong": to_strong / len(scores),
    }
    if len(weak) == len(scores):
        weak_mean, strong_mean = sum(weak) / len(weak), sum(strong) / len(strong)
        summary["all_weak_quality"] = weak_mean
        summary["all_strong_quality"] = strong_mean
        gap = strong_mean - weak_mean
        summary["gap_recovered"] = (mean - weak_mean) / gap if gap > 0 else None
    return summary


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    costs: Mapping[str, EngineCost] | None = None,
    roles: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole JSON summary of one replay."""
    costs = costs or {}
    roles = engine_roles(costs, roles)
    ok = [r for r in results if r.ok]
    cache_counts = Counter(r.cache_kind for r in ok)
    route_counts = Counter(r.route or NO_HEADER for r in ok)
    reason_counts = Counter(r.route_reason or NO_HEADER for r in ok)
    errors = Counter(key for key in map(error_key, results) if key is not None)
    hits = sum(cache_counts[k] for k in HIT_KINDS)
    latency_by_cache = {
        kind: latency_stats(
            [r.latency_s for r in ok if r.cache_kind == kind and r.latency_s is not None]
        )
        for kind in sorted(cache_counts)
    }
    return {
        "requests": len(results),
        "ok": len(ok),
        "duration_s": duration_s,
        "requests_per_s": len(results) / duration_s if duration_s > 0 else None,
        "latency_s": latency_stats([r.latency_s for r in ok if r.latency_s is not None]),
        "latency_by_cache_s": latency_by_cache,
        "ttft_s": latency_stats([r.ttft_s for r in ok if r.stream and r.ttft_s is not None]),
        "streamed": sum(r.stream for r in results),
        "send_lag_s": latency_stats([r.lag_s for r in results]),
        "cache": {
            "counts": {
                kind: cache_counts.get(kind, 0)
                for kind in (*CACHE_KINDS, *sorted(set(cache_counts) - set(CACHE_KINDS)))
            },
            "rates": shares(cache_counts),
            "hit_rate": hits / len(ok) if ok else 0.0,
        },
        "routes": {
            "counts": dict(sorted(route_counts.items())),
            "share": shares(route_counts),
            "reasons": dict(sorted(reason_counts.items())),
        },
        "tokens": {
            "by_engine": tokens_by_engine(results),
            "estimated_requests": sum(r.usage_estimated for r in ok),
        },
        "cost": cost_summary(results, costs),
        "errors": dict(sorted(errors.items())),
        "quality": {
            "cache": cache_quality(results),
            "routing": routing_quality(results, roles),
            "engine_roles": dict(sorted(roles.items())),
        },
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if unit == "ms":
            return f"{value * 1000:.1f} ms"
        if unit == "%":
            return f"{value * 100:.1f}%"
        return f"{value:.4g}"
    return f"{value}{unit}"


def format_table(summary: Mapping[str, Any]) -> str:
    """A readable terminal rendering of :func:`summarize`'s output."""
    rows: list[tuple[str, str]] = [
        ("requests", f"{summary['requests']} ({summary['ok']} ok, {summary['streamed']} streamed)"),
        ("duration", _fmt(summary["duration_s"]) + " s"),
        ("throughput", _fmt(summary["requests_per_s"]) + " req/s"),
    ]
    for label, key in (("latency", "latency_s"), ("TTFT (streamed)", "ttft_s")):
        stats = summary[key]
        if stats:
            rows.append(
                (label, "  ".join(f"{p} {_fmt(stats[p], 'ms')}" for p in ("p50", "p95", "p99")))
            )
    lag = summary.get("send_lag_s")
    if lag:
        rows.append(
            ("sent behind plan", f"p50 {_fmt(lag['p50'], 'ms')}  p99 {_fmt(lag['p99'], 'ms')}")
        )
    cache = summary["cache"]
    rows.append(("cache hit rate", _fmt(cache["hit_rate"], "%")))
    for kind, count in cache["counts"].items():
        rows.append((f"  {kind}", f"{count}  ({_fmt(cache['rates'].get(kind, 0.0), '%')})"))
    rows.append(("routes", ""))
    for engine, count in summary["routes"]["counts"].items():
        rows.append((f"  {engine}", f"{count}  ({_fmt(summary['routes']['share'][engine], '%')})"))
    reasons = summary["routes"]["reasons"]
    if reasons:
        rows.append(("route reasons", ", ".join(f"{k}={v}" for k, v in reasons.items())))
    for engine, tokens in summary["tokens"]["by_engine"].items():
        rows.append(
            (
                f"tokens {engine}",
                f"{tokens['prompt']} in / {tokens['completion']} out ({tokens['requests']} calls)",
            )
        )
    estimated = summary["tokens"].get("estimated_requests", 0)
    if estimated:
        # their answers carried no usage: tokens (and so cost) guessed from the text's length
        rows.append(("usage estimated", f"{estimated} requests (no usage in the answer)"))
    cost = summary["cost"]
    rows.append(("cost total", _fmt(cost["total"])))
    rows.append(("cost / 1k requests", _fmt(cost["per_1k_requests"])))
    rows.append(("cost avoided by cache", _fmt(cost["avoided_by_cache"])))
    if cost["unpriced_engines"]:
        rows.append(("unpriced engines", ", ".join(cost["unpriced_engines"])))
    errors = summary["errors"]
    rows.append(("errors", ", ".join(f"{k}={v}" for k, v in errors.items()) or "none"))
    for kind, quality in summary["quality"]["cache"].items():
        if quality["hits"]:
            rows.append(
                (
                    f"{kind} false-hit rate",
                    f"{_fmt(quality['false_hit_rate'], '%')} "
                    f"({quality['false']} false, {quality['correct']} correct, "
                    f"{quality['unknown']} unknown)",
                )
            )
    routing = summary["quality"]["routing"]
    if routing and routing.get("scored"):
        line = f"{_fmt(routing['mean_quality'])} over {routing['scored']} prompts"
        if "all_strong_quality" in routing:
            line += (
                f" (all-weak {_fmt(routing['all_weak_quality'])}, "
                f"all-strong {_fmt(routing['all_strong_quality'])}, "
                f"gap recovered {_fmt(routing['gap_recovered'], '%')}, "
                f"{_fmt(routing['share_to_strong'], '%')} to strong)"
            )
        rows.append(("routing quality", line))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}".rstrip() for label, value in rows)
