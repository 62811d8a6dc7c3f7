"""The rollout's Prometheus series, on the proxy's registry (next to ``Metrics``' own).

Every series carries ``engine`` and ``version``; versions come from the config and the rollout
state (a handful per engine over the proxy's life), never from requests, so cardinality stays
bounded.

    frugal_version_requests_total{engine,version,outcome}   ok | error (5xx, engine's
                                                            401/403/404) | client_error (4xx)
                                                            | cache_hit
    frugal_version_latency_seconds{engine,version}          engine answers only
    frugal_version_tokens_out_total{engine,version}         with ..._answers_total: tokens/answer
    frugal_version_answers_total{engine,version}
    frugal_version_cost_usd_total{engine,version}
    frugal_rollout_canary_share{engine,version}             the canary's current share
    frugal_rollout_transitions_total{engine,action,reason}  promote / rollback / share
    frugal_rollout_auto_rollbacks_total{engine,reason}      reason: error_rate | latency
    frugal_rollout_shadow_total{engine,version,outcome}     agree | disagree | error | dropped
    frugal_rollout_fallbacks_total{engine,from_version,to_version}
                                                            answered by the other version: every
                                                            replica of the split's choice down
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Gauge

from proxy.observability.families import (
    CounterChild,
    CounterFamily,
    FamiliesCollector,
    HistogramChild,
    HistogramFamily,
)
from proxy.observability.metrics import LATENCY_BUCKETS

log = structlog.get_logger("frugal.rollout")


@dataclass(frozen=True, slots=True)
class _VersionSeries:
    requests: CounterChild
    latency: HistogramChild | None  # None: the outcome does not count there
    answers: CounterChild | None


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._series: dict[tuple[str, str, str], _VersionSeries] = {}
        self.requests = CounterFamily(
            "frugal_version_requests",
            "Finished requests per version: ok, error (5xx, or the engine's 401/403/404),"
            " client_error (other 4xx) or cache_hit.",
            ["engine", "version", "outcome"],
        )
        self.latency = HistogramFamily(
            "frugal_version_latency_seconds",
            "Whole-request latency of the engine answers of each version.",
            ["engine", "version"],
            buckets=LATENCY_BUCKETS,
        )
        self.tokens_out = CounterFamily(
            "frugal_version_tokens_out",
            "Completion tokens of each version's successful engine answers.",
            ["engine", "version"],
        )
        self.answers = CounterFamily(
            "frugal_version_answers",
            "Successful engine answers of each version (the denominator of tokens per answer).",
            ["engine", "version"],
        )
        self.cost = CounterFamily(
            "frugal_version_cost_usd",
            "Inference cost in USD of each version's engine answers.",
            ["engine", "version"],
        )
        self.transitions = CounterFamily(
            "frugal_rollout_transitions",
            "Rollout state changes by action (promote, rollback, share) and reason.",
            ["engine", "action", "reason"],
        )
        self.auto_rollbacks = CounterFamily(
            "frugal_rollout_auto_rollbacks",
            "Canaries the proxy rolled back by itself, by the reason the judge gave.",
            ["engine", "reason"],
        )
        self.shadow = CounterFamily(
            "frugal_rollout_shadow",
            "Shadow comparisons of canary and stable answers, by outcome.",
            ["engine", "version", "outcome"],
        )
        self.fallbacks = CounterFamily(
            "frugal_rollout_fallbacks",
            "Engine answers of one version's share given by the other version, because every"
            " replica of the first was down.",
            ["engine", "from_version", "to_version"],
        )
        families: list[CounterFamily | HistogramFamily] = [
            self.requests,
            self.latency,
            self.tokens_out,
            self.answers,
            self.cost,
            self.transitions,
            self.auto_rollbacks,
            self.shadow,
            self.fallbacks,
        ]
        self.share = Gauge(
            "frugal_rollout_canary_share",
            "Share of the engine's traffic the canary version takes (0..1).",
            ["engine", "version"],
            registry=None,
        )
        if registry is not None:
            try:
                registry.register(FamiliesCollector(families))
                registry.register(self.share)
            except ValueError:
                # The same Metrics reused by a second app (tests): count, but expose once.
                log.warning("rollout metrics already registered on this registry")

    def request(
        self,
        *,
        engine: str,
        version: str,
        from_cache: bool,
        status: int,
        latency_s: float,
        tokens_out: int,
        cost_usd: float,
        error: bool | None = None,
    ) -> None:
        outcome = _outcome(from_cache, status, status >= 500 if error is None else error)
        series = self._series.get((engine, version, outcome))
        if series is None:
            series = self._bind(engine, version, outcome)
        series.requests.inc()
        if series.latency is not None:
            series.latency.observe(latency_s)
        if series.answers is not None:
            series.answers.inc()
        if tokens_out and series.answers is not None:
            # Bound at the first tokens, so a version with none shows no zero series.
            self.tokens_out.labels(engine, version).inc(tokens_out)
        if cost_usd and series.latency is not None:
            self.cost.labels(engine, version).inc(cost_usd)

    def _bind(self, engine: str, version: str, outcome: str) -> _VersionSeries:
        # Every request records here: its series are looked up once per (engine, version,
        # outcome), not on each request. Only an outcome's own series are made, so a version
        # with cache hits alone shows no latency or answers.
        answer = outcome in ("ok", "error")  # engine answers: latency (and cost)
        ok = outcome == "ok"
        series = self._series[(engine, version, outcome)] = _VersionSeries(
            requests=self.requests.labels(engine, version, outcome),
            latency=self.latency.labels(engine, version) if answer else None,
            answers=self.answers.labels(engine, version) if ok else None,
        )
        return series

    def set_share(self, *, engine: str, version: str, share: float) -> None:
        self.share.labels(engine, version).set(share)


def _outcome(from_cache: bool, status: int, error: bool) -> str:
    if from_cache:
        return "cache_hit"
    if error:
        return "error"
    return "client_error" if status >= 400 else "ok"
