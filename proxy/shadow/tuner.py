"""The semantic cache's self-tuning cut-off: a pure controller and its per-tier shell.

What moves: the verifier cut-off (the minimum same-question probability a candidate needs), not
the base cosine ``similarity_threshold``. The base threshold (0.50 by default) only decides which
neighbours the verifier gets to see; the cut-off is what actually accepts or refuses a hit, and
on the dev pairs it trades precision for recall far better than a cosine does (docs/benchmarks.md
section 3). Without a trained verifier the cache's cosine threshold is its only cut-off, and
that is what moves.

The controller (:func:`next_cutoff`) reads the audits made since its last move:

- stricter when the disagreement rate's Wilson lower bound is above the tier's target (we are
  95 % sure there are too many false hits); the step grows with how far above (up to 4 steps),
  so a badly loose start converges in a few moves;
- looser, one step, when the upper bound is under ``target * relax_below`` (we are sure there
  are far fewer than allowed: the cache could serve more);
- otherwise it holds; it never leaves [min, max] and never moves on fewer than ``min_audits``.

So by default the rate settles around the target (it rises only when surely above it). With
``strict`` it rises whenever the observed rate is above the target, which keeps the rate under
the target at the price of more paraphrase hits refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import structlog

from proxy.policy.schema import Cache
from proxy.shadow.stats import AuditCounts, AuditWindow, Interval

log = structlog.get_logger("frugal.shadow")

MAX_BOOST = 4.0  # a raise is at most this many steps


@dataclass(frozen=True, slots=True)
class TuneBounds:
    low: float
    high: float
    step: float
    min_audits: int
    target: float
    relax_below: float = 0.5
    strict: bool = False  # raise on the observed rate, not only on the lower bound

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
            strict=tune.strict,
        )


@dataclass(frozen=True, slots=True)
class Move:
    value: float
    reason: str
    interval: Interval


def next_cutoff(current: float, counts: AuditCounts, bounds: TuneBounds) -> Move:
    """The cut-off after these audits, and why (pure)."""
    interval = counts.interval()
    if current < bounds.low:
        return Move(bounds.low, "below_min", interval)
    if current > bounds.high:
        return Move(bounds.high, "above_max", interval)
    if counts.audits < bounds.min_audits:
        return Move(current, "too_few_audits", interval)
    too_many = interval.rate if bounds.strict else interval.low
    if too_many > bounds.target:
        if current >= bounds.high:
            return Move(current, "at_max", interval)
        boost = min(MAX_BOOST, max(1.0, interval.low / bounds.target))
        return Move(
            min(bounds.high, _round(current + bounds.step * boost)),
            "disagreement_above_target",
            interval,
        )
    if interval.high < bounds.target * bounds.relax_below:
        if current <= bounds.low:
            return Move(current, "at_min", interval)
        return Move(
            max(bounds.low, _round(current - bounds.step)), "disagreement_below_target", interval
        )
    return Move(current, "within_target", interval)


def _round(value: float) -> float:
    # Repeated steps must not drift (0.1 + 0.2 ...): values are compared for equality.
    return round(value, 6)


class TunerObserver(Protocol):
    def audit_rate(self, tier: str, interval: Interval, audits: int) -> None: ...

    def threshold(self, tier: str, kind: str, value: float) -> None: ...

    def threshold_changed(self, tier: str, kind: str, reason: str) -> None: ...


@dataclass(slots=True)
class _Tier:
    window: AuditWindow  # the latest audits whatever the cut-off: the published estimate
    since_move: AuditWindow  # audits made at the current cut-off: what the controller reads
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

    def record(
        self, tier: str, cache: Cache, *, disagreed: bool, cutoff_used: float | None
    ) -> Move | None:
        """One audit's outcome; returns the controller's move when tuning is on."""
        disagreed = bool(disagreed)  # numpy booleans in benchmarks
        state = self._tier(tier)
        state.window.add(disagreed=disagreed)
        if self.observer is not None:
            self.observer.audit_rate(tier, state.window.interval(), state.window.counts.audits)
        if not cache.tune.enabled:
            return None
        current = self.cutoff(tier, cache)
        if cutoff_used is not None and cutoff_used != current:
            return None  # decided under an earlier cut-off: says nothing about this one
        state.since_move.add(disagreed=disagreed)
        move = next_cutoff(current, state.since_move.counts, TuneBounds.from_policy(cache))
        if move.value != current:
            counts = state.since_move.counts
            state.value = move.value
            state.since_move.clear()
            log.info(
                "cache cut-off tuned",
                tier=tier,
                old=current,
                new=move.value,
                reason=move.reason,
                audits=counts.audits,
                disagreements=counts.disagreements,
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
