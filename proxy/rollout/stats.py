"""Per-version figures over a sliding window: what the judge and ``frugal rollout status`` read.

Every finished request is recorded under the (engine, version) that answered it. Cache hits
count toward the version's traffic but not its latency or errors: they say nothing about how the
version's replicas behave. A request of the version's share that the other version answered,
every replica of this one being down (a fallback), is also recorded here: the judge counts it as
this version's error (the 503 it would have been); the figures count it apart, since the client
got its answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.observability.snapshot import quantile
from proxy.rollout.judge import Window

MAX_SAMPLES = 20_000  # per version; bounds memory whatever the traffic


@dataclass(slots=True)
class _Sample:
    at: float
    from_cache: bool
    error: bool
    latency_s: float
    tokens_out: int
    cost_usd: float
    fallback: bool = False  # answered by the other version (``error`` is set too)


class VersionWindow:
    """Recent requests answered by one version (bounded by time and by count)."""

    __slots__ = ("_samples", "agree", "compared", "started", "window_s")

    def __init__(self, window_s: float, *, started: float | None = None) -> None:
        self.window_s = window_s
        # Since when requests are watched (the proxy's start): the rate is over that time, not
        # over the time since the first request (one request just in read as a huge rate).
        self.started = started
        self._samples: deque[_Sample] = deque(maxlen=MAX_SAMPLES)
        self.compared = 0  # shadow comparisons involving this version (since start)
        self.agree = 0

    def record(
        self,
        *,
        at: float,
        from_cache: bool,
        error: bool,
        latency_s: float,
        tokens_out: int,
        cost_usd: float,
    ) -> None:
        self._samples.append(_Sample(at, from_cache, error, latency_s, tokens_out, cost_usd))

    def record_fallback(self, *, at: float) -> None:
        self._samples.append(_Sample(at, False, True, 0.0, 0, 0.0, fallback=True))

    def _recent(self, now: float, window_s: float | None = None) -> list[_Sample]:
        while self._samples and self._samples[0].at < now - self.window_s:
            self._samples.popleft()  # outside the longest window anyone reads
        cutoff = now - (window_s if window_s is not None else self.window_s)
        return [s for s in self._samples if s.at >= cutoff]

    def judged(self, now: float, window_s: float) -> Window:
        """The engine answers (not cache hits) of the window, for the judge."""
        answers = [s for s in self._recent(now, window_s) if not s.from_cache]
        latencies = sorted(s.latency_s for s in answers if not s.error)
        return Window(
            requests=len(answers), errors=sum(s.error for s in answers), latencies=latencies
        )

    def figures(self, now: float) -> dict[str, Any]:
        recent = self._recent(now)
        fallbacks = sum(s.fallback for s in recent)
        if fallbacks:  # (the other version's figures count them)
            recent = [s for s in recent if not s.fallback]
        answers = [s for s in recent if not s.from_cache]
        ok = [s for s in answers if not s.error]
        latencies = sorted(s.latency_s for s in ok)
        first = recent[0].at if recent else now
        since = first if self.started is None else min(self.started, first)
        span = min(self.window_s, max(1e-9, now - since))
        return {
            "window_s": self.window_s,
            "requests": len(recent),
            "request_rate_per_s": len(recent) / span if recent else 0.0,
            "cache_hits": len(recent) - len(answers),
            "engine_answers": len(answers),
            "errors": len(answers) - len(ok),
            "fallbacks": fallbacks,
            "error_rate": (len(answers) - len(ok)) / len(answers) if answers else None,
            "latency_ms": {
                name: (None if v is None else round(v * 1000, 2))
                for name, v in (
                    ("p50", quantile(latencies, 0.50)),
                    ("p95", quantile(latencies, 0.95)),
                    ("p99", quantile(latencies, 0.99)),
                )
            },
            "tokens_per_answer": (sum(s.tokens_out for s in ok) / len(ok)) if ok else None,
            "cost_usd": sum(s.cost_usd for s in recent),
            "shadow_compared": self.compared,
            "shadow_agreement": (self.agree / self.compared) if self.compared else None,
        }
