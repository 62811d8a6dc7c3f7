"""Small pure statistics shared by the cache audits and the canary judge.

The Wilson score interval (not the normal approximation) because the rates of interest are small
(a few percent of audits disagreeing, of canary answers failing) and the counts modest: the normal
interval collapses to [0, 0] at zero events; Wilson's stays inside [0, 1] and is sensible at any
count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054  # two-sided 95 %


@dataclass(frozen=True, slots=True)
class Interval:
    rate: float  # observed share (0 with no trials)
    low: float
    high: float


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> Interval:
    """Wilson score interval of a binomial proportion; [0, 1] when there are no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return Interval(0.0, 0.0, 1.0)
    p = successes / trials
    z2 = z * z
    denominator = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    # The closed form is exact at the ends; clamp only the rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(p, low, high)
