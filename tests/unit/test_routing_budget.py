"""The strong share that follows a tier's daily budget: the pure rule, the spend window, the
follower, and the share tracker aiming at the moved share."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.policy.schema import Routing
from proxy.routing.budget import DAY_S, BudgetFollower, SpendWindow, follow_budget
from proxy.routing.calibrate import ShareTracker
from proxy.shadow.stats import Interval

RULE = dict(max_share=0.3, min_share=0.05, step=0.05, headroom=0.8)


def test_share_drops_while_spend_would_overrun_the_budget() -> None:
    move = follow_budget(0.3, projected_usd=12.0, budget_usd=10.0, **RULE)
    assert (move.share, move.reason) == (pytest.approx(0.25), "spend_above_budget")
    held = follow_budget(0.05, projected_usd=12.0, budget_usd=10.0, **RULE)
    assert (held.share, held.reason) == (0.05, "at_min_share")


def test_share_comes_back_under_the_headroom_but_never_above_the_policy() -> None:
    assert follow_budget(0.1, projected_usd=5.0, budget_usd=10.0, **RULE).share == pytest.approx(
        0.15
    )
    assert follow_budget(0.3, projected_usd=5.0, budget_usd=10.0, **RULE).reason == "within_budget"
    # Between the headroom and the budget: hold.
    assert follow_budget(0.1, projected_usd=9.0, budget_usd=10.0, **RULE).share == 0.1


@given(
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=100),
    st.floats(min_value=0.01, max_value=100),
)
def test_share_stays_within_bounds(current: float, projected: float, budget: float) -> None:
    move = follow_budget(current, projected_usd=projected, budget_usd=budget, **RULE)
    assert RULE["min_share"] <= move.share <= RULE["max_share"]


def test_spend_window_rate_needs_a_whole_window_and_forgets_old_spend() -> None:
    window = SpendWindow(60.0)
    window.add(1.0, now=0.0)
    assert window.rate(30.0) is None
    window.add(2.0, now=50.0)
    assert window.rate(59.0) is None
    assert window.rate(60.5) == pytest.approx(2.0 / 60)  # the first dollar left the window
    assert window.rate(200.0) == 0.0


class Recorder:
    def __init__(self) -> None:
        self.moves: list[tuple[str, str, float, str]] = []
        self._last: tuple[str, str, float] | None = None

    def audit_rate(self, tier: str, interval: Interval, audits: int) -> None:
        pass

    def threshold(self, tier: str, kind: str, value: float) -> None:
        self._last = (tier, kind, value)

    def threshold_changed(self, tier: str, kind: str, reason: str) -> None:
        assert self._last is not None
        self.moves.append((*self._last, reason))


def following(**rule: object) -> Routing:
    return Routing(
        strong_share=0.3,
        follow_budget={"enabled": True, "min_share": 0.05, "step": 0.05, "window_s": 60, **rule},
    )


def test_follower_lowers_an_overspending_tier_and_reports_the_move() -> None:
    recorder = Recorder()
    follower = BudgetFollower(observer=recorder, every_s=10.0)
    routing = following()
    budget = 1.0  # USD a day: 1/86400 USD a second
    # Spend at twice the budget's pace for a minute.
    for second in range(61):
        follower.observe("free", 2 * budget / DAY_S, now=float(second))
    assert follower.share("free", routing, budget, now=61.0) == pytest.approx(0.25)
    assert recorder.moves == [("free", "strong_share", pytest.approx(0.25), "spend_above_budget")]
    # At most one move per every_s.
    assert follower.share("free", routing, budget, now=65.0) == pytest.approx(0.25)
    # Another tier, and the same tier without the rule, keep the policy's share.
    assert follower.share("pro", routing, budget, now=61.0) == 0.3
    assert follower.share("free", Routing(strong_share=0.3), budget, now=80.0) == 0.3
    assert follower.share("free", routing, None, now=80.0) == 0.3


def test_follow_budget_policy_checks() -> None:
    with pytest.raises(ValidationError, match="strong_share"):
        Routing(score_threshold=0.5, follow_budget={"enabled": True})
    with pytest.raises(ValidationError, match="min_share"):
        Routing(strong_share=0.1, follow_budget={"min_share": 0.2})


def test_share_tracker_aims_at_a_new_share() -> None:
    scores = np.linspace(0.0, 1.0, 1000, endpoint=False)
    tracker = ShareTracker(0.3, 0.5, window=1000, min_samples=100)
    for score in scores:
        tracker.observe(float(score))
    at_policy = tracker.threshold
    tracker.retarget(0.1)
    lowered = tracker.threshold
    assert lowered > at_policy
    assert np.mean(scores >= lowered) == pytest.approx(0.1, abs=0.002)
