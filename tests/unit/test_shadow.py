"""Pure parts of the shadow checks: Wilson interval, audit window, answer comparison, the cut-off
controller and its per-tier shell, the audit sampler, and the policy fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.policy.schema import Cache
from proxy.shadow.audit import AuditSampler
from proxy.shadow.compare import CompareMode, answer_text, cosine, judge
from proxy.shadow.stats import AuditCounts, AuditWindow, Interval, wilson_interval
from proxy.shadow.tuner import CacheTuner, TuneBounds, next_cutoff

counts = st.integers(min_value=1, max_value=10_000).flatmap(
    lambda n: st.tuples(st.integers(min_value=0, max_value=n), st.just(n))
)

# -- Wilson interval ------------------------------------------------------------------------


@given(counts)
def test_wilson_interval_contains_the_rate_and_stays_in_unit_range(kn: tuple[int, int]) -> None:
    k, n = kn
    interval = wilson_interval(k, n)
    assert 0.0 <= interval.low <= interval.rate <= interval.high <= 1.0
    assert interval.rate == pytest.approx(k / n)


@given(counts)
def test_wilson_interval_is_symmetric(kn: tuple[int, int]) -> None:
    k, n = kn
    a, b = wilson_interval(k, n), wilson_interval(n - k, n)
    assert a.low == pytest.approx(1 - b.high, abs=1e-12)
    assert a.high == pytest.approx(1 - b.low, abs=1e-12)


@given(counts)
def test_wilson_interval_narrows_with_more_evidence(kn: tuple[int, int]) -> None:
    k, n = kn
    few, many = wilson_interval(k, n), wilson_interval(4 * k, 4 * n)
    assert many.high - many.low < few.high - few.low


def test_wilson_interval_known_values_and_edges() -> None:
    # Reference values (Wilson 1927; e.g. Newcombe 1998, table I).
    half = wilson_interval(5, 10)
    assert (half.low, half.high) == (
        pytest.approx(0.2366, abs=1e-4),
        pytest.approx(0.7634, abs=1e-4),
    )
    none = wilson_interval(0, 10)
    assert none.low == 0.0 and none.high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == Interval(0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@given(st.lists(st.booleans(), max_size=200), st.integers(min_value=1, max_value=50))
def test_audit_window_counts_the_latest_outcomes(outcomes: list[bool], size: int) -> None:
    window = AuditWindow(size)
    for outcome in outcomes:
        window.add(disagreed=outcome)
    latest = outcomes[-size:]
    assert window.counts == AuditCounts(len(latest), sum(latest))


# -- comparison -----------------------------------------------------------------------------


def test_answer_text_reads_chat_and_text_completions() -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}}]}
    assert answer_text(chat) == "Paris"
    text = {"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}]}
    assert answer_text(text) == "a\nb"
    assert answer_text({"choices": [{"index": 0, "message": {"tool_calls": []}}]}) is None
    assert answer_text({"error": {}}) is None


def test_judge_exact_and_embedding_modes() -> None:
    assert judge("Paris ", "Paris", mode=CompareMode.EXACT).outcome == "identical"
    assert not judge("Paris", "Lyon", mode=CompareMode.EXACT, similarity=0.99).agreed
    close = judge("Paris.", "It is Paris.", mode=CompareMode.EMBEDDING, similarity=0.95, bound=0.9)
    assert close.outcome == "similar" and close.agreed
    far = judge("Paris.", "Berlin.", mode=CompareMode.EMBEDDING, similarity=0.5, bound=0.9)
    assert far.outcome == "different" and not far.agreed
    # No embedding: only the same text can agree.
    assert not judge("a", "b", mode=CompareMode.EMBEDDING, similarity=None).agreed


def test_cosine() -> None:
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(np.zeros(2), np.ones(2)) == 0.0


# -- controller -----------------------------------------------------------------------------

BOUNDS = TuneBounds(low=0.6, high=0.95, step=0.02, min_audits=30, target=0.02, relax_below=0.5)


def test_raises_when_the_lower_bound_is_above_target() -> None:
    move = next_cutoff(0.8, AuditCounts(30, 6), BOUNDS)
    assert move.reason == "disagreement_above_target"
    assert move.interval.low > BOUNDS.target
    assert 0.8 + BOUNDS.step <= move.value <= 0.8 + 4 * BOUNDS.step


def test_raise_stops_at_max_and_holds_there() -> None:
    assert next_cutoff(0.94, AuditCounts(30, 20), BOUNDS).value == 0.95
    held = next_cutoff(0.95, AuditCounts(30, 20), BOUNDS)
    assert (held.value, held.reason) == (0.95, "at_max")


def test_holds_on_too_few_audits_and_within_target() -> None:
    assert next_cutoff(0.8, AuditCounts(29, 29), BOUNDS).reason == "too_few_audits"
    # 1 of 30: the interval straddles 2 % and is not under 1 %: no move either way.
    held = next_cutoff(0.8, AuditCounts(30, 1), BOUNDS)
    assert (held.value, held.reason) == (0.8, "within_target")


def test_relaxes_one_step_when_the_upper_bound_is_well_under_target() -> None:
    move = next_cutoff(0.8, AuditCounts(500, 0), BOUNDS)  # upper bound ~0.0076 < 0.01
    assert (move.value, move.reason) == (pytest.approx(0.78), "disagreement_below_target")
    assert next_cutoff(0.6, AuditCounts(500, 0), BOUNDS).reason == "at_min"
    # Zero disagreements on 200 audits: upper bound ~0.019, under target but not well under.
    assert next_cutoff(0.8, AuditCounts(200, 0), BOUNDS).reason == "within_target"


def test_strict_mode_raises_on_the_observed_rate() -> None:
    # 1 of 30 (3.3 %): the interval straddles the 2 % target; only strict mode moves.
    assert next_cutoff(0.8, AuditCounts(30, 1), BOUNDS).reason == "within_target"
    strict = TuneBounds(
        low=0.6, high=0.95, step=0.02, min_audits=30, target=0.02, relax_below=0.5, strict=True
    )
    move = next_cutoff(0.8, AuditCounts(30, 1), strict)
    assert (move.value, move.reason) == (pytest.approx(0.82), "disagreement_above_target")
    assert next_cutoff(0.8, AuditCounts(50, 1), strict).reason == "within_target"  # 2 %: not above


def test_out_of_bounds_values_are_brought_back_first() -> None:
    assert next_cutoff(0.3, AuditCounts(), BOUNDS).value == 0.6
    assert next_cutoff(0.99, AuditCounts(), BOUNDS).value == 0.95


@given(
    st.floats(min_value=0.0, max_value=1.0),
    counts,
    st.floats(min_value=0.0, max_value=0.5),
    st.floats(min_value=0.5, max_value=1.0),
)
def test_moves_stay_within_bounds(
    current: float, kn: tuple[int, int], low: float, high: float
) -> None:
    bounds = TuneBounds(low=low, high=high, step=0.05, min_audits=1, target=0.02)
    move = next_cutoff(current, AuditCounts(kn[1], kn[0]), bounds)
    assert low <= move.value <= high
    if low <= current <= high:
        assert abs(move.value - current) <= 4 * bounds.step + 1e-6  # values are rounded to 1e-6


# -- per-tier shell -------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.values: list[tuple[str, float]] = []
        self.changes: list[tuple[str, str]] = []
        self.rates: list[tuple[str, Interval, int]] = []

    def audit_rate(self, tier: str, interval: Interval, audits: int) -> None:
        self.rates.append((tier, interval, audits))

    def threshold(self, tier: str, kind: str, value: float) -> None:
        self.values.append((tier, value))

    def threshold_changed(self, tier: str, kind: str, reason: str) -> None:
        self.changes.append((tier, reason))


def tuned(**tune: object) -> Cache:
    return Cache(
        verifier_cutoff=0.7,
        audit={"target": 0.02},
        tune={"enabled": True, "min": 0.6, "max": 0.95, "min_audits": 10, **tune},
    )


def test_tuner_without_tuning_gives_the_policy_or_base_cutoff() -> None:
    tuner = CacheTuner(base_cutoff=0.81)
    assert tuner.cutoff("free", Cache()) == 0.81
    assert tuner.cutoff("free", Cache(verifier_cutoff=0.9)) == 0.9
    for _ in range(50):
        assert tuner.record("free", Cache(), disagreed=True, cutoff_used=0.81) is None
    assert tuner.cutoff("free", Cache()) == 0.81
    assert tuner.report()["free"]["disagreements"] == 50


def test_tuner_raises_a_tier_on_disagreements_and_reports_every_change() -> None:
    recorder = Recorder()
    tuner = CacheTuner(base_cutoff=0.81, observer=recorder)
    policy = tuned()
    start = tuner.cutoff("free", policy)
    assert start == 0.7 and recorder.values == [("free", 0.7)]
    for _ in range(10):
        tuner.record("free", policy, disagreed=True, cutoff_used=tuner.cutoff("free", policy))
    raised = tuner.cutoff("free", policy)
    assert raised > start
    assert recorder.changes == [("free", "disagreement_above_target")]
    assert recorder.values[-1] == ("free", raised)
    # Other tiers are untouched.
    assert tuner.cutoff("pro", policy) == 0.7
    # Switching tuning off gives the fixed value back at once.
    assert tuner.cutoff("free", Cache(verifier_cutoff=0.7)) == 0.7


def test_audits_decided_under_an_older_cutoff_do_not_move_it() -> None:
    tuner = CacheTuner(base_cutoff=0.81)
    policy = tuned()
    for _ in range(30):
        tuner.record("free", policy, disagreed=True, cutoff_used=0.65)
    assert tuner.cutoff("free", policy) == 0.7
    assert tuner.report()["free"]["audits"] == 30  # still counted in the published rate


def test_tuned_cutoff_never_starts_outside_the_bounds() -> None:
    tuner = CacheTuner(base_cutoff=0.3)
    assert tuner.cutoff("t", Cache(tune={"enabled": True, "min": 0.6, "max": 0.9})) == 0.6


# -- sampler and policy ---------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=400))
def test_sampler_takes_exactly_the_share(every: int, events: int) -> None:
    sampler = AuditSampler()
    taken = sum(sampler.take("t", 1 / every) for _ in range(events))
    assert taken == events // every


def test_sampler_off_and_per_tier() -> None:
    sampler = AuditSampler()
    assert not any(sampler.take("t", 0.0) for _ in range(100))
    assert [sampler.take("a", 0.5) for _ in range(4)] == [False, True, False, True]
    assert sampler.take("b", 0.5) is False


def test_policy_tune_bounds_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"tune\.min"):
        Cache(tune={"min": 0.9, "max": 0.8})
    with pytest.raises(ValidationError, match="extra"):
        Cache(tune={"enabled": True, "bogus": 1})
    with pytest.raises(ValidationError):
        Cache(audit={"target": 0})
    assert math.isclose(Cache().audit.target, 0.02)


def test_audit_series_reach_the_dashboard_snapshot() -> None:
    from prometheus_client import CollectorRegistry

    from proxy.observability.metrics import iter_samples
    from proxy.observability.snapshot import build_snapshot
    from proxy.shadow.metrics import ShadowMetrics

    registry = CollectorRegistry()
    metrics = ShadowMetrics(registry)
    metrics.audit_rate("free", wilson_interval(3, 40), 40)
    metrics.threshold("free", "cache_cutoff", 0.87)
    snapshot = build_snapshot(
        samples=iter_samples(registry), recent=[], window_s=60, now_unix=0, uptime_s=1
    )
    row = snapshot["tiers"]["free"]
    assert row["audits"] == 40 and row["audit_rate"] == pytest.approx(3 / 40)
    assert row["audit_low"] < 3 / 40 < row["audit_high"]
    assert row["cache_cutoff"] == 0.87
