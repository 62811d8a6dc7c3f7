"""scripts/bench_engines.py reads the proxy's own overhead account off a real /metrics page."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from proxy.observability.metrics import Metrics
from scripts.bench_engines import parse_overhead


def page(overheads: dict[str, list[float]]) -> str:
    metrics = Metrics()
    for tier, values in overheads.items():
        for value in values:
            metrics.request_done(
                tier=tier, model="m", engine="e", status=200, cache="miss", latency_s=1.0,
                ttft_s=0.5, overhead_s=value, tokens_in=1, tokens_out=1, cost_usd=0.0,
                saved_cache_usd=0.0, saved_routing_usd=0.0, stream=True,
            )  # fmt: skip
    return generate_latest(metrics.registry).decode()


def test_the_account_is_summed_over_tiers_and_differenced_over_a_phase() -> None:
    before = parse_overhead(page({"free": [0.0004], "pro": [0.0004]}))
    after = parse_overhead(page({"free": [0.0004, 0.0004, 0.0008], "pro": [0.0004, 0.3]}))
    assert before is not None and after is not None
    phase = after.minus(before)
    assert phase.count == 3
    assert math.isclose(phase.total_s, 0.0008 + 0.0004 + 0.3)
    assert phase.bound(0.5) == 0.001  # two of three at or under 1 ms
    assert phase.bound(0.99) == 0.5  # the encoder's wait, resolved by the new buckets


def test_a_page_without_the_metric_is_no_account() -> None:
    assert parse_overhead("# just some other exporter\nup 1\n") is None


def test_accounts_of_several_phases_add_up() -> None:
    one = parse_overhead(page({"free": [0.0004, 0.3]}))
    two = parse_overhead(page({"pro": [0.0008]}))
    assert one is not None and two is not None
    both = one.plus(two)
    assert both.count == 3 and both.bound(0.5) == 0.001
    assert both.minus(two).buckets == one.buckets


def test_cache_hits_are_summed_over_their_labels_and_nothing_else() -> None:
    from scripts.bench_engines import HITS_METRIC, parse_total

    metrics = Metrics()
    metrics.cache_lookup(kind="exact", scope="tenant", hit=True)
    metrics.cache_lookup(kind="semantic", scope="user", hit=True)
    metrics.cache_lookup(kind="semantic", scope="user", hit=True)
    metrics.cache_lookup(kind="exact", scope="tenant", hit=False)
    text = generate_latest(metrics.registry).decode()
    assert parse_total(text, HITS_METRIC) == 3  # not the lookups, nor the _created samples
    assert parse_total("up 1\n", HITS_METRIC) == 0


def test_misses_questions_are_distinct_ordinary_and_the_same_each_run(tmp_path: Path) -> None:
    from scripts.bench_engines import load_questions

    source = tmp_path / "q.txt"
    questions = [f"what is question number {i}?" for i in range(50)]
    lines = ["short", "x" * 401, *questions, "what is question number 3?"]
    source.write_text("\n".join(lines) + "\n")
    first, second = load_questions(source), load_questions(source)
    assert first == second and len(first) == len(set(first)) == 50
    assert first != sorted(first)  # shuffled, so a run does not walk one topic after another


def test_each_round_gets_questions_of_its_own() -> None:
    from scripts.bench_engines import QuestionSlices

    slices = QuestionSlices([f"q{i}" for i in range(6)])
    assert slices.take(2) == ["q0", "q1"]
    assert slices.take(3) == ["q2", "q3", "q4"]
    with pytest.raises(SystemExit, match="ran out"):
        slices.take(2)  # one left: a round never runs on fewer questions than it needs


def test_the_interval_is_the_mean_give_or_take_two_standard_errors() -> None:
    from scripts.bench_engines import ratio_interval

    mean, low, high = ratio_interval([0.96, 1.00, 1.04, 1.00])
    assert mean == pytest.approx(1.0)
    # stdev 0.03266, 4 rounds: SE 0.01633
    assert (low, high) == (pytest.approx(1.0 - 0.03266), pytest.approx(1.0 + 0.03266))
    assert ratio_interval([0.97]) == (0.97, -math.inf, math.inf)  # one round bounds nothing
