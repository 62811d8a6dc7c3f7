from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.observability.metrics import Metrics, metric_names
from proxy.observability.snapshot import percentiles, quantile


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def done(metrics: Metrics, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "tier": "free",
        "model": "small-v1",
        "engine": "small",
        "status": 200,
        "cache": "miss",
        "latency_s": 0.5,
        "ttft_s": 0.1,
        "overhead_s": 0.0002,
        "tokens_in": 10,
        "tokens_out": 30,
        "cost_usd": 0.001,
        "saved_cache_usd": 0.0,
        "saved_routing_usd": 0.004,
        "stream": False,
    }
    fields.update(overrides)
    metrics.request_done(**fields)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    done(first)
    assert (
        value(
            first,
            "frugal_requests_total",
            tier="free",
            model="small-v1",
            engine="small",
            status="200",
            cache="miss",
            stream="false",
        )
        == 1.0
    )
    assert second.snapshot()["requests"]["total"] == 0


def test_request_done_records_counts_latency_tokens_and_money() -> None:
    m = Metrics()
    done(m, status=200, stream=True)
    done(m, status=200, stream=True, latency_s=2.0, tokens_in=5, tokens_out=0, ttft_s=None)
    done(m, status=502, cache="miss", cost_usd=0.0, saved_routing_usd=0.0, tokens_out=0)
    labels = {"tier": "free", "model": "small-v1", "engine": "small", "cache": "miss"}
    assert value(m, "frugal_requests_total", status="200", stream="true", **labels) == 2
    assert value(m, "frugal_requests_total", status="502", stream="false", **labels) == 1
    hist = {"tier": "free", "engine": "small", "cache": "miss"}
    assert value(m, "frugal_request_latency_seconds_count", **hist) == 3
    assert value(m, "frugal_request_latency_seconds_sum", **hist) == pytest.approx(3.0)
    assert value(m, "frugal_request_latency_seconds_bucket", le="1.0", **hist) == 2
    # A request without a first token (non-streamed error, say) adds no TTFT observation.
    assert value(m, "frugal_time_to_first_token_seconds_count", **hist) == 2
    assert value(m, "frugal_proxy_overhead_seconds_count", tier="free") == 3
    assert value(m, "frugal_tokens_in_total", tier="free", engine="small") == 25
    assert value(m, "frugal_tokens_out_total", tier="free", engine="small") == 30
    assert value(m, "frugal_cost_usd_total", tier="free", engine="small") == pytest.approx(0.002)
    assert value(m, "frugal_saved_usd_total", tier="free", source="routing") == pytest.approx(0.008)
    assert value(m, "frugal_saved_usd_total", tier="free", source="cache") == 0


def test_the_proxys_overhead_is_resolved_up_to_seconds() -> None:
    # A request that waited for a busy encoder: hundreds of ms, not just "over 0.1 s".
    m = Metrics()
    done(m, overhead_s=0.3)
    done(m, overhead_s=0.0003)
    assert value(m, "frugal_proxy_overhead_seconds_bucket", tier="free", le="0.1") == 1
    assert value(m, "frugal_proxy_overhead_seconds_bucket", tier="free", le="0.5") == 2


def test_cache_lookup_counts_hits_and_semantic_similarity() -> None:
    m = Metrics()
    m.cache_lookup(kind="exact", scope="tier", hit=False)
    m.cache_lookup(kind="semantic", scope="tier", hit=True, similarity=0.95)
    m.cache_lookup(kind="semantic", scope="tier", hit=False, similarity=0.7)
    assert value(m, "frugal_cache_lookups_total", kind="exact", scope="tier") == 1
    assert value(m, "frugal_cache_hits_total", kind="exact", scope="tier") is None
    assert value(m, "frugal_cache_lookups_total", kind="semantic", scope="tier") == 2
    assert value(m, "frugal_cache_hits_total", kind="semantic", scope="tier") == 1
    # Only hits feed the similarity histogram.
    assert value(m, "frugal_cache_hit_similarity_count", scope="tier") == 1
    snap = m.snapshot()["cache"]
    assert snap["exact"] == {"lookups": 1, "hits": 0, "hit_rate": 0}
    assert snap["semantic"]["hit_rate"] == pytest.approx(0.5)


def test_breaker_state_marks_exactly_one_state() -> None:
    m = Metrics()
    m.breaker_state(engine="large", replica="r1", state="open")
    m.breaker_state(engine="large", replica="r1", state="half_open")
    states = {
        state: value(m, "frugal_breaker_state", engine="large", replica="r1", state=state)
        for state in ("closed", "open", "half_open")
    }
    assert states == {"closed": 0, "open": 0, "half_open": 1}
    assert m.snapshot()["engines"]["large"]["replicas"]["r1"]["breaker"] == "half_open"
    with pytest.raises(ValueError, match="breaker state"):
        m.breaker_state(engine="large", replica="r1", state="ajar")


