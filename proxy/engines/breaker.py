"""Per-replica circuit breaker: a pure state machine; the caller passes the clock in.

closed --(N consecutive failures)--> open --(open_s elapsed)--> half_open
half_open lets exactly one probe through: success closes (for a stream, its first token), failure
opens again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class CircuitBreaker:
    failure_threshold: int = 3
    open_s: float = 5.0
    state: State = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False

    def available(self, now: float) -> bool:
        """Whether a request may be sent now (does not claim the half-open probe)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return now - self.opened_at >= self.open_s
        return not self.probe_in_flight

    def reopens_in(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.open_s - (now - self.opened_at))

    def acquire(self, now: float) -> bool:
        """Claim the right to send one request; in half-open only one probe at a time."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if now - self.opened_at < self.open_s:
                return False
            self.state = "half_open"
            self.probe_in_flight = False
        if self.probe_in_flight:
            return False
        self.probe_in_flight = True
        return True

    def on_success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.probe_in_flight = False

    def on_answering(self) -> None:
        """The replica has begun to answer (a stream's first token arrived): a half-open probe has
        shown what it was for, and the others need not wait for the whole answer (minutes of
        generation) behind it."""
        if self.state == "half_open":
            self.on_success()

    def on_failure(self, now: float) -> None:
        self.probe_in_flight = False
        if self.state == "half_open":
            self._open(now)
            return
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self._open(now)

    def release(self, *, probe: bool) -> None:
        """A claimed request ended without telling anything about the replica (client left).
        Only the probe's own request frees the half-open slot: an older request, sent while the
        breaker was closed, ending now must not let a second probe through beside the first."""
        if probe:
            self.probe_in_flight = False

    def _open(self, now: float) -> None:
        self.state = "open"
        self.opened_at = now
        self.failures = 0
