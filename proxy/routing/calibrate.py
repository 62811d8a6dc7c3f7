"""Thresholds that send a chosen share of requests to the strong engine.

`threshold_for_share` is the offline form (a batch of scores); `ShareTracker` is the online form:
a sliding window over the latest scores of one tier, so the threshold follows the traffic mix.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import numpy.typing as npt


def threshold_for_share(scores: npt.ArrayLike, share: float) -> float:
    """A threshold t: the share of `scores` >= t is at most `share`, as close as ties allow.

    Without ties exactly floor(share * n) scores reach t. The threshold sits halfway between the
    last score sent strong and the first one kept weak, so unseen scores near the cut split evenly.
    share 0 gives a threshold above every score; share 1 gives the lowest score.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    values = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))[::-1]
    if values.size == 0:
        raise ValueError("no scores to calibrate on")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite")
    strong_count = int(np.floor(share * values.size + 1e-9))
    if strong_count == values.size:
        return float(values[-1])
    first_weak = float(values[strong_count])
    above = float(np.nextafter(first_weak, np.inf))
    if strong_count == 0:
        return above
    last_strong = float(values[strong_count - 1])
    if last_strong == first_weak:
        # A tie straddles the cut: send the whole tie group weak to stay within the share.
        return above
    return max((last_strong + first_weak) / 2.0, above)


class ShareTracker:
    """The threshold that keeps a tier's strong share, over a sliding window of recent scores.

    Memory is bounded by `window`. Until `min_samples` scores arrived the initial threshold is used
    (e.g. the offline one shipped with the classifier). The threshold is recomputed lazily, at most
    once every `recompute_every` observations, so a hot path can read it per request.
    """

    def __init__(
        self,
        strong_share: float,
        initial_threshold: float,
        *,
        window: int = 2000,
        min_samples: int = 200,
        recompute_every: int = 50,
    ) -> None:
        if not 0.0 <= strong_share <= 1.0:
            raise ValueError(f"strong_share must be in [0, 1], got {strong_share}")
        if window < 1 or min_samples < 1 or recompute_every < 1:
            raise ValueError("window, min_samples and recompute_every must be positive")
        self.strong_share = strong_share
        self._scores: deque[float] = deque(maxlen=window)
        self._min_samples = min(min_samples, window)
        self._recompute_every = recompute_every
        self._threshold = initial_threshold
        self._since_recompute = 0
        self._calibrated = False

    def retarget(self, strong_share: float) -> None:
        """Aim for another share (the budget follower moved it); recomputed at the next read."""
        if strong_share != self.strong_share:
            self.strong_share = strong_share
            self._calibrated = False

    def observe(self, score: float) -> None:
        self._scores.append(float(score))
        self._since_recompute += 1

    @property
    def samples(self) -> int:
        return len(self._scores)

    @property
    def threshold(self) -> float:
        # Scores are probabilities: the ends of the range hold for every score, not only for
        # those in the window (or the classifier's table, before the window fills).
        if self.strong_share <= 0.0:
            return math.inf
        if self.strong_share >= 1.0:
            return 0.0
        if len(self._scores) >= self._min_samples and (
            not self._calibrated or self._since_recompute >= self._recompute_every
        ):
            self._threshold = threshold_for_share(
                np.fromiter(self._scores, float), self.strong_share
            )
            self._since_recompute = 0
            self._calibrated = True
        return self._threshold
