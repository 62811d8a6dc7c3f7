"""Audit statistics: how often audited cache hits disagreed with a fresh answer, with a
confidence interval honest about how few audits there are.

    window = AuditWindow(size=500)
    window.add(disagreed=False)
    low, high = window.interval()          # Wilson score interval, 95 %

The Wilson interval (not the normal approximation) because the rates of interest are small (a few
percent) and the counts modest: the normal interval collapses to [0, 0] at zero disagreements and
leaves [0, 1] at either end; Wilson's stays inside [0, 1] and is sensible at any count.
"""

from __future__ import annotations

import math
from collections import deque
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


@dataclass(frozen=True, slots=True)
class AuditCounts:
    """Audits and how many of them disagreed (a false hit, as far as the audit can tell)."""

    audits: int = 0
    disagreements: int = 0

    def interval(self, z: float = Z_95) -> Interval:
        return wilson_interval(self.disagreements, self.audits, z)


class AuditWindow:
    """The latest ``size`` audit outcomes: a sliding estimate that follows the current threshold
    and traffic instead of averaging over everything since start-up."""

    __slots__ = ("_disagreements", "_outcomes")

    def __init__(self, size: int = 500) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self._outcomes: deque[bool] = deque(maxlen=size)
        self._disagreements = 0

    def add(self, *, disagreed: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen and self._outcomes[0]:
            self._disagreements -= 1
        self._outcomes.append(disagreed)
        self._disagreements += disagreed

    def clear(self) -> None:
        self._outcomes.clear()
        self._disagreements = 0

    @property
    def counts(self) -> AuditCounts:
        return AuditCounts(len(self._outcomes), self._disagreements)

    def interval(self, z: float = Z_95) -> Interval:
        return self.counts.interval(z)
