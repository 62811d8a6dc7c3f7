"""The routing decision: which engine serves a request. Pure: everything it needs is passed in.

Rules, in order:

1. A concrete model name selects that engine (reason ``explicit_model``); only ``auto`` is routed.
2. A tier that allows one engine gets that engine (reason ``tier_limit``).
3. Difficulty: score >= threshold picks the strongest allowed engine, else the weakest
   (reason ``difficulty``). A missing score (no embedding) counts as easy: the cheap engine.
4. Stickiness: a conversation stays on the engine that served its earlier turns (reason
   ``sticky``) so that the engine's prefix cache keeps working and answers keep one voice. It
   never moves down, and moves up only when the new turn is clearly harder: its score reaches
   threshold + margin (just threshold when the earlier turn already scored hard, i.e. it was kept
   down by load or by a different tier, not by its difficulty).
5. Availability: when the chosen engine has no replica that can take a request (down at its last
   health check, or its breakers open) and another allowed engine has one, the request goes
   where the same rules choose among the engines that can answer (reason ``failover``): a
   slower or dearer answer beats a 503.
6. Load: if the chosen engine's estimated TTFT breaks the tier's latency target and another allowed
   engine meets it, the request moves to the nearest such engine in strength, preferring the
   stronger of two equally near ones (reason ``load``). When none meets it, the request moves to
   the fastest other engine if that one is expected at least twice as fast: late, but much less
   late (a busy box slows every engine; the target still says which way to err).

Example::

    decide_route(requested_model="auto", allowed_engines=("small", "large"), score=0.71,
                 threshold=0.42)
    # RouteDecision(engine='large', score=0.71, reason='difficulty', detail='score 0.710 >= ...')
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

AUTO_MODEL = "auto"
DEFAULT_STICKY_MARGIN = 0.1

RouteReason = Literal["explicit_model", "difficulty", "tier_limit", "load", "sticky", "failover"]


class EngineNotAllowedError(ValueError):
    """The request names an engine its tier does not allow (or the tier allows none)."""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A load snapshot of one engine, as the health poller last saw it."""

    queue_length: int
    running: int
    est_ttft_ms: float


@dataclass(frozen=True, slots=True)
class RouteDecision:
    engine: str
    score: float | None
    reason: RouteReason
    detail: str


def decide_route(
    *,
    requested_model: str,
    allowed_engines: Sequence[str],
    score: float | None,
    threshold: float,
    sticky_engine: str | None = None,
    sticky_score: float | None = None,
    loads: Mapping[str, EngineLoad] | None = None,
    ttft_target_ms: float | None = None,
    sticky_margin: float = DEFAULT_STICKY_MARGIN,
    unavailable: Container[str] = frozenset(),
) -> RouteDecision:
    """Choose the engine for one request; `allowed_engines` is ordered weak to strong;
    `unavailable`: engines with no replica that can take a request now.

    Raises EngineNotAllowedError when the tier allows no engine or `requested_model` names an
    engine outside `allowed_engines`.
    """
    decision = _decide(
        requested_model, allowed_engines, score, threshold, sticky_engine, sticky_score,
        loads, ttft_target_ms, sticky_margin,
    )  # fmt: skip
    if requested_model != AUTO_MODEL or decision.engine not in unavailable:
        return decision
    up = [name for name in allowed_engines if name not in unavailable]
    if not up:
        return decision  # nothing can answer: the caller's 503 says so
    sticky = sticky_engine if sticky_engine in up else None
    other = _decide(
        AUTO_MODEL, up, score, threshold, sticky, sticky_score, loads, ttft_target_ms, sticky_margin
    )
    return RouteDecision(
        other.engine,
        score,
        "failover",
        f"{decision.engine} has no replica that can answer; {other.reason}: {other.detail}",
    )


