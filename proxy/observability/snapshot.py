"""The dashboard's JSON snapshot, computed purely from metric samples and recent latencies.

Counts in the snapshot are cumulative since start; the page turns them into rates from the
difference between two polls. Latency percentiles are exact over the recent window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    """One exposition sample: full name (with suffix), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """One finished request as the recent-percentile window keeps it."""

    at: float
    latency_s: float
    ttft_s: float | None
    overhead_s: float | None


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of already sorted values, by linear interpolation; None if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50/p95/p99 of the values (None each when there are none)."""
    ordered = sorted(values)
    return {name: quantile(ordered, q) for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


def _is_failure(status: str) -> bool:
    """Whether a finished request's status label is a failure of the proxy or an engine: a 5xx,
    as the alert rules and the Grafana panel count it (a label that is no number: not hidden). A
    4xx is the client's own doing (a bad body, a refused key, a limit, or 499: it hung up)."""
    return not status.isdigit() or int(status) >= 500


# Shadow checks per tier (proxy/shadow/metrics.py): the audited false-hit rate and its bounds.
_AUDIT_FIELDS = {
    "frugal_cache_audit_disagreement_rate": "audit_rate",
    "frugal_cache_audit_disagreement_rate_low": "audit_low",
    "frugal_cache_audit_disagreement_rate_high": "audit_high",
    "frugal_cache_audit_window": "audits",
}


def _tier_row() -> dict[str, float]:
    return {
        "requests": 0.0,
        "cost_usd": 0.0,
        "saved_cache_usd": 0.0,
        "saved_routing_usd": 0.0,
        "budget_spent_usd": 0.0,
    }


def _replica_row() -> dict[str, Any]:
    return {"healthy": None, "running": 0.0, "waiting": 0.0, "kv_usage": 0.0, "breaker": None}


