"""The semantic cache's self-tuning cut-off: pure controllers and their per-tier shell.

What moves: the verifier cut-off (the minimum same-question probability a candidate needs), not
the base cosine ``similarity_threshold``. The base threshold (0.50 by default) only decides which
neighbours the verifier gets to see; the cut-off is what actually accepts or refuses a hit, and
on the dev pairs it trades precision for recall far better than a cosine does (docs/benchmarks.md
section 3). Without a trained verifier the cache's cosine threshold is its only cut-off, and
that is what moves.

Two rules (``tune.rule``):

``evidence`` (default, :func:`choose_cutoff`). Every audit carries the verifier score of the
candidate it judged: audited hits (the engine asked again in the background) and *counterfactual*
audits of misses whose best candidate passed the cosine gate and the guards and was refused only
by the cut-off (the engine answers such a miss anyway, so its answer is compared with the refused
candidate's stored one: no extra engine call). Both are sampled by the same per-tier sampler over
the same events, so the latest ``tune.samples`` (score, disagreed) pairs are a uniform sample of
the candidates the cache could serve at any cut-off. The false-hit share at a cut-off ``c`` is
then estimated by the disagreements among samples scored ``>= c``, and the rule picks the lowest
``c`` in [min, max] where at least ``min_audits`` samples lie and the one-sided Wilson upper bound
(``tune.confidence``, 90 % by default) of that share is at most ``audit.target`` (a *proven*
cut-off). It relaxes only to a proven value; it raises (to the lowest proven value, or by steps
when none is) only when the observed share at the current value is above the target; in between
it holds (the dead band, which keeps the cut-off from flapping with the sampling noise). With no
proven value it raises by steps as the step rule does (a jump to ``max`` would stop every hit until
the evidence to come back accrued: the cold start from a loose value is the usual case). Relaxing
only to values whose *upper* bound is under target is what keeps the served share under the
target rather than around it, and the lowest proven value is what keeps as many hits as the
evidence allows. It decides every ``min_audits`` new samples and jumps straight to the chosen
value: the choice rests on evidence at that value, not on a blind step.

``step`` (:func:`next_cutoff`). Reads only the audits made at the current cut-off: stricter when
the observed rate is above ``target * set_point`` (0.5 by default: aim under the target, not at
it), the step growing with how far above (up to 4 steps); looser by one step when the Wilson upper
bound is under ``target * relax_below``; between the two it holds (the dead band). Steps are made in
logit space (a step of ``step`` at 0.5 is ``4 * step`` logits), so they shrink near 1: 0.93 moves
to about 0.95, not 0.99. It cannot relax once it serves nothing (no hits, no audits): that is
what counterfactual audits fix, and why ``evidence`` is the default.

Both never leave [min, max] and never move on fewer than ``min_audits`` audits.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Protocol

import structlog

from proxy.policy.schema import Cache
from proxy.shadow.stats import AuditCounts, AuditWindow, Interval, wilson_interval

log = structlog.get_logger("frugal.shadow")

MAX_BOOST = 4.0  # a raise is at most this many steps
LOGIT_PER_STEP = 4.0  # d logit / dp at p = 0.5: a step of ``step`` at 0.5 in logit units
_EDGE = 1e-6  # logits of 0 and 1 are infinite: clamp before converting


@dataclass(frozen=True, slots=True)
class TuneBounds:
    low: float
    high: float
    step: float
    min_audits: int
    target: float
    relax_below: float = 0.5
    set_point: float = 0.5  # step rule: raise above target * set_point
    confidence: float = 0.9  # evidence rule: one-sided

    @classmethod
    def from_policy(cls, cache: Cache) -> TuneBounds:
        tune = cache.tune
        return cls(
            low=tune.min,
            high=tune.max,
            step=tune.step,
            min_audits=tune.min_audits,
            target=cache.audit.target,
            relax_below=tune.relax_below,
            set_point=tune.set_point,
            confidence=tune.confidence,
        )


@dataclass(frozen=True, slots=True)
class Move:
    value: float
    reason: str
    interval: Interval


@dataclass(frozen=True, slots=True)
class Sample:
    """One scored audit: the verifier score of the judged candidate and whether it disagreed."""

    score: float
    disagreed: bool


def logit(p: float) -> float:
    p = min(1.0 - _EDGE, max(_EDGE, p))
    return math.log(p / (1.0 - p))


def expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def stepped(current: float, steps: float, bounds: TuneBounds) -> float:
    """``current`` moved by ``steps`` steps in logit space, kept within the bounds."""
    moved = expit(logit(current) + steps * bounds.step * LOGIT_PER_STEP)
    return min(bounds.high, max(bounds.low, _round(moved)))


def next_cutoff(current: float, counts: AuditCounts, bounds: TuneBounds) -> Move:
    """The step rule: the cut-off after these audits at ``current``, and why (pure)."""
    interval = counts.interval()
    if current < bounds.low:
        return Move(bounds.low, "below_min", interval)
    if current > bounds.high:
        return Move(bounds.high, "above_max", interval)
    if counts.audits < bounds.min_audits:
        return Move(current, "too_few_audits", interval)
    set_point = bounds.target * bounds.set_point
    if interval.rate > set_point:
        if current >= bounds.high:
            return Move(current, "at_max", interval)
        boost = min(MAX_BOOST, max(1.0, interval.rate / bounds.target))
        return Move(stepped(current, boost, bounds), "disagreement_above_target", interval)
    if interval.high < bounds.target * bounds.relax_below:
        if current <= bounds.low:
            return Move(current, "at_min", interval)
        return Move(stepped(current, -1.0, bounds), "disagreement_below_target", interval)
    return Move(current, "within_target", interval)


def choose_cutoff(
    current: float, samples: Iterable[Sample], bounds: TuneBounds, *, covered_from: float = 0.0
) -> Move:
    """The evidence rule (pure).

    A cut-off is *proven* when at least ``min_audits`` samples score at or above it and the
    one-sided upper bound of their disagreement share is at most the target. The rule moves to
    the lowest proven cut-off in [low, high] when that is at or below ``current`` (relax or hold);
    otherwise it holds while the observed share at ``current`` is at most the target (the dead
    band: not proven, not shown to be over), and else raises to the lowest proven cut-off, or by
    up to four logit steps when none is proven. With fewer than ``min_audits`` samples in all it
    holds; with fewer at or above the current value, the best-scored ``min_audits`` judge it.

    ``covered_from``: the samples are a uniform sample of the candidates scored at or above it
    only (without counterfactual audits, only hits are audited: nothing below the current value).
    Below it the rule has no evidence, so it relaxes past it by one step at most (a probe).
    """
    ranked = sorted((s for s in samples if s.score >= bounds.low), key=lambda s: -s.score)
    if len(ranked) < bounds.min_audits:
        return Move(current, "too_few_audits", wilson_interval(0, 0))
    z = NormalDist().inv_cdf(bounds.confidence)
    chosen: tuple[float, Interval] | None = None
    n = disagreements = 0
    for i, sample in enumerate(ranked):
        n += 1
        disagreements += sample.disagreed
        if i + 1 < len(ranked) and ranked[i + 1].score == sample.score:
            continue  # a cut-off admits every sample of one score or none
        if sample.score > bounds.high or n < bounds.min_audits:
            continue
        interval = wilson_interval(disagreements, n, z)
        if interval.high <= bounds.target:
            # The last sample: nothing lower was refused by the evidence, so the floor.
            value = bounds.low if i + 1 == len(ranked) else _round(sample.score)
            chosen = (value, interval)
    if chosen is not None and chosen[0] <= current:
        value, interval = chosen
        if value < covered_from:
            value = max(value, min(current, stepped(covered_from, -1.0, bounds)))
        reason = "relaxed_on_evidence" if value < current else "held_on_evidence"
        return Move(value, reason, interval)
    above = [s for s in ranked if s.score >= current]
    here = wilson_interval(sum(s.disagreed for s in above), len(above), z)
    if len(above) >= bounds.min_audits and here.rate <= bounds.target and current <= bounds.high:
        return Move(current, "within_target", here)
    if chosen is not None:
        return Move(chosen[0], "raised_on_evidence", chosen[1])
    if len(above) < bounds.min_audits:
        # Too few samples at the current value to judge it: judge it by the best-scored
        # ``min_audits`` (disagreement falls with the score, so this errs on the strict side).
        # Clean: wait for evidence to relax; not clean: tighten.
        top = ranked[: bounds.min_audits]
        here = wilson_interval(sum(s.disagreed for s in top), len(top), z)
        if here.rate <= bounds.target:
            return Move(current, "too_few_at_cutoff", here)
    # Over the target and nothing proven (yet): step up as the step rule does, in logit space;
    # a blind jump to ``high`` would stop every hit until the evidence to come back accrues.
    if current >= bounds.high:
        return Move(current, "at_max", here)
    boost = min(MAX_BOOST, max(1.0, here.rate / bounds.target))
    return Move(stepped(current, boost, bounds), "no_proven_cutoff", here)


def _round(value: float) -> float:
    # Repeated steps must not drift (0.1 + 0.2 ...): values are compared for equality.
    return round(value, 6)


class TunerObserver(Protocol):
    def audit_rate(self, tier: str, interval: Interval, audits: int) -> None: ...

    def threshold(self, tier: str, kind: str, value: float) -> None: ...

    def threshold_changed(self, tier: str, kind: str, reason: str) -> None: ...


@dataclass(slots=True)
class _Tier:
    window: AuditWindow  # the latest hit audits whatever the cut-off: the published estimate
    since_move: AuditWindow  # step rule: hit audits made at the current cut-off
    samples: deque[Sample] = field(default_factory=deque)  # evidence rule: scored audits
    since_decision: int = 0  # evidence rule: samples since it last decided
    value: float | None = None


@dataclass(eq=False)
class CacheTuner:
    """Each tier's verifier cut-off: the policy's fixed value, or the tuned one.

    ``base_cutoff`` is the cache verifier's own cut-off, used when a policy names none.
    """

    base_cutoff: float
    observer: TunerObserver | None = None
    window: int = 500
    _tiers: dict[str, _Tier] = field(default_factory=dict)

    def cutoff(self, tier: str, cache: Cache) -> float:
        """The cut-off this tier's semantic lookups use now."""
        static = cache.verifier_cutoff if cache.verifier_cutoff is not None else self.base_cutoff
        if not cache.tune.enabled:
            return static
        state = self._tier(tier)
        if state.value is None:
            state.value = min(cache.tune.max, max(cache.tune.min, static))
            self._publish(tier, state.value)
        return state.value

    @staticmethod
    def wants_counterfactual(cache: Cache) -> bool:
        """Whether this tier's misses refused only by the cut-off should be audited too."""
        tune = cache.tune
        return tune.enabled and tune.rule == "evidence" and tune.counterfactual

    def record(
        self,
        tier: str,
        cache: Cache,
        *,
        disagreed: bool,
        cutoff_used: float | None,
        score: float | None = None,
        counterfactual: bool = False,
    ) -> Move | None:
        """One audit's outcome; returns the controller's decision when tuning is on.

        ``score`` is the verifier score of the judged candidate; ``counterfactual`` marks the
        audit of a refused candidate (it feeds the evidence rule, not the published hit rate).
        """
        disagreed = bool(disagreed)  # numpy booleans in benchmarks
        state = self._tier(tier)
        if not counterfactual:
            state.window.add(disagreed=disagreed)
            if self.observer is not None:
                self.observer.audit_rate(tier, state.window.interval(), state.window.counts.audits)
        if not cache.tune.enabled:
            return None
        current = self.cutoff(tier, cache)
        bounds = TuneBounds.from_policy(cache)
        if cache.tune.rule == "evidence":
            if score is None:
                return None
            if state.samples.maxlen != cache.tune.samples:
                state.samples = deque(state.samples, maxlen=cache.tune.samples)
            state.samples.append(Sample(float(score), disagreed))
            state.since_decision += 1
            if state.since_decision < cache.tune.min_audits:
                return None
            state.since_decision = 0
            covered = 0.0 if cache.tune.counterfactual else current
            move = choose_cutoff(current, state.samples, bounds, covered_from=covered)
            evidence = AuditCounts(len(state.samples), sum(s.disagreed for s in state.samples))
        else:
            if counterfactual:
                return None
            if cutoff_used is not None and cutoff_used != current:
                return None  # decided under an earlier cut-off: says nothing about this one
            state.since_move.add(disagreed=disagreed)
            move = next_cutoff(current, state.since_move.counts, bounds)
            evidence = state.since_move.counts
        if move.value != current:
            state.value = move.value
            state.since_move.clear()
            log.info(
                "cache cut-off tuned",
                tier=tier,
                old=current,
                new=move.value,
                reason=move.reason,
                rule=cache.tune.rule,
                audits=evidence.audits,
                disagreements=evidence.disagreements,
                rate_low=round(move.interval.low, 4),
                rate_high=round(move.interval.high, 4),
                target=cache.audit.target,
            )
            self._publish(tier, move.value, reason=move.reason)
        return move

    def interval(self, tier: str) -> tuple[AuditCounts, Interval]:
        state = self._tier(tier)
        return state.window.counts, state.window.interval()

    def report(self) -> dict[str, dict[str, float | int | None]]:
        """Per tier: audits in the window, disagreement rate and bounds, tuned cut-off."""
        out: dict[str, dict[str, float | int | None]] = {}
        for tier, state in sorted(self._tiers.items()):
            counts, interval = state.window.counts, state.window.interval()
            out[tier] = {
                "audits": counts.audits,
                "disagreements": counts.disagreements,
                "disagreement_rate": round(interval.rate, 6),
                "rate_low": round(interval.low, 6),
                "rate_high": round(interval.high, 6),
                "tuned_cutoff": state.value,
            }
        return out

    def _tier(self, tier: str) -> _Tier:
        state = self._tiers.get(tier)
        if state is None:
            state = _Tier(AuditWindow(self.window), AuditWindow(self.window))
            self._tiers[tier] = state
        return state

    def _publish(self, tier: str, value: float, *, reason: str | None = None) -> None:
        if self.observer is None:
            return
        self.observer.threshold(tier, "cache_cutoff", value)
        if reason is not None:
            self.observer.threshold_changed(tier, "cache_cutoff", reason)