def _decide(
    requested_model: str,
    allowed_engines: Sequence[str],
    score: float | None,
    threshold: float,
    sticky_engine: str | None,
    sticky_score: float | None,
    loads: Mapping[str, EngineLoad] | None,
    ttft_target_ms: float | None,
    sticky_margin: float,
) -> RouteDecision:
    if not allowed_engines:
        raise EngineNotAllowedError("the tier allows no engine")
    if requested_model != AUTO_MODEL:
        if requested_model not in allowed_engines:
            raise EngineNotAllowedError(f"model {requested_model!r} is not allowed for this tier")
        return RouteDecision(requested_model, score, "explicit_model", "model named in request")
    if len(allowed_engines) == 1:
        only = allowed_engines[0]
        return RouteDecision(only, score, "tier_limit", f"tier allows only {only}")

    engine, reason, detail = _by_difficulty(allowed_engines, score, threshold)
    if sticky_engine is not None and sticky_engine in allowed_engines and sticky_engine != engine:
        engine, reason, detail = _apply_stickiness(
            allowed_engines, engine, reason, detail, score, threshold, sticky_engine,
            sticky_score, sticky_margin,
        )  # fmt: skip
    if loads is not None and ttft_target_ms is not None:
        moved = _shed_load(allowed_engines, engine, loads, ttft_target_ms)
        if moved is not None:
            return RouteDecision(moved[0], score, "load", moved[1])
    return RouteDecision(engine, score, reason, detail)


def _by_difficulty(
    allowed: Sequence[str], score: float | None, threshold: float
) -> tuple[str, RouteReason, str]:
    if score is None:
        return allowed[0], "difficulty", "no score; cheapest engine"
    if score >= threshold:
        return allowed[-1], "difficulty", f"score {score:.3f} >= threshold {threshold:.3f}"
    return allowed[0], "difficulty", f"score {score:.3f} < threshold {threshold:.3f}"


def _apply_stickiness(
    allowed: Sequence[str],
    engine: str,
    reason: RouteReason,
    detail: str,
    score: float | None,
    threshold: float,
    sticky_engine: str,
    sticky_score: float | None,
    margin: float,
) -> tuple[str, RouteReason, str]:
    if allowed.index(sticky_engine) > allowed.index(engine):
        return sticky_engine, "sticky", f"conversation stays on {sticky_engine}; never moves down"
    earlier_was_hard = sticky_score is not None and sticky_score >= threshold
    needed = threshold if earlier_was_hard else threshold + margin
    if score is not None and score >= needed:
        return engine, reason, f"{detail}; moved up from {sticky_engine} (needs {needed:.3f})"
    return (
        sticky_engine,
        "sticky",
        f"conversation stays on {sticky_engine}; score below {needed:.3f}",
    )


_CLEARLY_FASTER = 2.0  # when no engine meets the target, move only to one at least this much faster


def _shed_load(
    allowed: Sequence[str], engine: str, loads: Mapping[str, EngineLoad], target_ms: float
) -> tuple[str, str] | None:
    """The nearest allowed engine that meets the TTFT target when `engine` breaks it, else None."""
    current = loads.get(engine)
    if current is None or current.est_ttft_ms <= target_ms:
        return None
    position = allowed.index(engine)
    # Nearest in strength first; of two equally near, the stronger (less quality lost).
    candidates = sorted(
        (i for i, name in enumerate(allowed) if i != position),
        key=lambda i: (abs(i - position), -i),
    )
    known = [(i, load) for i in candidates if (load := loads.get(allowed[i])) is not None]
    for i, load in known:
        if load.est_ttft_ms <= target_ms:
            return allowed[i], (
                f"{engine} est. TTFT {current.est_ttft_ms:.0f} ms > target {target_ms:.0f} ms; "
                f"{allowed[i]} est. {load.est_ttft_ms:.0f} ms"
            )
    if not known:
        return None
    i, fastest = min(known, key=lambda pair: pair[1].est_ttft_ms)
    if fastest.est_ttft_ms * _CLEARLY_FASTER > current.est_ttft_ms:
        return None
    return allowed[i], (
        f"{engine} est. TTFT {current.est_ttft_ms:.0f} ms > target {target_ms:.0f} ms; none meets "
        f"it, {allowed[i]} is the fastest at est. {fastest.est_ttft_ms:.0f} ms"
    )
