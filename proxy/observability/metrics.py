"""All ``frugal_*`` Prometheus series of one proxy, on the proxy's own registry.

``Metrics`` is the only place that names series. The request path calls its methods; ``render()``
serves ``GET /metrics``; ``snapshot()`` feeds the live dashboard.

    metrics = Metrics()
    metrics.request_done(tier="free", model="small-v1", engine="small", status=200, cache="miss",
                         latency_s=0.8, ttft_s=0.1, overhead_s=0.0004, tokens_in=20, tokens_out=90,
                         cost_usd=0.0001, saved_cache_usd=0.0, saved_routing_usd=0.0009,
                         stream=True)
    body, content_type = metrics.render(), Metrics.CONTENT_TYPE

Hot path: counters and histograms are the lock-free families of ``families.py`` (call them from
the event loop's thread); ``request_done`` looks up all its child series with one dict lookup
(~3.5 µs per call in all). Gauges are ``prometheus_client``'s, their children memoised per label
tuple. Label values come from configuration (tiers, engines, reasons), never from request bodies,
so every label dict stays small.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from proxy.observability.families import (
    CounterChild,
    CounterFamily,
    FamiliesCollector,
    GaugeFamily,
    HistogramChild,
    HistogramFamily,
)
from proxy.observability.snapshot import RecentRequest, Sample, build_snapshot

LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# The proxy's own added time is budgeted at ~0.1 ms, so its buckets start in microseconds.
# ... and end in seconds: a request waiting for a busy encoder (the semantic cache on a CPU the
# engines also use) spends hundreds of ms in the proxy, which a 0.1 s top bucket only calls "more".
OVERHEAD_BUCKETS: Final = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
QUEUE_WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIMILARITY_BUCKETS: Final = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)
BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128)
BATCH_WAIT_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
ENCODE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

BREAKER_STATES: Final = ("closed", "open", "half_open")


@dataclass(frozen=True, slots=True)
class _RequestSeries:
    """Every child series one ``request_done`` label set touches, looked up once."""

    requests: CounterChild
    latency: HistogramChild
    ttft: HistogramChild
    overhead: HistogramChild
    tokens_in: CounterChild
    tokens_out: CounterChild
    cost: CounterChild
    saved_cache: CounterChild
    saved_routing: CounterChild


class _Children:
    """``metric.labels(*key)`` memoised per label tuple."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def get(self, *key: str) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._metric.labels(*key)
            self._children[key] = child
        return child

    def forget(self, *key: str) -> None:
        """Stop exposing the series (a gauge whose subject is gone must not keep its last value)."""
        if self._children.pop(key, None) is not None:
            self._metric.remove(*key)


