"""A pause after a failure: a shared backend (Redis) that failed is not asked again for a while,
so a hung server costs one timeout, not one per request. Pure apart from the clock it is given."""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    __slots__ = ("_clock", "retry_after", "until")

    def __init__(self, retry_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after = retry_after
        self._clock = clock
        self.until = 0.0  # no attempt before this clock reading

    def waiting(self) -> bool:
        """Whether the pause after the last failure still runs."""
        return self._clock() < self.until

    def failed(self) -> None:
        self.until = self._clock() + self.retry_after
