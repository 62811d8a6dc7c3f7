"""The router: the stateful shell around the pure pieces (features, classifier, decision).

It holds what a decision needs to remember: each tier's share tracker (the threshold that keeps
its strong share), each conversation's engine (stickiness keeps vLLM's prefix cache warm), and a
running estimate of each engine's time to first token (to move requests off an engine whose
queue would break a tier's latency target).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from proxy.engines.pool import Engine
from proxy.routing.budget import BudgetFollower
from proxy.routing.calibrate import ShareTracker
from proxy.routing.classifier import DifficultyClassifier
from proxy.routing.decision import EngineLoad, RouteDecision, decide_route
from proxy.routing.features import extract_features
from proxy.routing.views import ShallowViews

# Until an engine has answered, assume this time to first token (ms): optimistic, so an idle
# fleet routes by difficulty alone.
_INITIAL_TTFT_MS = 200.0
_EWMA_ALPHA = 0.2
# How fast the idle floor follows answers slower than it (per observation): slow, so a burst of
# loaded answers does not lift it, yet an engine that really got slower is learnt in ~100 answers.
_FLOOR_DRIFT = 0.02
_STICKY_CONVERSATIONS = 100_000


@dataclass(slots=True)
class _MovingMs:
    """Moving average of a duration in ms: an engine's TTFT, or how long an answer holds a slot.

    ``floor`` follows the quickest recent answers (down at once, up slowly): what the engine
    does with nothing else to do. Answers timed under load lift the average for a while after the
    load is gone; an idle engine is estimated by its floor instead.
    """

    ms: float = _INITIAL_TTFT_MS
    floor: float = _INITIAL_TTFT_MS
    seen: bool = False

    def observe(self, ms: float) -> None:
        if not self.seen:
            self.ms = self.floor = ms
            self.seen = True
            return
        self.ms = (1 - _EWMA_ALPHA) * self.ms + _EWMA_ALPHA * ms
        self.floor = ms if ms < self.floor else self.floor + _FLOOR_DRIFT * (ms - self.floor)


@dataclass(eq=False)
class Router:
    engines: Sequence[Engine]
    classifier: DifficultyClassifier | None
    count_tokens: Callable[[str], int]
    default_threshold: float = 0.5
    sticky_margin: float = 0.1
    budget: BudgetFollower = field(default_factory=BudgetFollower)
    # The encoder's shallow views by embedding (filled by the encode function; see views.py).
    views: ShallowViews = field(default_factory=ShallowViews)
    _trackers: dict[tuple[str, float], ShareTracker] = field(default_factory=dict)
    _sticky: OrderedDict[bytes, tuple[str, float | None]] = field(default_factory=OrderedDict)
    _ttft: dict[str, _MovingMs] = field(default_factory=dict)
    _service: dict[str, _MovingMs] = field(default_factory=dict)
    weak_to_strong: list[Engine] = field(init=False)

    def __post_init__(self) -> None:
        # What `auto` may choose from, weak to strong: by price, then by the config's order.
        # Fixed for the app's lifetime, so ordered once here rather than per request.
        ranked = sorted(
            enumerate(self.engines),
            key=lambda ie: (
                ie[1].settings.cost.output_per_mtok,
                ie[1].settings.cost.input_per_mtok,
                ie[0],
            ),
        )
        self.weak_to_strong = [engine for _, engine in ranked]

    # -- scoring ----------------------------------------------------------------------------

    @property
    def scores(self) -> bool:
        return self.classifier is not None

    def score(self, messages: Sequence[Mapping[str, object]], embedding: np.ndarray) -> float:
        assert self.classifier is not None
        shallow = self.views.get(embedding)
        return self.classifier.score(
            extract_features(messages, embedding, self.count_tokens, shallow)
        )

    def threshold(
        self, tier: str, *, share: float | None, fixed: float | None, target: float | None = None
    ) -> float:
        """``share`` is the policy's strong share (it names the tracker); ``target`` the share
        aimed for now when the budget follower lowered it."""
        if fixed is not None:
            return fixed
        if share is None:
            return self.default_threshold
        tracker = self._trackers.get((tier, share))
        if tracker is None:
            tracker = ShareTracker(share, self._initial_threshold(share))
            self._trackers[(tier, share)] = tracker
        tracker.retarget(share if target is None else target)
        return tracker.threshold

    def observe_score(self, tier: str, share: float | None, score: float) -> None:
        if share is not None:
            tracker = self._trackers.get((tier, share))
            if tracker is not None:
                tracker.observe(score)

    def _initial_threshold(self, share: float) -> float:
        table = self.classifier.default_thresholds if self.classifier is not None else {}
        if not table:
            return self.default_threshold
        nearest = min(table, key=lambda s: abs(s - share))
        return table[nearest]

    # -- load -------------------------------------------------------------------------------

    def observe_ttft(self, engine: str, seconds: float) -> None:
        self._ttft.setdefault(engine, _MovingMs()).observe(seconds * 1000)

    def observe_service(self, engine: str, seconds: float) -> None:
        """How long an answer held one of the engine's slots (first byte sent to last received)."""
        self._service.setdefault(engine, _MovingMs()).observe(seconds * 1000)

    def load(
        self, engine: Engine, queued: int, admitted: int, queue_delay_s: float = 0.0
    ) -> EngineLoad:
        """The engine's expected time to first token if a request joined it now.

        ``queue_delay_s``: the wait the proxy's admission queue in front of the engine has
        observed (its sojourn time), when it has one.
        """
        replica_load = engine.load()
        running = max(admitted, int(replica_load.running))
        waiting = queued + int(replica_load.waiting)
        ttft = self._ttft.get(engine.name)
        if ttft is None:
            base = _INITIAL_TTFT_MS
        elif running == 0 and waiting == 0:
            base = min(ttft.floor, ttft.ms)  # idle: the TTFTs learnt under load no longer apply
        else:
            base = ttft.ms
        # A queued request waits for running ones to finish and make room: one answer's service
        # time per batch-worth of queue ahead of it (long answers make long queues), then its own
        # first token. Until an answer has been timed, a TTFT stands in for the service time;
        # while long answers are still running, none has been timed yet, so the wait the queue
        # has actually shown counts too.
        timed = self._service.get(engine.name)
        service = max(base, timed.ms) if timed is not None else base
        wait = max(service * waiting / max(1, running), queue_delay_s * 1000) if waiting else 0.0
        est = base + wait
        return EngineLoad(queue_length=waiting, running=running, est_ttft_ms=est)

    # -- conversations ----------------------------------------------------------------------

    def sticky(self, conversation: bytes | None) -> tuple[str, float | None] | None:
        if conversation is None:
            return None
        return self._sticky.get(_conversation_key(conversation))

    def remember(self, conversation: bytes | None, engine: str, score: float | None) -> None:
        if conversation is None:
            return
        key = _conversation_key(conversation)
        self._sticky[key] = (engine, score)
        self._sticky.move_to_end(key)
        while len(self._sticky) > _STICKY_CONVERSATIONS:
            self._sticky.popitem(last=False)

    # -- the decision -----------------------------------------------------------------------

    def decide(
        self,
        *,
        requested: str,
        allowed: Sequence[Engine],
        score: float | None,
        threshold: float,
        conversation: bytes | None,
        loads: Mapping[str, EngineLoad] | None,
        ttft_target_ms: float | None,
        unavailable: Container[str] = frozenset(),
    ) -> RouteDecision:
        sticky = self.sticky(conversation)
        return decide_route(
            requested_model=requested,
            allowed_engines=[e.name for e in allowed],
            score=score,
            threshold=threshold,
            sticky_engine=sticky[0] if sticky else None,
            sticky_score=sticky[1] if sticky else None,
            loads=loads,
            ttft_target_ms=ttft_target_ms,
            sticky_margin=self.sticky_margin,
            unavailable=unavailable,
        )


def _conversation_key(conversation: bytes) -> bytes:
    return hashlib.blake2b(conversation, digest_size=16).digest()