class Metrics:
    """The proxy's metrics: Prometheus series plus a bounded window of recent latencies."""

    CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        recent_window_s: float = 60.0,
        recent_max: int = 4096,
    ) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._wall_clock = wall_clock
        self._started_at = clock()
        self.recent_window_s = recent_window_s
        # Plain tuples (at, latency, ttft, overhead): a frozen dataclass costs ~1.4 µs to build.
        self._recent: deque[tuple[float, float, float | None, float | None]] = deque(
            maxlen=recent_max
        )
        self._pushed_out_at = -math.inf  # when the newest request pushed out of _recent ended
        reg = self.registry

        # Requests.
        self.requests = CounterFamily(
            "frugal_requests",
            "Finished requests by tier, model version, engine, HTTP status and cache outcome.",
            ["tier", "model", "engine", "status", "cache", "stream"],
        )
        self.request_latency = HistogramFamily(
            "frugal_request_latency_seconds",
            "Whole-request latency as the client sees it.",
            ["tier", "engine", "cache"],
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = HistogramFamily(
            "frugal_time_to_first_token_seconds",
            "Time from request arrival to the first content byte sent to the client.",
            ["tier", "engine", "cache"],
            buckets=LATENCY_BUCKETS,
        )
        self.overhead = HistogramFamily(
            "frugal_proxy_overhead_seconds",
            "Time the proxy itself adds (parsing, policy, routing, cache), excluding upstream.",
            ["tier"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.tokens_in = CounterFamily(
            "frugal_tokens_in",
            "Prompt tokens of finished requests.",
            ["tier", "engine"],
        )
        self.tokens_out = CounterFamily(
            "frugal_tokens_out",
            "Completion tokens returned to clients (served from cache or engine).",
            ["tier", "engine"],
        )
        self.cost = CounterFamily(
            "frugal_cost_usd",
            "Inference cost in USD of finished requests.",
            ["tier", "engine"],
        )
        self.saved = CounterFamily(
            "frugal_saved_usd",
            "USD saved against sending every request to the strongest engine, by source.",
            ["tier", "source"],
        )
        self.in_flight_gauge = GaugeFamily(
            "frugal_requests_in_flight",
            "Requests the proxy is handling right now.",
            ["tier"],
        )

        # Cache.
        self.cache_lookups = CounterFamily(
            "frugal_cache_lookups",
            "Cache lookups by kind (exact/semantic) and scope.",
            ["kind", "scope"],
        )
        self.cache_hits = CounterFamily(
            "frugal_cache_hits",
            "Cache hits by kind (exact/semantic) and scope.",
            ["kind", "scope"],
        )
        self.cache_similarity = HistogramFamily(
            "frugal_cache_hit_similarity",
            "Cosine similarity of semantic cache hits.",
            ["scope"],
            buckets=SIMILARITY_BUCKETS,
        )
        self.cache_errors = CounterFamily(
            "frugal_cache_errors",
            "Cache-store operations that failed (the request went on without the cache).",
            ["backend", "op"],
        )
        self.limits_errors = CounterFamily(
            "frugal_limits_errors",
            "Tier-limit counter operations that failed (limits backend unreachable): check "
            "(served unchecked, or 503 with limits.on_backend_error: refuse), release (left to "
            "its TTL), renew (held slots' expiry not pushed back).",
            ["op"],
        )
        self.cache_refusals = CounterFamily(
            "frugal_cache_semantic_refusals",
            "Semantic lookups with candidates where none was served, by why the most similar one "
            "was refused (below_threshold, veto_<guard>, verifier_reject).",
            ["reason"],
        )
        self.exact_only_counts = CounterFamily(
            "frugal_cache_exact_only",
            "Exact-key misses whose question could not be matched by meaning though the tier "
            "allows it: too_long (over the length limit), no_words (not one letter or digit) or "
            "past_window (longer than the embedding model reads).",
            ["reason"],
        )

        # Routing, admission, queues.
        self.route_decisions = CounterFamily(
            "frugal_route_decisions",
            "Routing decisions by tier, chosen engine and reason.",
            ["tier", "engine", "reason"],
        )
        self.queue_length_gauge = Gauge(
            "frugal_queue_length",
            "Requests waiting in the proxy's admission queue per engine.",
            ["engine"],
            registry=reg,
        )
        self.queue_wait_hist = HistogramFamily(
            "frugal_queue_wait_seconds",
            "Time a request waited in the admission queue.",
            ["engine", "tier"],
            buckets=QUEUE_WAIT_BUCKETS,
        )
        self.admission_rejections = CounterFamily(
            "frugal_admission_rejected",
            "Requests refused at admission (queue full, wait timeout, ...).",
            ["engine", "tier", "reason"],
        )
        self.policy_rejections = CounterFamily(
            "frugal_policy_rejected",
            "Requests refused by tier policy (rate, tokens, budget, model not allowed, ...).",
            ["tier", "reason"],
        )
        self.budget_spent_gauge = Gauge(
            "frugal_budget_spent_usd",
            "USD spent today per tier.",
            ["tier"],
            registry=reg,
        )
        self.budget_limit_gauge = Gauge(
            "frugal_budget_limit_usd",
            "Daily USD budget per tier (absent when a tier has no budget).",
            ["tier"],
            registry=reg,
        )

        # Embeddings.
        self.embedding_batch_size = HistogramFamily(
            "frugal_embedding_batch_size",
            "Texts embedded per batch by the embedding worker.",
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.embedding_batch_wait = HistogramFamily(
            "frugal_embedding_batch_wait_seconds",
            "Time the first text of a batch waited for the batch to start.",
            buckets=BATCH_WAIT_BUCKETS,
        )
        self.embedding_encode = HistogramFamily(
            "frugal_embedding_encode_seconds",
            "Time the model took to embed one batch.",
            buckets=ENCODE_BUCKETS,
        )

        self.embeddings_shed = CounterFamily(
            "frugal_embeddings_shed",
            "Texts not embedded within embeddings.max_queue_ms (not queued, the encoder being "
            "that far behind, or queued and not done in time; or the encoder's process was "
            "lost or failed on the batch); the request went on without a "
            "semantic lookup (purpose=cache) and, if it was routed, without a difficulty score "
            "(purpose=routing).",
            ["purpose"],
        )

        # Engines, as read from each vLLM replica's /health and /metrics.
        self.engine_up = Gauge(
            "frugal_engine_up",
            "1 if the replica's last health check passed, else 0.",
            ["engine", "replica"],
            registry=reg,
        )
        self.engine_running = Gauge(
            "frugal_engine_requests_running",
            "Requests the replica is running (vLLM's current batch).",
            ["engine", "replica"],
            registry=reg,
        )
        self.engine_waiting = Gauge(
            "frugal_engine_requests_waiting",
            "Requests waiting inside the replica.",
            ["engine", "replica"],
            registry=reg,
        )
        self.engine_kv_usage = Gauge(
            "frugal_engine_kv_cache_usage_ratio",
            "Fraction of the replica's KV cache in use (0..1).",
            ["engine", "replica"],
            registry=reg,
        )
        self.upstream_retries = CounterFamily(
            "frugal_upstream_retries",
            "Engine calls retried, by engine and reason.",
            ["engine", "reason"],
        )
        self.engine_cancellations = CounterFamily(
            "frugal_engine_requests_cancelled",
            "Engine requests the proxy closed before their answer, by engine and reason "
            "(cache_hit: a semantic hit was found while the engine was asked; its prefill is "
            "spent).",
            ["engine", "reason"],
        )
        self.version_changes = CounterFamily(
            "frugal_engine_version_changes",
            "Engines with version: auto that switched to a new version (redeployed in place).",
            ["engine"],
        )
        self.replicas_held_out = CounterFamily(
            "frugal_replicas_held_out",
            "Replicas taken out of rotation for reporting another version than their engine's.",
            ["engine"],
        )
        self.breaker = Gauge(
            "frugal_breaker_state",
            "Circuit breaker state per replica: 1 for the current state, 0 for the others.",
            ["engine", "replica", "state"],
            registry=reg,
        )

        reg.register(
            FamiliesCollector(
                [
                    self.requests,
                    self.request_latency,
                    self.ttft,
                    self.overhead,
                    self.tokens_in,
                    self.tokens_out,
                    self.cost,
                    self.saved,
                    self.in_flight_gauge,
                    self.cache_lookups,
                    self.cache_hits,
                    self.cache_similarity,
                    self.cache_errors,
                    self.limits_errors,
                    self.cache_refusals,
                    self.exact_only_counts,
                    self.route_decisions,
                    self.queue_wait_hist,
                    self.admission_rejections,
                    self.policy_rejections,
                    self.embedding_batch_size,
                    self.embedding_batch_wait,
                    self.embedding_encode,
                    self.embeddings_shed,
                    self.upstream_retries,
                    self.engine_cancellations,
                    self.version_changes,
                    self.replicas_held_out,
                ]
            )
        )

        # prometheus_client gauges: set rarely (health polls, queue changes); memoise children.
        self._request_series: dict[tuple[str, str, str, int, str, bool], _RequestSeries] = {}
        self._queue_length = _Children(self.queue_length_gauge)
        self._budget_spent = _Children(self.budget_spent_gauge)
        self._budget_limit = _Children(self.budget_limit_gauge)
        self._engine_up = _Children(self.engine_up)
        self._engine_running = _Children(self.engine_running)
        self._engine_waiting = _Children(self.engine_waiting)
        self._engine_kv = _Children(self.engine_kv_usage)
        self._breaker = _Children(self.breaker)

    # -- request path -----------------------------------------------------------------------

    def request_done(
        self,
        *,
        tier: str,
        model: str,
        engine: str,
        status: int,
        cache: str,
        latency_s: float,
        ttft_s: float | None,
        overhead_s: float | None,
        tokens_in: int,
        tokens_out: int,
        cost_usd: float,
        saved_cache_usd: float,
        saved_routing_usd: float,
        stream: bool,
    ) -> None:
        """Record one finished request (success or error): counts, latencies, tokens, money."""
        key = (tier, model, engine, status, cache, stream)
        series = self._request_series.get(key)
        if series is None:
            series = self._new_request_series(key)
        series.requests.inc()
        series.latency.observe(latency_s)
        if ttft_s is not None:
            series.ttft.observe(ttft_s)
        if overhead_s is not None:
            series.overhead.observe(overhead_s)
        if tokens_in:
            series.tokens_in.inc(tokens_in)
        if tokens_out:
            series.tokens_out.inc(tokens_out)
        if cost_usd:
            series.cost.inc(cost_usd)
        if saved_cache_usd:
            series.saved_cache.inc(saved_cache_usd)
        if saved_routing_usd:
            series.saved_routing.inc(saved_routing_usd)
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._pushed_out_at = recent[0][0]
        recent.append((self._clock(), latency_s, ttft_s, overhead_s))

    def _new_request_series(self, key: tuple[str, str, str, int, str, bool]) -> _RequestSeries:
        tier, model, engine, status, cache, stream = key
        series = _RequestSeries(
            requests=self.requests.labels(
                tier, model, engine, str(status), cache, "true" if stream else "false"
            ),
            latency=self.request_latency.labels(tier, engine, cache),
            ttft=self.ttft.labels(tier, engine, cache),
            overhead=self.overhead.labels(tier),
            tokens_in=self.tokens_in.labels(tier, engine),
            tokens_out=self.tokens_out.labels(tier, engine),
            cost=self.cost.labels(tier, engine),
            saved_cache=self.saved.labels(tier, "cache"),
            saved_routing=self.saved.labels(tier, "routing"),
        )
        self._request_series[key] = series
        return series

    def in_flight(self, *, tier: str, delta: int) -> None:
        """Adjust the in-flight gauge: +1 when a request starts, -1 when it ends."""
        self.in_flight_gauge.labels(tier).inc(delta)

    def cache_lookup(
        self, *, kind: str, scope: str, hit: bool, similarity: float | None = None
    ) -> None:
        """Record one cache lookup; ``similarity`` is the semantic hit's cosine similarity."""
        self.cache_lookups.labels(kind, scope).inc()
        if hit:
            self.cache_hits.labels(kind, scope).inc()
            if similarity is not None:
                self.cache_similarity.labels(scope).observe(similarity)

    def cache_error(self, *, backend: str, op: str) -> None:
        """Record a failed cache-store operation (``op``: get/set/delete/index/...)."""
        self.cache_errors.labels(backend, op).inc()

    def limits_error(self, op: str) -> None:
        """Record a failed tier-limit counter operation (``op``: check, release or renew)."""
        self.limits_errors.labels(op).inc()

    def cache_refusal(self, reason: str) -> None:
        """A semantic lookup refused all its candidates (``reason``: the most similar one's)."""
        self.cache_refusals.labels(reason).inc()

    def cache_exact_only(self, reason: str) -> None:
        """An exact-key miss matched exactly only (see ``ResponseCache.exact_only_reason``)."""
        self.exact_only_counts.labels(reason).inc()

    def route_decision(self, *, tier: str, engine: str, reason: str) -> None:
        self.route_decisions.labels(tier, engine, reason).inc()

    def queue_length(self, *, engine: str, length: int) -> None:
        self._queue_length.get(engine).set(length)

    def queue_wait(self, *, engine: str, tier: str, seconds: float) -> None:
        self.queue_wait_hist.labels(engine, tier).observe(seconds)

    def admission_rejected(self, *, engine: str, tier: str, reason: str) -> None:
        self.admission_rejections.labels(engine, tier, reason).inc()

    def embedding_batch(
        self, *, size: int, wait_s: float | None = None, encode_s: float | None = None
    ) -> None:
        """One embedding batch: its size, how long its first text waited, how long encoding took."""
        self.embedding_batch_size.labels().observe(size)
        if wait_s is not None:
            self.embedding_batch_wait.labels().observe(wait_s)
        if encode_s is not None:
            self.embedding_encode.labels().observe(encode_s)

    def embedding_shed(self, *, purpose: str) -> None:
        self.embeddings_shed.labels(purpose).inc()

    def engine_replica(
        self,
        *,
        engine: str,
        replica: str,
        healthy: bool,
        running: float,
        waiting: float,
        kv_usage: float,
    ) -> None:
        """Record one health/metrics poll of a vLLM replica."""
        self._engine_up.get(engine, replica).set(1.0 if healthy else 0.0)
        self._engine_running.get(engine, replica).set(running)
        self._engine_waiting.get(engine, replica).set(waiting)
        self._engine_kv.get(engine, replica).set(kv_usage)

    def upstream_retry(self, *, engine: str, reason: str) -> None:
        self.upstream_retries.labels(engine, reason).inc()

    def engine_request_cancelled(self, *, engine: str, reason: str) -> None:
        self.engine_cancellations.labels(engine, reason).inc()

    def engine_version_changed(self, *, engine: str) -> None:
        self.version_changes.labels(engine).inc()

    def replica_held_out(self, *, engine: str) -> None:
        self.replicas_held_out.labels(engine).inc()

    def breaker_state(self, *, engine: str, replica: str, state: str) -> None:
        """Set the replica's breaker state; the other states' series drop to 0."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}; expected one of {BREAKER_STATES}")
        for candidate in BREAKER_STATES:
            self._breaker.get(engine, replica, candidate).set(1.0 if candidate == state else 0.0)

    def policy_rejected(self, *, tier: str, reason: str) -> None:
        self.policy_rejections.labels(tier, reason).inc()

    def budget_spent(self, *, tier: str, usd: float) -> None:
        """Set today's spend for the tier (a gauge: the policy's counter is the source of truth)."""
        self._budget_spent.get(tier).set(usd)

    def budget_limit(self, *, tier: str, usd: float) -> None:
        """Publish the tier's daily budget, so alerts can compare spend against it."""
        self._budget_limit.get(tier).set(usd)

    def budget_dropped(self, *, tier: str) -> None:
        """The tier has no daily budget any more (or is gone): neither gauge is exposed."""
        self._budget_spent.forget(tier)
        self._budget_limit.forget(tier)

    # -- reading ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def recent(self) -> list[RecentRequest]:
        """Requests that finished within the recent window (bounded by ``recent_max``)."""
        cutoff = self._clock() - self.recent_window_s
        return [RecentRequest(*r) for r in self._recent if r[0] >= cutoff]

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready summary for the dashboard (see ``build_snapshot``)."""
        now = self._clock()
        # More than recent_max requests a window push the older ones out before their time:
        # the percentiles then cover only the time since the last one pushed out, and say so.
        window_s = min(self.recent_window_s, now - self._pushed_out_at)
        return build_snapshot(
            samples=iter_samples(self.registry),
            recent=self.recent(),
            window_s=window_s,
            now_unix=self._wall_clock(),
            uptime_s=now - self._started_at,
        )


def iter_samples(registry: CollectorRegistry) -> list[Sample]:
    """Every sample the registry would expose, as plain data."""
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in registry.collect()
        for s in family.samples
    ]


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can expose, suffixes included, even before any sample.

    Labelled families expose no samples until a child exists, so the names come from the
    family type: counters add ``_total``, histograms ``_bucket/_sum/_count``.
    """
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count"),
    }
    names: set[str] = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(s.name for s in family.samples)
    return names
