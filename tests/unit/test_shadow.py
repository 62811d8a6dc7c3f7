"""Pure parts of the shadow checks: Wilson interval, audit window, answer comparison, the cut-off
controller and its per-tier shell, the audit sampler, and the policy fields."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.policy.schema import Cache
from proxy.shadow.audit import AuditSampler
from proxy.shadow.compare import CompareMode, answer_text, cosine, judge
from proxy.shadow.stats import AuditCounts, AuditWindow, Interval, wilson_interval
from proxy.shadow.tuner import (
    CacheTuner,
    Sample,
    TuneBounds,
    choose_cutoff,
    logit,
    next_cutoff,
    stepped,
)

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


# -- step rule ------------------------------------------------------------------------------

BOUNDS = TuneBounds(low=0.6, high=0.95, step=0.02, min_audits=30, target=0.02, relax_below=0.5)


def test_raises_when_the_observed_rate_is_above_the_set_point() -> None:
    move = next_cutoff(0.8, AuditCounts(30, 6), BOUNDS)
    assert move.reason == "disagreement_above_target"
    assert stepped(0.8, 1, BOUNDS) <= move.value <= stepped(0.8, 4, BOUNDS)
    # 1 of 30 (3.3 %) is above the set point (1 %): the rule aims under the target, not at it.
    assert next_cutoff(0.8, AuditCounts(30, 1), BOUNDS).reason == "disagreement_above_target"
    # 1 of 200 (0.5 %) is under the set point, but not surely under 1 %: the dead band holds.
    held = next_cutoff(0.8, AuditCounts(200, 1), BOUNDS)
    assert (held.value, held.reason) == (0.8, "within_target")


def test_raise_stops_at_max_and_holds_there() -> None:
    assert next_cutoff(0.94, AuditCounts(30, 20), BOUNDS).value == 0.95
    held = next_cutoff(0.95, AuditCounts(30, 20), BOUNDS)
    assert (held.value, held.reason) == (0.95, "at_max")


def test_holds_on_too_few_audits() -> None:
    assert next_cutoff(0.8, AuditCounts(29, 29), BOUNDS).reason == "too_few_audits"


def test_relaxes_one_step_when_the_upper_bound_is_well_under_target() -> None:
    move = next_cutoff(0.8, AuditCounts(500, 0), BOUNDS)  # upper bound ~0.0076 < 0.01
    assert (move.value, move.reason) == (stepped(0.8, -1, BOUNDS), "disagreement_below_target")
    assert move.value < 0.8
    assert next_cutoff(0.6, AuditCounts(500, 0), BOUNDS).reason == "at_min"
    # Zero disagreements on 200 audits: upper bound ~0.019, under target but not well under.
    assert next_cutoff(0.8, AuditCounts(200, 0), BOUNDS).reason == "within_target"


def test_steps_are_made_in_logit_space_and_shrink_near_one() -> None:
    wide = TuneBounds(low=0.5, high=0.999, step=0.03, min_audits=1, target=0.02)
    assert stepped(0.5, 1, wide) == pytest.approx(0.53, abs=1e-3)  # ``step`` at 0.5
    near_one = stepped(0.93, 4, wide) - 0.93
    assert 0 < near_one < 0.03  # the old rule moved 0.93 -> 0.99 in one go
    assert near_one < stepped(0.5, 4, wide) - 0.5


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
    if low <= current <= high and 1e-3 <= current <= 1 - 1e-3:
        # Values are rounded to 1e-6, which only matters in logit terms right at 0 and 1.
        assert abs(logit(move.value) - logit(current)) <= 4 * 4 * bounds.step + 1e-2


# -- evidence rule --------------------------------------------------------------------------

EVIDENCE = TuneBounds(low=0.5, high=0.99, step=0.02, min_audits=20, target=0.02)
scores = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
sample_lists = st.lists(st.builds(Sample, scores, st.booleans()), max_size=400)


@given(st.floats(min_value=0.5, max_value=0.99), sample_lists)
def test_the_chosen_cutoff_is_within_bounds(current: float, samples: list[Sample]) -> None:
    move = choose_cutoff(current, samples, EVIDENCE)
    assert EVIDENCE.low <= move.value <= EVIDENCE.high


@given(st.lists(scores, min_size=200, max_size=400), st.floats(min_value=0.5, max_value=0.99))
def test_all_agreeing_samples_relax_to_the_minimum(values: list[float], current: float) -> None:
    samples = [Sample(v, False) for v in values]
    # 0 of n has a one-sided 90 % upper bound under 2 % from n = 81 on.
    assume(sum(v >= EVIDENCE.low for v in values) >= 81)
    move = choose_cutoff(current, samples, EVIDENCE)
    assert move.value == EVIDENCE.low
    assert move.interval.high <= EVIDENCE.target


@given(
    st.lists(st.floats(min_value=0.5, max_value=1.0), min_size=20, max_size=300),
    st.floats(min_value=0.5, max_value=0.99),
)
def test_disagreement_above_target_everywhere_goes_to_the_max(
    values: list[float], current: float
) -> None:
    # Every tenth sample disagrees, starting with the best scored: 10 % above every cut-off;
    # 20 more samples (one disagreeing) at the top keep the maximum judged.
    ranked = sorted([*values, *([0.995] * 20)], reverse=True)
    samples = [Sample(v, i % 10 == 0) for i, v in enumerate(ranked)]
    for _ in range(100):
        move = choose_cutoff(current, samples, EVIDENCE)
        assert move.value >= current
        assert move.reason in {"no_proven_cutoff", "at_max", "too_few_at_cutoff"}
        # By steps in logit space, never a jump: at most four steps of ``step`` at 0.5.
        assert logit(move.value) - logit(current) <= 4 * 4 * EVIDENCE.step + 1e-3
        current = move.value
    assert current == EVIDENCE.high


def test_a_tight_cutoff_with_few_samples_above_is_judged_by_the_best_scored() -> None:
    # At 0.97 nothing scores above the cut-off. The 20 best-scored samples (0.69-0.9) are clean:
    # no reason to tighten, and 30 samples prove nothing lower yet: it waits.
    samples = [Sample(0.6 + 0.3 * i / 30, i in (0, 5)) for i in range(30)]
    held = choose_cutoff(0.97, samples, EVIDENCE)
    assert (held.value, held.reason) == (0.97, "too_few_at_cutoff")
    # The best-scored disagree (3 of 20): it tightens, by steps.
    dirty = [Sample(0.6 + 0.3 * i / 30, i in (29, 27, 25)) for i in range(30)]
    raised = choose_cutoff(0.97, dirty, EVIDENCE)
    assert raised.reason == "no_proven_cutoff" and 0.97 < raised.value <= EVIDENCE.high


def test_the_lowest_cutoff_with_enough_clean_evidence_is_chosen() -> None:
    # 300 clean samples at 0.9-0.99, then 300 at 0.6-0.7 of which a third disagree.
    clean = [Sample(0.9 + 0.09 * i / 300, False) for i in range(300)]
    mixed = [Sample(0.6 + 0.1 * i / 300, i % 3 == 0) for i in range(300)]
    move = choose_cutoff(0.5, clean + mixed, EVIDENCE)
    assert move.reason == "raised_on_evidence"
    assert 0.6 < move.value <= 0.9
    above = [s for s in clean + mixed if s.score >= move.value]
    assert sum(s.disagreed for s in above) / len(above) < EVIDENCE.target
    # The next lower cut-off is not safe: one-sided 90 % upper bound above the target.
    lower = max(s.score for s in clean + mixed if s.score < move.value)
    below = [s for s in clean + mixed if s.score >= lower]
    z = NormalDist().inv_cdf(0.9)
    assert wilson_interval(sum(s.disagreed for s in below), len(below), z).high > EVIDENCE.target


def test_the_evidence_rule_holds_in_its_dead_band() -> None:
    # 1 disagreement in 100 at or above 0.7: observed 1 %, under the 2 % target, but the upper
    # bound (~3.9 %) proves nothing: no relaxing below, no raising either.
    samples = [Sample(0.7 + 0.2 * i / 100, i == 50) for i in range(100)]
    held = choose_cutoff(0.7, samples, EVIDENCE)
    assert (held.value, held.reason) == (0.7, "within_target")
    # Three more disagreements at the current value: observed 3.9 %, above target: it raises,
    # to the lowest proven value if any, else to the maximum.
    worse = samples + [Sample(0.7, True)] * 3
    raised = choose_cutoff(0.7, worse, EVIDENCE)
    assert raised.value > 0.7 and raised.reason in {"raised_on_evidence", "no_proven_cutoff"}


def test_without_counterfactual_evidence_it_relaxes_one_step_at_a_time() -> None:
    # Only hits audited at 0.8: clean, but nothing is known of the candidates under 0.8.
    samples = [Sample(0.8 + 0.19 * i / 300, False) for i in range(300)]
    assert choose_cutoff(0.8, samples, EVIDENCE).value == EVIDENCE.low  # if they were covered
    probe = choose_cutoff(0.8, samples, EVIDENCE, covered_from=0.8)
    assert probe.reason == "relaxed_on_evidence"
    assert probe.value == stepped(0.8, -1.0, EVIDENCE) < 0.8


def test_the_evidence_rule_holds_on_too_few_samples() -> None:
    few = [Sample(0.95, True)] * 19 + [Sample(0.3, True)] * 50  # below ``low``: not evidence
    move = choose_cutoff(0.7, few, EVIDENCE)
    assert (move.value, move.reason) == (0.7, "too_few_audits")


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
        tune={"enabled": True, "rule": "step", "min": 0.6, "max": 0.95, "min_audits": 10, **tune},
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


def test_evidence_rule_relaxes_on_counterfactual_audits_alone() -> None:
    """A tier tightened to its max serves nothing, so hit audits dry up; audits of the misses
    it refused still show the candidates would have agreed, and the cut-off comes down."""
    recorder = Recorder()
    tuner = CacheTuner(base_cutoff=0.81, observer=recorder)
    policy = tuned(rule="evidence", min_audits=20).model_copy(update={"verifier_cutoff": 0.95})
    assert tuner.cutoff("free", policy) == 0.95
    for i in range(200):
        tuner.record(
            "free",
            policy,
            disagreed=False,
            cutoff_used=0.95,
            score=0.65 + 0.25 * i / 200,
            counterfactual=True,
        )
    assert tuner.cutoff("free", policy) == 0.6
    assert recorder.changes == [("free", "relaxed_on_evidence")]
    # Counterfactual audits are not hits: the published false-hit estimate has none.
    assert tuner.report()["free"]["audits"] == 0
    assert tuner.wants_counterfactual(policy)
    assert not tuner.wants_counterfactual(tuned())
    assert not tuner.wants_counterfactual(tuned(rule="evidence", counterfactual=False))


def test_evidence_rule_raises_on_disagreeing_hits_and_ignores_unscored_audits() -> None:
    tuner = CacheTuner(base_cutoff=0.81)
    policy = tuned(rule="evidence", min_audits=10)
    for _ in range(50):
        assert tuner.record("free", policy, disagreed=True, cutoff_used=0.7) is None
    assert tuner.cutoff("free", policy) == 0.7
    moves = [
        tuner.record("free", policy, disagreed=i % 4 == 0, cutoff_used=0.7, score=0.8)
        for i in range(10)
    ]
    assert moves[-1] is not None and moves[-1].reason == "no_proven_cutoff"
    assert 0.7 < tuner.cutoff("free", policy) < 0.95


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