def test_other_recorders_reach_their_series() -> None:
    m = Metrics()
    m.cache_error(backend="redis", op="get")
    m.route_decision(tier="pro", engine="large", reason="score_above_threshold")
    m.queue_length(engine="large", length=4)
    m.queue_wait(engine="large", tier="pro", seconds=0.3)
    m.admission_rejected(engine="large", tier="free", reason="queue_full")
    m.embedding_batch(size=8, wait_s=0.002)
    m.upstream_retry(engine="large", reason="connect")
    m.policy_rejected(tier="free", reason="budget")
    m.budget_spent(tier="free", usd=3.5)
    m.budget_limit(tier="free", usd=5.0)
    m.in_flight(tier="pro", delta=1)
    assert value(m, "frugal_cache_errors_total", backend="redis", op="get") == 1
    assert (
        value(
            m,
            "frugal_route_decisions_total",
            tier="pro",
            engine="large",
            reason="score_above_threshold",
        )
        == 1
    )
    assert value(m, "frugal_queue_length", engine="large") == 4
    assert value(m, "frugal_queue_wait_seconds_count", engine="large", tier="pro") == 1
    assert (
        value(
            m, "frugal_admission_rejected_total", engine="large", tier="free", reason="queue_full"
        )
        == 1
    )
    assert value(m, "frugal_embedding_batch_size_sum") == 8
    assert value(m, "frugal_upstream_retries_total", engine="large", reason="connect") == 1
    assert value(m, "frugal_policy_rejected_total", tier="free", reason="budget") == 1
    assert value(m, "frugal_budget_spent_usd", tier="free") == 3.5
    snap = m.snapshot()
    assert snap["tiers"]["free"]["budget_spent_usd"] == 3.5
    assert snap["tiers"]["free"]["budget_limit_usd"] == 5.0
    assert snap["engines"]["large"]["queue_length"] == 4
    assert snap["requests"]["in_flight"] == 1
    assert snap["cache_errors"] == 1
    assert snap["rejections"] == {"admission": 1, "policy": 1, "upstream_retries": 1}
    assert snap["routes"]["by_engine"] == {"large": 1}


def test_render_is_valid_exposition_with_only_frugal_names() -> None:
    m = Metrics()
    done(m)
    m.engine_replica(engine="small", replica="r0", healthy=True, running=2, waiting=0, kv_usage=0.1)
    text = m.render().decode()
    families = list(text_string_to_metric_families(text))
    assert families
    assert all(f.name.startswith("frugal_") for f in families)
    assert "vllm:" not in text
    assert Metrics.CONTENT_TYPE.startswith("text/plain")
    assert all(name.startswith("frugal_") for name in metric_names(Metrics().registry))


def test_snapshot_aggregates_requests_engines_and_tiers() -> None:
    m = Metrics()
    done(m, tier="free", engine="small", cache="miss")
    done(m, tier="free", engine="small", cache="hit_exact", saved_cache_usd=0.01, cost_usd=0)
    done(m, tier="pro", engine="large", status=500)
    m.engine_replica(engine="small", replica="r0", healthy=True, running=2, waiting=1, kv_usage=0.3)
    m.engine_replica(
        engine="small", replica="r1", healthy=False, running=0, waiting=4, kv_usage=0.0
    )
    snap = m.snapshot()
    assert snap["requests"]["total"] == 3
    assert snap["requests"]["errors"] == 1
    assert snap["requests"]["by_cache"] == {"miss": 2, "hit_exact": 1}
    assert snap["requests"]["by_tier"] == {"free": 2, "pro": 1}
    assert snap["tokens"] == {"in": 30, "out": 90}
    small = snap["engines"]["small"]
    assert (small["running"], small["waiting"], small["healthy_replicas"]) == (2, 5, 1)
    assert small["replicas"]["r1"]["healthy"] is False
    assert snap["tiers"]["free"]["saved_cache_usd"] == pytest.approx(0.01)
    assert snap["tiers"]["free"]["cost_usd"] == pytest.approx(0.001)
    assert snap["totals"]["cost_usd"] == pytest.approx(0.002)


def test_snapshot_errors_are_the_5xx_not_the_clients_4xx() -> None:
    # the alert's definition: a client that left (499), was refused (429) or erred (400) is none
    m = Metrics()
    for status in (200, 400, 401, 429, 499, 499, 500, 502, 503, 504):
        done(m, status=status)
    requests = m.snapshot()["requests"]
    assert (requests["total"], requests["errors"]) == (10, 4)
    assert requests["by_status"]["499"] == 2


def test_recent_latency_window_drops_old_requests_and_is_bounded() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock, recent_window_s=60.0, recent_max=5)
    done(m, latency_s=9.0)
    clock.now += 61.0
    for latency in (0.1, 0.2, 0.3):
        done(m, latency_s=latency)
    latency = m.snapshot()["latency"]
    assert latency["count"] == 3
    assert latency["total"]["p50"] == pytest.approx(0.2)
    for _ in range(10):
        done(m, latency_s=1.0)
    assert len(m.recent()) == 5


def test_a_full_recent_window_says_how_long_it_covers() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock, recent_window_s=60.0, recent_max=5)
    for _ in range(5):
        clock.now += 2.0
        done(m, latency_s=0.1)
    assert m.snapshot()["latency"]["window_s"] == 60.0  # full, and all five within the minute
    for _ in range(3):
        clock.now += 2.0
        done(m, latency_s=0.1)
    # Requests of the last minute at 6 s and before were pushed out: the five kept are the last
    # 10 s, and the dashboard must not call them the last 60 s.
    latency = m.snapshot()["latency"]
    assert (latency["count"], latency["window_s"]) == (5, pytest.approx(10.0))
    clock.now += 100.0  # once the pushed-out ones would have left anyway, the window is whole
    assert m.snapshot()["latency"]["window_s"] == 60.0


def test_percentiles_of_nothing_are_none() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}


@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=200),
    st.floats(0, 1),
)
def test_quantile_matches_numpy_linear(values: list[float], q: float) -> None:
    ordered = sorted(values)
    got = quantile(ordered, q)
    assert got is not None
    assert got == pytest.approx(float(np.quantile(ordered, q)), rel=1e-9, abs=1e-9)
    assert ordered[0] - 1e-9 <= got <= ordered[-1] + 1e-9


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=100))
def test_percentiles_are_ordered(values: list[float]) -> None:
    p = percentiles(values)
    assert p["p50"] is not None and p["p95"] is not None and p["p99"] is not None
    assert p["p50"] <= p["p95"] + 1e-12 <= p["p99"] + 2e-12
