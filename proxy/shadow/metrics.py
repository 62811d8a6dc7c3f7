"""The shadow checks' Prometheus series, registered on the proxy's own registry.

    frugal_cache_audit_total{tier,outcome}              agree | disagree | error | dropped
                                                        | would_agree | would_disagree
                                                        (counterfactual audits of refused
                                                        candidates, see proxy/shadow/tuner.py)
    frugal_cache_audit_disagreement_rate{tier}          over the latest audits (a window)
    frugal_cache_audit_disagreement_rate_low{tier}      Wilson 95 % bounds of that rate
    frugal_cache_audit_disagreement_rate_high{tier}
    frugal_cache_audit_window{tier}                     audits the rate is measured on
    frugal_cache_audit_cost_usd_total{tier,engine}      engine cost of the audits (not billed)
    frugal_cache_audit_tokens_total{tier,engine}        prompt + completion tokens of the audits
    frugal_threshold{tier,kind}                         current automatic threshold value
    frugal_threshold_changes_total{tier,kind,reason}    every automatic move, with its reason

Audits happen on a small share of hits, so these are prometheus_client's own (locked) series:
nothing here is on the per-request hot path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.shadow.stats import Interval

AUDIT_OUTCOMES = ("agree", "disagree", "error", "dropped", "would_agree", "would_disagree")


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.audits = Counter(
            "frugal_cache_audit",
            "Audited semantic cache hits by outcome (dropped: not sent, the bound was reached).",
            ["tier", "outcome"],
            registry=registry,
        )
        self.rate = Gauge(
            "frugal_cache_audit_disagreement_rate",
            "Share of recent audited semantic hits whose fresh answer disagreed.",
            ["tier"],
            registry=registry,
        )
        self.rate_low = Gauge(
            "frugal_cache_audit_disagreement_rate_low",
            "Lower bound of the disagreement rate (Wilson 95%).",
            ["tier"],
            registry=registry,
        )
        self.rate_high = Gauge(
            "frugal_cache_audit_disagreement_rate_high",
            "Upper bound of the disagreement rate (Wilson 95%).",
            ["tier"],
            registry=registry,
        )
        self.window = Gauge(
            "frugal_cache_audit_window",
            "Audits the disagreement rate is measured on.",
            ["tier"],
            registry=registry,
        )
        self.cost = Counter(
            "frugal_cache_audit_cost_usd",
            "Engine cost in USD of cache audits (the proxy's own spend, billed to no tier).",
            ["tier", "engine"],
            registry=registry,
        )
        self.tokens = Counter(
            "frugal_cache_audit_tokens",
            "Prompt and completion tokens the engines spent on cache audits.",
            ["tier", "engine"],
            registry=registry,
        )
        self.threshold_value = Gauge(
            "frugal_threshold",
            "Current value of an automatically tuned threshold "
            "(cache_cutoff: verifier cut-off; strong_share: routing share).",
            ["tier", "kind"],
            registry=registry,
        )
        self.threshold_changes = Counter(
            "frugal_threshold_changes",
            "Automatic threshold moves by tier, kind and reason.",
            ["tier", "kind", "reason"],
            registry=registry,
        )

    def collectors(self) -> list[Counter | Gauge]:
        return [
            self.audits,
            self.rate,
            self.rate_low,
            self.rate_high,
            self.window,
            self.cost,
            self.tokens,
            self.threshold_value,
            self.threshold_changes,
        ]

    def audit(self, tier: str, outcome: str) -> None:
        self.audits.labels(tier, outcome).inc()

    def audit_cost(self, tier: str, engine: str, usd: float, tokens: int) -> None:
        if usd:
            self.cost.labels(tier, engine).inc(usd)
        if tokens:
            self.tokens.labels(tier, engine).inc(tokens)

    # TunerObserver

    def audit_rate(self, tier: str, interval: Interval, audits: int) -> None:
        self.rate.labels(tier).set(interval.rate)
        self.rate_low.labels(tier).set(interval.low)
        self.rate_high.labels(tier).set(interval.high)
        self.window.labels(tier).set(audits)

    def threshold(self, tier: str, kind: str, value: float) -> None:
        self.threshold_value.labels(tier, kind).set(value)

    def threshold_changed(self, tier: str, kind: str, reason: str) -> None:
        self.threshold_changes.labels(tier, kind, reason).inc()
