"""Engines, their replicas, and the pure replica choice.

Replica choice prefers the replica that already holds the conversation's prefix in vLLM's prefix
cache. Rendezvous (highest-random-weight) hashing on the conversation prefix picks that replica
without any shared state: every proxy replica picks the same one, and removing a replica only moves
the conversations that were on it. The preference yields to load when the preferred replica is
clearly busier than the least-loaded one.
"""

from __future__ import annotations

import hashlib
import math
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
    # when it last began an answer (a stream's first token, or a whole answer): -inf before any
    answered_at: float = float("-inf")
    # version: auto: the version it last reported (None: not asked yet, or back from down and
    # not asked again), when it was last asked (monotonic), and the other version it was last
    # reported held out for (so that is logged once).
    version: str | None = None
    version_at: float | None = None
    held_out_for: str | None = None

    @property
    def pressure(self) -> float:
        # Our own in-flight count is exact and immediate; the engine's own count (polled) also
        # sees other proxies' requests. Take whichever says busier.
        return max(float(self.inflight), self.load.running + self.load.waiting)


@dataclass(eq=False, slots=True)
class Engine:
    settings: EngineSettings
    replicas: list[Replica]
    version: str | None = None  # with settings' "auto": what the replicas report, kept current
    # The model name these replicas serve, when it differs from the name clients ask for (a
    # canary, or a promoted canary, launched under another served-model name).
    upstream_model: str | None = None
    # settings.name, as a plain attribute: read many times on every request
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.name = self.settings.name

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
    def auto(self) -> bool:
        """The version is discovered from the replicas (and followed across redeploys)."""
        return self.settings.version == "auto"

    @property
    def required_version(self) -> str | None:
        """The version a replica must have reported to take this engine's requests; None: any
        (a fixed version, or one not known yet, when nothing is cached or served from cache)."""
        return self.version if self.auto else None

    def in_rotation(self, replica: Replica) -> bool:
        """Whether ``replica`` serves this engine's version (healthy or not)."""
        required = self.required_version
        return required is None or replica.version == required

    @property
    def ready(self) -> bool:
        return any(r.healthy and self.in_rotation(r) for r in self.replicas)

    def ready_at(self, now: float) -> bool:
        """What /readyz says: :attr:`ready`, with a replica whose breaker is open (every request
        to it refused until its probe is due) counted out, as :func:`choose_replica` counts it."""
        return any(
            r.healthy and self.in_rotation(r) and r.breaker.reopens_in(now) == 0
            for r in self.replicas
        )

    def can_take(self, now: float) -> bool:
        """Whether a request sent now would find a replica (what :func:`choose_replica` needs:
        not down at its last health check, its version, its breaker letting requests through)."""
        version = self.required_version
        return any(_may_take(r, now, version) for r in self.replicas)

    def load(self) -> ReplicaLoad:
        """Summed load of the healthy replicas (for routing by load)."""
        total = ReplicaLoad()
        for r in self.replicas:
            if r.healthy is not False and self.in_rotation(r):
                total.running += max(r.load.running, float(r.inflight))
                total.waiting += r.load.waiting
        return total


def _weight(key: bytes, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "big")


def retry_after_s(replicas: Sequence[Replica], now: float) -> int:
    """Whole seconds a client should wait before asking again when no replica could take its
    request (the ``Retry-After`` of a 503): the soonest an open breaker lets a probe through;
    one second when none is open (a replica down at its last health check, or busy with a
    probe). Rounded up, so a client never comes back before a replica can answer."""
    waits = [r.breaker.reopens_in(now) for r in replicas if r.breaker.state == "open"]
    return max(1, math.ceil(min(waits, default=1.0)))


def _may_take(replica: Replica, now: float, version: str | None) -> bool:
    return (
        replica.healthy is not False
        and (version is None or replica.version == version)
        and replica.breaker.available(now)
    )


def choose_replica(
    replicas: Sequence[Replica],
    *,
    affinity: bytes | None,
    now: float,
    exclude: Iterable[Replica] = (),
    version: str | None = None,
) -> Replica | None:
    """The replica to send to, or None when none can take a request. ``version``: only replicas
    that last reported it (an engine's answers are cached under its version)."""
    excluded = set(map(id, exclude))
    candidates = [r for r in replicas if id(r) not in excluded and _may_take(r, now, version)]
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
