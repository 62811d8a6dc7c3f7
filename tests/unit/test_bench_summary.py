"""Pure replay summary: percentiles, errors, roles, cost, false hits, routing quality."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.bench.summary import (
    EngineCost,
    RequestResult,
    cache_quality,
    cost_summary,
    engine_roles,
    error_key,
    format_table,
    latency_stats,
    percentile,
    routing_quality,
    shares,
    summarize,
    tokens_by_engine,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
PRICES = {"small": EngineCost(0.1, 0.2), "large": EngineCost(1.0, 3.0)}


def ok(index: int, **fields: object) -> RequestResult:
    return RequestResult(index=index, status=200, latency_s=fields.pop("latency_s", 0.1), **fields)  # type: ignore[arg-type]


@given(st.lists(finite, min_size=1, max_size=50), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert math.isclose(
        percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-9, abs_tol=1e-6
    )


@given(st.lists(finite, min_size=1, max_size=50), st.floats(0, 100), st.floats(0, 100))
def test_percentile_is_monotonic_and_bounded(values: list[float], q1: float, q2: float) -> None:
    low, high = sorted((q1, q2))
    assert min(values) <= percentile(values, low) <= percentile(values, high) <= max(values)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_stats() -> None:
    assert latency_stats([]) is None
    stats = latency_stats([0.1, 0.2, 0.3, 0.4])
    assert stats is not None
    assert stats["count"] == 4
    assert stats["p50"] == pytest.approx(0.25)
    assert stats["max"] == 0.4


def test_error_key_by_status_then_by_failure() -> None:
    assert error_key(ok(0)) is None
    assert error_key(RequestResult(0, status=429, latency_s=0.01)) == "429"
    assert error_key(RequestResult(0, status=200, latency_s=0.1, error="stream-error")) == (
        "stream-error"
    )
    assert error_key(RequestResult(0, status=None, latency_s=None, error="timeout")) == "timeout"


@given(st.dictionaries(st.text(max_size=5), st.integers(0, 100), min_size=1))
def test_shares_sum_to_one_or_zero(counts: dict[str, int]) -> None:
    total = sum(shares(counts).values())
    assert math.isclose(total, 1.0) if sum(counts.values()) else total == 0


def test_engine_roles_from_prices_and_explicit_override() -> None:
    assert engine_roles(PRICES) == {"small": "weak", "large": "strong"}
    assert engine_roles({"only": EngineCost(1, 1)}) == {}
    assert engine_roles({"a": EngineCost(1, 1), "b": EngineCost(1, 1)}) == {}
    assert engine_roles(PRICES, {"large": "weak", "x": "strong"}) == {
        "small": "weak",
        "large": "weak",
        "x": "strong",
    }


def test_cost_counts_engine_calls_and_prices_hits_as_avoided() -> None:
    results = [
        ok(0, cache="miss", engine="small", prompt_tokens=1_000_000, completion_tokens=0),
        ok(1, cache="bypass", engine="large", prompt_tokens=0, completion_tokens=1_000_000),
        ok(2, cache="hit-exact", engine="large", prompt_tokens=1_000_000, completion_tokens=0),
        RequestResult(3, status=503, latency_s=0.1, engine="large", prompt_tokens=10**6),
        ok(4, cache="miss", engine="mystery", prompt_tokens=5),
    ]
    cost = cost_summary(results, PRICES)
    assert cost["by_engine"] == {"small": pytest.approx(0.1), "large": pytest.approx(3.0)}
    assert cost["total"] == pytest.approx(3.1)
    assert cost["per_1k_requests"] == pytest.approx(3.1 * 1000 / 5)
    assert cost["avoided_by_cache"] == pytest.approx(1.0)
    assert cost["unpriced_engines"] == ["mystery"]


tokens = st.integers(0, 10_000)
results_strategy = st.lists(
    st.builds(
        RequestResult,
        index=st.integers(0, 1000),
        status=st.sampled_from([200, 200, 200, 429, 503, None]),
        latency_s=st.floats(0.001, 10),
        error=st.sampled_from([None, None, None, "timeout", "stream-error"]),
        cache=st.sampled_from(["hit-exact", "hit-semantic", "miss", "bypass", None]),
        engine=st.sampled_from(["small", "large", None]),
        route=st.sampled_from(["small", "large", None]),
        prompt_tokens=tokens,
        completion_tokens=tokens,
        stream=st.booleans(),
        ttft_s=st.none() | st.floats(0.001, 1),
    ),
    max_size=40,
)


@given(results_strategy)
def test_summary_counts_add_up(results: list[RequestResult]) -> None:
    summary = summarize(results, 2.0, PRICES)
    assert summary["ok"] + sum(summary["errors"].values()) == summary["requests"] == len(results)
    assert sum(summary["cache"]["counts"].values()) == summary["ok"]
    assert sum(summary["routes"]["counts"].values()) == summary["ok"]
    by_engine = tokens_by_engine(results)
    assert sum(e["requests"] for e in by_engine.values()) == sum(r.engine_called for r in results)
    cost = summary["cost"]
    assert cost["total"] == pytest.approx(sum(cost["by_engine"].values()))
    assert all(v >= 0 for v in cost["by_engine"].values())
    if summary["ok"]:
        assert 0.0 <= summary["cache"]["hit_rate"] <= 1.0


@given(st.integers(1, 10**6), st.integers(1, 10**6), st.integers(2, 5))
def test_cost_scales_linearly_with_tokens(prompt: int, completion: int, factor: int) -> None:
    one = cost_summary(
        [ok(0, cache="miss", engine="large", prompt_tokens=prompt, completion_tokens=completion)],
        PRICES,
    )
    many = cost_summary(
        [
            ok(
                0,
                cache="miss",
                engine="large",
                prompt_tokens=prompt * factor,
                completion_tokens=completion * factor,
            )
        ],
        PRICES,
    )
    assert many["total"] == pytest.approx(one["total"] * factor)


def test_cache_quality_traces_hits_back_to_their_producers() -> None:
    results = [
        ok(0, cache="miss", group="A", answer_digest="dA"),
        ok(1, cache="miss", group="B", answer_digest="dB"),
        ok(2, cache="hit-semantic", group="A", answer_digest="dA"),  # correct
        ok(3, cache="hit-semantic", group="C", answer_digest="dA"),  # false: C asked, A answered
        ok(4, cache="hit-semantic", group="C", answer_digest="old"),  # made before this run
        ok(5, cache="hit-semantic", group=None, answer_digest="dB"),  # no label
        ok(6, cache="hit-exact", group="B", answer_digest="dB", sampled=True),
        ok(7, cache="miss", group="D", answer_digest="dShared"),
        ok(8, cache="bypass", group="E", answer_digest="dShared"),
        ok(9, cache="hit-semantic", group="E", answer_digest="dShared"),  # ambiguous, credited
        RequestResult(
            10, status=500, latency_s=0.1, cache="hit-semantic", group="Z", answer_digest="dA"
        ),
    ]
    quality = cache_quality(results)
    semantic = quality["hit-semantic"]
    assert (semantic["hits"], semantic["correct"], semantic["false"], semantic["unknown"]) == (
        5,
        2,
        1,
        2,
    )
    assert semantic["ambiguous"] == 1
    assert semantic["false_hit_rate"] == pytest.approx(1 / 3)
    exact = quality["hit-exact"]
    assert (exact["hits"], exact["correct"], exact["sampled_requests_hit"]) == (1, 1, 1)
    assert exact["false_hit_rate"] == 0.0


def test_cache_quality_without_hits_has_no_rate() -> None:
    assert (
        cache_quality([ok(0, cache="miss", group="A", answer_digest="d")])["hit-semantic"][
            "false_hit_rate"
        ]
        is None
    )


def test_routing_quality_scores_by_answering_engine() -> None:
    roles = {"small": "weak", "large": "strong"}
    ref_hard = {"weak": 0.0, "strong": 1.0}
    ref_easy = {"weak": 1.0, "strong": 1.0}
    results = [
        ok(0, engine="large", ref=ref_hard),
        ok(1, engine="small", ref=ref_easy),
        ok(2, engine="small", ref=ref_hard),
        ok(3, route="large", ref=ref_easy),  # no engine header: the route names the engine
        ok(4, engine="large"),  # no reference: not scored
        ok(5, engine="other", ref=ref_hard),  # no role: unscored
        RequestResult(6, status=503, latency_s=0.1, engine="large", ref=ref_hard),
    ]
    quality = routing_quality(results, roles)
    assert quality is not None
    assert quality["scored"] == 4
    assert quality["unscored"] == 1
    assert quality["mean_quality"] == pytest.approx(3 / 4)
    assert quality["share_to_strong"] == pytest.approx(2 / 4)
    assert quality["all_weak_quality"] == pytest.approx(2 / 4)
    assert quality["all_strong_quality"] == pytest.approx(1.0)
    assert quality["gap_recovered"] == pytest.approx((0.75 - 0.5) / 0.5)


def test_routing_quality_uses_engine_name_keys_and_absent_refs() -> None:
    assert routing_quality([ok(0, engine="large")], {}) is None
    quality = routing_quality([ok(0, engine="m1", ref={"m1": 0.3, "m2": 0.9})], {})
    assert quality is not None
    assert quality["mean_quality"] == pytest.approx(0.3)
    assert "gap_recovered" not in quality


def test_summarize_and_table_show_the_numbers() -> None:
    results = [
        ok(
            0,
            latency_s=0.1,
            cache="miss",
            engine="small",
            route="small",
            route_reason="easy",
            prompt_tokens=10,
            completion_tokens=5,
            group="A",
            answer_digest="d",
        ),
        ok(
            1,
            latency_s=0.3,
            cache="hit-semantic",
            engine="small",
            route="small",
            route_reason="easy",
            group="B",
            answer_digest="d",
            stream=True,
            ttft_s=0.05,
        ),
        RequestResult(2, status=429, latency_s=0.01),
    ]
    summary = summarize(results, 1.5, PRICES)
    assert summary["requests_per_s"] == pytest.approx(2.0)
    assert summary["cache"]["counts"]["hit-semantic"] == 1
    assert summary["cache"]["hit_rate"] == pytest.approx(0.5)
    assert summary["errors"] == {"429": 1}
    assert summary["ttft_s"]["p50"] == pytest.approx(0.05)
    assert summary["quality"]["cache"]["hit-semantic"]["false"] == 1
    table = format_table(summary)
    assert re.search(r"hit-semantic false-hit rate\s+100\.0%", table)
    assert "429=1" in table
    assert "tokens small" in table


def test_the_table_says_when_usage_was_estimated() -> None:
    exact = RequestResult(0, status=200, latency_s=0.1, cache="miss", engine="small")
    guessed = RequestResult(1, status=200, latency_s=0.1, cache="miss", engine="small",
                            prompt_tokens=3, completion_tokens=9, usage_estimated=True)  # fmt: skip
    assert "usage estimated" not in format_table(summarize([exact], 1.0, PRICES))
    table = format_table(summarize([exact, guessed], 1.0, PRICES))
    assert re.search(r"usage estimated\s+1 requests", table)
