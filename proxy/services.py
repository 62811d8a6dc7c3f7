"""Everything the request path uses, built once per application by ``create_app``.

Parts with a lifetime (the cache, the embedding worker) are attached by their ``cleanup_ctx``
when the application starts, and are None until then (or when disabled).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Protocol

from proxy.cache.service import ResponseCache
from proxy.cache.singleflight import SingleFlight
from proxy.cache.verifier import CacheVerifier
from proxy.embeddings.worker import EmbeddingWorker, Encode
from proxy.engines.client import EngineCaller
from proxy.engines.pool import Engine
from proxy.observability.access import AccessLog
from proxy.observability.metrics import Metrics
from proxy.policy.admission import EngineAdmission
from proxy.policy.limits import Limiter
from proxy.policy.policyset import PolicySet
from proxy.rollout.manager import Rollouts
from proxy.routing.router import Router
from proxy.settings import Settings
from proxy.shadow.audit import CacheAuditor
from proxy.shadow.tuner import CacheTuner
from proxy.stopping import StreamCutter

MAX_REQUEST_ID = 128


class RequestIds:
    """Unique request ids without uuid4's cost on every request: a random per-process prefix
    and a counter (unique across replicas and restarts, ordered within a process)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):010x}"

    def accept(self, value: str | None) -> str:
        """The client's ``x-request-id`` if it is short printable ASCII, else a new id. Any other
        value (a non-UTF-8 header arrives with surrogates) would break the engine call's headers,
        the response's and the access line's JSON."""
        if value and len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable():
            return value
        return self.next()


class PolicySource(Protocol):
    @property
    def current(self) -> PolicySet: ...

    def reload(self) -> list[str]: ...


@dataclass(eq=False)
class Services:
    settings: Settings
    engines: list[Engine]
    metrics: Metrics
    caller: EngineCaller
    router: Router
    policies: PolicySource
    limiter: Limiter
    admissions: dict[str, EngineAdmission]
    rollouts: Rollouts  # canary replica sets, their split, state and figures
    cache: ResponseCache | None = None
    embedder: EmbeddingWorker | None = None
    encode: Encode | None = None  # the raw embedding function, for batch jobs (cache import)
    verifier: CacheVerifier | None = None  # the semantic cache's trained verifier, when loaded
    tuner: CacheTuner | None = None  # each tier's verifier cut-off (fixed or self-tuned)
    auditor: CacheAuditor | None = None  # background audits of semantic hits
    flights: SingleFlight[bytes, bytes] = field(default_factory=SingleFlight)
    request_ids: RequestIds = field(default_factory=RequestIds)
    streams: StreamCutter = field(default_factory=StreamCutter)  # ended cleanly at a stop
    # set for the stop's drain (server.drain_delay_s): /readyz answers 503, requests are served
    draining: bool = False
    access_log: AccessLog | None = None
    by_name: dict[str, Engine] = field(init=False)
    by_model: dict[str, Engine] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {e.name: e for e in self.engines}
        self.by_model = {e.model: e for e in self.engines}
