"""Should a canary be rolled back? A pure comparison of two windows of engine answers.

Error rate: the canary trips when the *lower* Wilson bound of its error rate exceeds the *upper*
Wilson bound of the stable's error rate plus the allowed delta. Both bounds at the configured
confidence, so a trip means the canary is worse beyond the bound with (at least) that confidence;
the comparison is conservative (it needs clear separation), never trigger-happy on a few errors.

Latency: the canary trips when the lower confidence bound of its p95 exceeds the allowed ratio
times the upper confidence bound of the stable's p95. The bounds are distribution-free order
statistics (the rank of a quantile estimate is binomial), so no latency distribution is assumed.

Neither check runs until both versions have at least ``min_requests`` answers in the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

from proxy.stats import wilson_interval


@dataclass(frozen=True, slots=True)
class Window:
    """Engine answers of one version in the judged window."""

    requests: int
    errors: int
    latencies: Sequence[float]  # seconds, of the successful answers, sorted ascending


@dataclass(frozen=True, slots=True)
class Bounds:
    min_requests: int = 200
    max_error_rate_delta: float = 0.02
    max_latency_ratio: float = 1.5
    confidence: float = 0.99


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str  # "error_rate" or "latency": a metric label
    detail: str  # for the log line and the status endpoint


def z_score(confidence: float) -> float:
    """One-sided normal quantile for ``confidence`` (0.99 -> 2.326)."""
    return NormalDist().inv_cdf(confidence)


def quantile_bounds(sorted_values: Sequence[float], q: float, z: float) -> tuple[float, float]:
    """Order-statistic confidence bounds of the ``q`` quantile of the values' distribution."""
    n = len(sorted_values)
    if n == 0:
        return 0.0, math.inf
    spread = z * math.sqrt(n * q * (1 - q))
    low = max(0, math.floor(n * q - spread) - 1)
    high = min(n - 1, math.ceil(n * q + spread))
    return sorted_values[low], sorted_values[high]


def judge(canary: Window, stable: Window, bounds: Bounds) -> Verdict | None:
    """A verdict when the canary is worse than the stable beyond the bounds, else None."""
    if canary.requests < bounds.min_requests or stable.requests < bounds.min_requests:
        return None
    z = z_score(bounds.confidence)
    canary_low = wilson_interval(canary.errors, canary.requests, z).low
    stable_high = wilson_interval(stable.errors, stable.requests, z).high
    if canary_low > stable_high + bounds.max_error_rate_delta:
        return Verdict(
            "error_rate",
            f"canary error rate {canary.errors}/{canary.requests} (lower bound {canary_low:.3f})"
            f" > stable {stable.errors}/{stable.requests} (upper bound {stable_high:.3f})"
            f" + {bounds.max_error_rate_delta:g}",
        )
    if (
        len(canary.latencies) >= bounds.min_requests
        and len(stable.latencies) >= bounds.min_requests
    ):
        canary_p95_low, _ = quantile_bounds(canary.latencies, 0.95, z)
        _, stable_p95_high = quantile_bounds(stable.latencies, 0.95, z)
        if canary_p95_low > bounds.max_latency_ratio * stable_p95_high:
            return Verdict(
                "latency",
                f"canary p95 latency lower bound {canary_p95_low * 1000:.0f} ms >"
                f" {bounds.max_latency_ratio:g} x stable p95 upper bound"
                f" {stable_p95_high * 1000:.0f} ms",
            )
    return None
