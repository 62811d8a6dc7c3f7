"""threshold_for_share and ShareTracker."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routing.calibrate import ShareTracker, threshold_for_share

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def test_share_of_a_known_list() -> None:
    scores = [0.1, 0.9, 0.3, 0.7, 0.5]
    t = threshold_for_share(scores, 0.4)
    assert sum(s >= t for s in scores) == 2
    assert 0.5 < t <= 0.7


def test_share_zero_sends_nothing_strong_and_one_sends_everything() -> None:
    scores = [0.2, 0.4, 1.0]
    assert sum(s >= threshold_for_share(scores, 0.0) for s in scores) == 0
    assert sum(s >= threshold_for_share(scores, 1.0) for s in scores) == 3


def test_a_tie_across_the_cut_stays_weak() -> None:
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    t = threshold_for_share(scores, 0.4)
    assert sum(s >= t for s in scores) == 1


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_share_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="share"):
        threshold_for_share([0.5], bad)


def test_empty_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="no scores"):
        threshold_for_share([], 0.3)


@given(st.lists(unit, min_size=1, max_size=200, unique=True), unit)
def test_distinct_scores_hit_the_share_exactly(scores: list[float], share: float) -> None:
    t = threshold_for_share(scores, share)
    assert sum(s >= t for s in scores) == int(np.floor(share * len(scores) + 1e-9))


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=100), unit)
def test_tied_scores_never_exceed_the_share(scores: list[float], share: float) -> None:
    t = threshold_for_share(scores, share)
    assert sum(s >= t for s in scores) <= share * len(scores) + 1e-9


@given(st.lists(unit, min_size=1, max_size=100), unit, unit)
def test_a_larger_share_never_raises_the_threshold(scores: list[float], a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert threshold_for_share(scores, high) <= threshold_for_share(scores, low)


def test_tracker_uses_the_initial_threshold_until_enough_samples() -> None:
    tracker = ShareTracker(0.3, initial_threshold=0.42, window=100, min_samples=10)
    for score in np.linspace(0, 1, 9):
        tracker.observe(float(score))
    assert tracker.threshold == 0.42


def test_tracker_follows_a_shift_in_traffic_and_keeps_bounded_memory() -> None:
    rng = np.random.default_rng(0)
    tracker = ShareTracker(
        0.3, initial_threshold=0.5, window=500, min_samples=100, recompute_every=10
    )
    for score in rng.uniform(0.0, 0.5, 1000):
        tracker.observe(float(score))
    easy_threshold = tracker.threshold
    for score in rng.uniform(0.5, 1.0, 1000):
        tracker.observe(float(score))
    hard_threshold = tracker.threshold
    assert tracker.samples == 500
    assert 0.3 < easy_threshold < 0.4  # 70th percentile of U(0, 0.5)
    assert 0.8 < hard_threshold < 0.9  # 70th percentile of U(0.5, 1)


def test_tracker_recomputes_only_every_n_observations() -> None:
    tracker = ShareTracker(0.5, initial_threshold=0.0, window=100, min_samples=4, recompute_every=3)
    for score in (0.1, 0.2, 0.3, 0.4):
        tracker.observe(score)
    first = tracker.threshold
    tracker.observe(0.9)
    assert tracker.threshold == first  # one observation since the last recompute
    tracker.observe(0.95)
    tracker.observe(0.99)
    assert tracker.threshold > first


def test_a_share_of_zero_or_one_holds_for_every_score_from_the_first_request() -> None:
    # The window only knows the scores seen so far, and the initial threshold is the classifier's
    # nearest tabled one: neither may send a score strong at share 0, or keep one weak at share 1.
    for observed in (0, 300):
        none = ShareTracker(0.0, initial_threshold=0.24, min_samples=200)
        every = ShareTracker(1.0, initial_threshold=0.17, min_samples=200)
        for score in np.linspace(0.2, 0.5, observed):
            none.observe(float(score))
            every.observe(float(score))
        assert none.threshold > 1.0  # not even a score of 1 goes strong
        assert every.threshold <= 0.0  # every score, 0 included, goes strong
    # The budget follower may lower a share to 0: nothing goes strong from then on.
    lowered = ShareTracker(0.1, initial_threshold=0.3)
    lowered.retarget(0.0)
    assert lowered.threshold > 1.0
