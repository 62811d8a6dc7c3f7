"""Engines, their replicas, and the pure replica choice.

Replica choice prefers the replica that already holds the conversation's prefix in vLLM's prefix
cache. Rendezvous (highest-random-weight) hashing on the conversation prefix picks that replica
without any shared state: every proxy replica picks the same one, and removing a replica only moves
the conversations that were on it. The preference yields to load when the preferred replica is
clearly busier than the least-loaded one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proxy.engines.breaker import CircuitBreaker
from proxy.settings import EngineSettings

# The preferred replica keeps a conversation until it has this many more requests than the
# least-loaded one, or this share more: a warm prefix cache is worth some queueing, not much.
AFFINITY_SLACK_REQUESTS = 4
AFFINITY_SLACK_RATIO = 0.5


@dataclass(slots=True)
class ReplicaLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0


@dataclass(eq=False, slots=True)
class Replica:
    url: str
    breaker: CircuitBreaker
    healthy: bool | None = None  # None until the first health poll answers
    failed_polls: int = 0  # health polls failed in a row
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    inflight: int = 0  # requests this proxy has open on it right now

    @property
    def pressure(self) -> float:
        # Our own in-flight count is exact and immediate; the engine's own count (polled) also
        # sees other proxies' requests. Take whichever says busier.
        return max(float(self.inflight), self.load.running + self.load.waiting)


@dataclass(eq=False, slots=True)
class Engine:
    settings: EngineSettings
    replicas: list[Replica]
    version: str | None = None  # resolved at start-up when settings say "auto"
    # The model name these replicas serve, when it differs from the name clients ask for (a
    # canary, or a promoted canary, launched under another served-model name).
    upstream_model: str | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def wire_model(self) -> str:
        """The model name sent to the replicas."""
        return self.upstream_model or self.settings.model

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Engine:
        replicas = [
            Replica(
                url=url,
                breaker=CircuitBreaker(
                    failure_threshold=settings.breaker.failure_threshold,
                    open_s=settings.breaker.open_s,
                ),
            )
            for url in settings.urls
        ]
        version = None if settings.version == "auto" else settings.version
        return cls(settings=settings, replicas=replicas, version=version)

    @property
    def ready(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def load(self) -> ReplicaLoad:
        """Summed load of the healthy replicas (for routing by load)."""
        total = ReplicaLoad()
        for r in self.replicas:
            if r.healthy is not False:
                total.running += max(r.load.running, float(r.inflight))
                total.waiting += r.load.waiting
        return total


def _weight(key: bytes, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "big")


def choose_replica(
    replicas: Sequence[Replica],
    *,
    affinity: bytes | None,
    now: float,
    exclude: Iterable[Replica] = (),
) -> Replica | None:
    """The replica to send to, or None when none can take a request."""
    excluded = set(map(id, exclude))
    candidates = [
        r
        for r in replicas
        if id(r) not in excluded and r.healthy is not False and r.breaker.available(now)
    ]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    least = min(r.pressure for r in candidates)
    if affinity is not None:
        preferred = max(candidates, key=lambda r: _weight(affinity, r.url))
        slack = max(AFFINITY_SLACK_REQUESTS, AFFINITY_SLACK_RATIO * least)
        if preferred.pressure <= least + slack:
            return preferred
    # Least loaded; ties spread by hashing so equal replicas share the traffic.
    tiebreak = affinity or b""
    return min(candidates, key=lambda r: (r.pressure, _weight(tiebreak, r.url)))