def build_snapshot(
    *,
    samples: Iterable[Sample],
    recent: Sequence[RecentRequest],
    window_s: float,
    now_unix: float,
    uptime_s: float,
) -> dict[str, Any]:
    """Summarise the registry's samples for the dashboard.

    Shape (all counts cumulative)::

        time, uptime_s,
        requests: {total, errors (5xx), in_flight, by_status, by_tier, by_cache, by_engine},
        tokens: {in, out},
        latency: {window_s, count, total|ttft|overhead: {p50, p95, p99}}   (seconds),
        cache: {<kind>: {lookups, hits, hit_rate}}, cache_errors,
        routes: {by_engine, by_reason},
        engines: {<engine>: {running, waiting, queue_length, healthy_replicas, replicas:
                  {<replica>: {healthy, running, waiting, kv_usage, breaker}}}},
        tiers: {<tier>: {requests, cost_usd, saved_cache_usd, saved_routing_usd, budget_spent_usd,
                         budget_limit_usd?, audits?, audit_rate?, audit_low?, audit_high?,
                         cache_cutoff?, strong_share?}},
        totals: {cost_usd, saved_cache_usd, saved_routing_usd},
        rejections: {admission, policy, upstream_retries}
    """
    by_status: dict[str, float] = {}
    by_tier: dict[str, float] = {}
    by_cache: dict[str, float] = {}
    by_engine: dict[str, float] = {}
    tokens = {"in": 0.0, "out": 0.0}
    lookups: dict[str, float] = {}
    hits: dict[str, float] = {}
    routes_engine: dict[str, float] = {}
    routes_reason: dict[str, float] = {}
    tiers: dict[str, dict[str, float]] = {}
    engines: dict[str, dict[str, Any]] = {}
    rejections = {"admission": 0.0, "policy": 0.0, "upstream_retries": 0.0}
    cache_errors = 0.0
    in_flight = 0.0

    def tier(name: str) -> dict[str, float]:
        return tiers.setdefault(name, _tier_row())

    def engine(name: str) -> dict[str, Any]:
        return engines.setdefault(name, {"queue_length": 0.0, "replicas": {}})

    def replica(labels: dict[str, str]) -> dict[str, Any]:
        replicas: dict[str, dict[str, Any]] = engine(labels["engine"])["replicas"]
        return replicas.setdefault(labels["replica"], _replica_row())

    for s in samples:
        name, labels, value = s.name, s.labels, s.value
        if name == "frugal_requests_total":
            _add(by_status, labels["status"], value)
            _add(by_tier, labels["tier"], value)
            _add(by_cache, labels["cache"], value)
            _add(by_engine, labels["engine"], value)
            tier(labels["tier"])["requests"] += value
        elif name == "frugal_tokens_in_total":
            tokens["in"] += value
        elif name == "frugal_tokens_out_total":
            tokens["out"] += value
        elif name == "frugal_cost_usd_total":
            tier(labels["tier"])["cost_usd"] += value
        elif name == "frugal_saved_usd_total":
            tier(labels["tier"])[f"saved_{labels['source']}_usd"] += value
        elif name == "frugal_budget_spent_usd":
            tier(labels["tier"])["budget_spent_usd"] = value
        elif name == "frugal_budget_limit_usd":
            tier(labels["tier"])["budget_limit_usd"] = value
        elif name == "frugal_requests_in_flight":
            in_flight += value
        elif name == "frugal_cache_lookups_total":
            _add(lookups, labels["kind"], value)
        elif name == "frugal_cache_hits_total":
            _add(hits, labels["kind"], value)
        elif name == "frugal_cache_errors_total":
            cache_errors += value
        elif name == "frugal_route_decisions_total":
            _add(routes_engine, labels["engine"], value)
            _add(routes_reason, labels["reason"], value)
        elif name == "frugal_queue_length":
            engine(labels["engine"])["queue_length"] = value
        elif name == "frugal_admission_rejected_total":
            rejections["admission"] += value
        elif name == "frugal_policy_rejected_total":
            rejections["policy"] += value
        elif name == "frugal_upstream_retries_total":
            rejections["upstream_retries"] += value
        elif name == "frugal_engine_up":
            replica(labels)["healthy"] = value >= 1.0
        elif name == "frugal_engine_requests_running":
            replica(labels)["running"] = value
        elif name == "frugal_engine_requests_waiting":
            replica(labels)["waiting"] = value
        elif name == "frugal_engine_kv_cache_usage_ratio":
            replica(labels)["kv_usage"] = value
        elif name == "frugal_breaker_state" and value >= 1.0:
            replica(labels)["breaker"] = labels["state"]
        elif name in _AUDIT_FIELDS:
            tier(labels["tier"])[_AUDIT_FIELDS[name]] = value
        elif name == "frugal_threshold":
            tier(labels["tier"])[labels["kind"]] = value

    for row in engines.values():
        replicas = row["replicas"].values()
        row["running"] = sum(r["running"] for r in replicas)
        row["waiting"] = sum(r["waiting"] for r in replicas)
        row["healthy_replicas"] = sum(1 for r in replicas if r["healthy"])

    cache = {
        kind: {
            "lookups": count,
            "hits": hits.get(kind, 0.0),
            "hit_rate": hits.get(kind, 0.0) / count if count else None,
        }
        for kind, count in sorted(lookups.items())
    }
    errors = sum(v for status, v in by_status.items() if _is_failure(status))
    return {
        "time": now_unix,
        "uptime_s": uptime_s,
        "requests": {
            "total": sum(by_status.values()),
            "errors": errors,
            "in_flight": in_flight,
            "by_status": by_status,
            "by_tier": by_tier,
            "by_cache": by_cache,
            "by_engine": by_engine,
        },
        "tokens": tokens,
        "latency": {
            "window_s": window_s,
            "count": len(recent),
            "total": percentiles(r.latency_s for r in recent),
            "ttft": percentiles(r.ttft_s for r in recent if r.ttft_s is not None),
            "overhead": percentiles(r.overhead_s for r in recent if r.overhead_s is not None),
        },
        "cache": cache,
        "cache_errors": cache_errors,
        "routes": {"by_engine": routes_engine, "by_reason": routes_reason},
        "engines": engines,
        "tiers": tiers,
        "totals": {
            key: sum(row.get(key, 0.0) for row in tiers.values())
            for key in ("cost_usd", "saved_cache_usd", "saved_routing_usd")
        },
        "rejections": rejections,
    }
