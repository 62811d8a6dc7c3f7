"""A tier's strong share that follows its daily budget.

The share tracker (``calibrate.py``) keeps a tier at its policy's ``strong_share``; this lowers the
share it aims for while the tier's recent spend rate, projected over a day, would exceed the
tier's ``budget.usd_per_day``, and raises it back (never above the policy's) when the projection
is comfortably under. The budget counters still refuse requests once the day's budget is spent;
this makes that less likely by sending fewer requests to the expensive engine first.

    follower = BudgetFollower()
    follower.observe(tier, usd=0.0004, now=t)                  # every finished request
    share = follower.share(tier, routing, budget_usd, now=t)   # per routed request

The spend measured is this proxy's own: in a fleet of N proxies behind a balancer each sees about
1/N of the tier's traffic, so ``BudgetFollower(replicas=N)`` scales the projection up by N.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import structlog

from proxy.policy.schema import Routing
from proxy.shadow.tuner import TunerObserver

log = structlog.get_logger("frugal.routing")

DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class ShareMove:
    share: float
    reason: str


def follow_budget(
    current: float,
    *,
    projected_usd: float,
    budget_usd: float,
    max_share: float,
    min_share: float,
    step: float,
    headroom: float,
) -> ShareMove:
    """The strong share after comparing the day's projected spend with the budget (pure)."""
    if current > max_share:
        return ShareMove(max_share, "above_policy_share")
    if current < min_share:
        return ShareMove(min_share, "below_min_share")
    if projected_usd > budget_usd:
        if current <= min_share:
            return ShareMove(current, "at_min_share")
        return ShareMove(max(min_share, round(current - step, 6)), "spend_above_budget")
    if projected_usd < budget_usd * headroom and current < max_share:
        return ShareMove(min(max_share, round(current + step, 6)), "spend_under_budget")
    return ShareMove(current, "within_budget")


class SpendWindow:
    """Spend over the last ``window_s`` seconds (bounded: one entry per second at most)."""

    __slots__ = ("_entries", "_first", "_total", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._entries: deque[tuple[float, float]] = deque()
        self._total = 0.0
        self._first: float | None = None

    def add(self, usd: float, now: float) -> None:
        if self._first is None:
            self._first = now
        second = float(int(now))
        if self._entries and self._entries[-1][0] == second:
            at, amount = self._entries.pop()
            self._entries.append((at, amount + usd))
        else:
            self._entries.append((second, usd))
        self._total += usd
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.window_s:
            self._total -= self._entries.popleft()[1]

    @property
    def started(self) -> bool:
        return self._first is not None

    def rate(self, now: float) -> float | None:
        """USD per second over the window; None until a whole window has been watched."""
        self._expire(now)
        if self._first is None or now - self._first < self.window_s:
            return None
        return max(0.0, self._total) / self.window_s


@dataclass(slots=True)
class _Tier:
    spend: SpendWindow
    share: float | None = None
    evaluated_at: float = float("-inf")


@dataclass(eq=False)
class BudgetFollower:
    observer: TunerObserver | None = None
    replicas: int = 1
    every_s: float = 10.0  # at most one move per tier this often
    _tiers: dict[str, _Tier] = field(default_factory=dict)

    def observe(self, tier: str, usd: float, now: float, window_s: float = 600.0) -> None:
        state = self._tiers.get(tier)
        if state is None:
            state = self._tiers[tier] = _Tier(SpendWindow(window_s))
        if usd > 0 or not state.spend.started:
            state.spend.add(usd, now)

    def share(
        self, tier: str, routing: Routing, budget_usd: float | None, now: float
    ) -> float | None:
        """The strong share this tier's routing aims for now."""
        policy_share = routing.strong_share
        rule = routing.follow_budget
        if policy_share is None or budget_usd is None or not rule.enabled:
            return policy_share
        state = self._tiers.get(tier)
        if state is None:
            state = self._tiers[tier] = _Tier(SpendWindow(rule.window_s))
        state.spend.window_s = rule.window_s
        if state.share is None:
            state.share = policy_share
        if now - state.evaluated_at < self.every_s:
            return state.share
        state.evaluated_at = now
        rate = state.spend.rate(now)
        if rate is None:
            return state.share
        projected = rate * DAY_S * self.replicas
        move = follow_budget(
            state.share,
            projected_usd=projected,
            budget_usd=budget_usd,
            max_share=policy_share,
            min_share=rule.min_share,
            step=rule.step,
            headroom=rule.headroom,
        )
        if move.share != state.share:
            log.info(
                "strong share moved",
                tier=tier,
                old=state.share,
                new=move.share,
                reason=move.reason,
                projected_usd_per_day=round(projected, 4),
                budget_usd_per_day=budget_usd,
            )
            state.share = move.share
            if self.observer is not None:
                self.observer.threshold(tier, "strong_share", move.share)
                self.observer.threshold_changed(tier, "strong_share", move.reason)
        return state.share
