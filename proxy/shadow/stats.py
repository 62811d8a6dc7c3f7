"""Audit statistics: how often audited cache hits disagreed with a fresh answer, with a
confidence interval honest about how few audits there are.

    window = AuditWindow(size=500)
    window.add(disagreed=False)
    interval = window.interval()          # Wilson score interval, 95 %: .rate, .low, .high

Why Wilson: see proxy/stats.py.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from proxy.stats import Z_95, Interval, wilson_interval

# Re-exported: the audit code reads its statistics from here.
__all__ = ["Z_95", "AuditCounts", "AuditWindow", "Interval", "wilson_interval"]


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
