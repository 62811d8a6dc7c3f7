"""decide_route: explicit models, tier limits, difficulty, stickiness, load shedding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routing.decision import (
    AUTO_MODEL,
    EngineLoad,
    EngineNotAllowedError,
    decide_route,
)

TWO = ("small", "large")


def test_explicit_model_goes_to_that_engine_even_when_easy() -> None:
    decision = decide_route(requested_model="large", allowed_engines=TWO, score=0.0, threshold=0.5)
    assert (decision.engine, decision.reason) == ("large", "explicit_model")


def test_explicit_model_outside_the_tier_is_refused() -> None:
    with pytest.raises(EngineNotAllowedError, match="large"):
        decide_route(requested_model="large", allowed_engines=("small",), score=0.9, threshold=0.5)


def test_no_allowed_engine_is_refused() -> None:
    with pytest.raises(EngineNotAllowedError):
        decide_route(requested_model=AUTO_MODEL, allowed_engines=(), score=0.9, threshold=0.5)


def test_single_allowed_engine_is_a_tier_limit() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=("small",), score=0.99, threshold=0.5
    )
    assert (decision.engine, decision.reason) == ("small", "tier_limit")


@pytest.mark.parametrize(("score", "engine"), [(0.49, "small"), (0.5, "large"), (0.9, "large")])
def test_difficulty_threshold(score: float, engine: str) -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=score, threshold=0.5
    )
    assert (decision.engine, decision.reason) == (engine, "difficulty")
    assert decision.score == score


def test_missing_score_takes_the_cheapest_engine() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=None, threshold=0.5
    )
    assert decision.engine == "small"


def test_sticky_weak_stays_when_new_turn_is_only_slightly_harder() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.55, threshold=0.5,
        sticky_engine="small", sticky_score=0.2, sticky_margin=0.1,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("small", "sticky")


def test_sticky_weak_moves_up_when_new_turn_is_clearly_harder() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.61, threshold=0.5,
        sticky_engine="small", sticky_score=0.2, sticky_margin=0.1,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("large", "difficulty")


def test_sticky_weak_that_already_scored_hard_needs_no_margin() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.55, threshold=0.5,
        sticky_engine="small", sticky_score=0.8, sticky_margin=0.1,
    )  # fmt: skip
    assert decision.engine == "large"


def test_sticky_strong_never_moves_down() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.01, threshold=0.5,
        sticky_engine="large", sticky_score=0.9,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("large", "sticky")


def test_sticky_engine_outside_the_tier_is_ignored() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.1, threshold=0.5,
        sticky_engine="huge",
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("small", "difficulty")


def test_overloaded_choice_moves_to_an_engine_meeting_the_target() -> None:
    loads = {"large": EngineLoad(12, 8, 4000.0), "small": EngineLoad(0, 1, 80.0)}
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.9, threshold=0.5,
        loads=loads, ttft_target_ms=1000.0,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("small", "load")
    assert "4000" in decision.detail


def test_no_move_when_no_other_engine_meets_the_target_or_is_clearly_faster() -> None:
    loads = {"large": EngineLoad(12, 8, 4000.0), "small": EngineLoad(9, 9, 2500.0)}
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.9, threshold=0.5,
        loads=loads, ttft_target_ms=1000.0,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("large", "difficulty")


def test_when_none_meets_the_target_a_much_faster_engine_still_takes_it() -> None:
    loads = {"large": EngineLoad(12, 8, 4000.0), "small": EngineLoad(9, 9, 1500.0)}
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.9, threshold=0.5,
        loads=loads, ttft_target_ms=1000.0,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("small", "load")
    assert "none meets" in decision.detail


def test_unknown_load_is_not_a_reason_to_move() -> None:
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=TWO, score=0.9, threshold=0.5,
        loads={"small": EngineLoad(0, 0, 10.0)}, ttft_target_ms=1000.0,
    )  # fmt: skip
    assert decision.engine == "large"


def test_load_prefers_the_nearest_engine_then_the_stronger() -> None:
    three = ("s", "m", "l")
    fine = EngineLoad(0, 0, 10.0)
    loads = {"s": fine, "m": EngineLoad(5, 5, 5000.0), "l": fine}
    decision = decide_route(
        requested_model=AUTO_MODEL, allowed_engines=three, score=0.1, threshold=0.5,
        sticky_engine="m", loads=loads, ttft_target_ms=1000.0,
    )  # fmt: skip
    assert (decision.engine, decision.reason) == ("l", "load")


# --- properties -------------------------------------------------------------------------

engine_lists = st.lists(
    st.sampled_from(["e0", "e1", "e2", "e3"]), min_size=1, max_size=4, unique=True
)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
loads_strategy = st.dictionaries(
    st.sampled_from(["e0", "e1", "e2", "e3"]),
    st.builds(
        EngineLoad,
        st.integers(0, 50),
        st.integers(0, 50),
        st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False),
    ),
)
situations = st.fixed_dictionaries(
    {
        "allowed_engines": engine_lists,
        "threshold": unit,
        "sticky_engine": st.one_of(st.none(), st.sampled_from(["e0", "e1", "e2", "e3"])),
        "sticky_score": st.one_of(st.none(), unit),
        "loads": st.one_of(st.none(), loads_strategy),
        "ttft_target_ms": st.one_of(st.none(), st.floats(min_value=0.0, max_value=10_000.0)),
        "sticky_margin": st.floats(min_value=0.0, max_value=0.5),
    }
)


@given(situations, st.one_of(st.none(), unit))
def test_auto_always_lands_on_an_allowed_engine(
    situation: dict[str, object], score: float | None
) -> None:
    decision = decide_route(requested_model=AUTO_MODEL, score=score, **situation)  # type: ignore[arg-type]
    assert decision.engine in situation["allowed_engines"]  # type: ignore[operator]
    assert decision.score == score


@given(situations, unit, unit)
def test_raising_the_score_never_moves_to_a_weaker_engine(
    situation: dict[str, object], a: float, b: float
) -> None:
    low, high = sorted((a, b))
    allowed = list(situation["allowed_engines"])  # type: ignore[call-overload]
    at_low = decide_route(requested_model=AUTO_MODEL, score=low, **situation)  # type: ignore[arg-type]
    at_high = decide_route(requested_model=AUTO_MODEL, score=high, **situation)  # type: ignore[arg-type]
    assert allowed.index(at_high.engine) >= allowed.index(at_low.engine)


@given(situations, unit)
def test_a_load_move_lands_within_the_target_or_at_least_twice_as_fast(
    situation: dict[str, object], score: float
) -> None:
    decision = decide_route(requested_model=AUTO_MODEL, score=score, **situation)  # type: ignore[arg-type]
    if decision.reason == "load":
        loads = situation["loads"]
        assert isinstance(loads, dict)
        unloaded = {**situation, "loads": None}
        before = decide_route(requested_model=AUTO_MODEL, score=score, **unloaded)  # type: ignore[arg-type]
        moved_to, came_from = loads[decision.engine].est_ttft_ms, loads[before.engine].est_ttft_ms
        assert moved_to <= situation["ttft_target_ms"] or 2 * moved_to <= came_from


def test_auto_fails_over_from_an_engine_that_cannot_answer() -> None:
    hard = {"requested_model": AUTO_MODEL, "allowed_engines": TWO, "threshold": 0.5}
    decision = decide_route(score=0.9, unavailable=frozenset({"large"}), **hard)  # type: ignore[arg-type]
    assert (decision.engine, decision.reason) == ("small", "failover")
    assert decision.detail.startswith("large has no replica")
    easy = decide_route(score=0.1, unavailable=frozenset({"small"}), **hard)  # type: ignore[arg-type]
    assert (easy.engine, easy.reason) == ("large", "failover")
    # nothing else can answer: the choice stands (the engine call's 503 says why)
    both = decide_route(score=0.9, unavailable=frozenset(TWO), **hard)  # type: ignore[arg-type]
    assert (both.engine, both.reason) == ("large", "difficulty")
    # an engine named by the request is that engine, available or not
    named = decide_route(
        requested_model="large", allowed_engines=TWO, score=None, threshold=0.5,
        unavailable=frozenset({"large"}),
    )  # fmt: skip
    assert named.engine == "large"


@given(situations, st.one_of(st.none(), unit), st.sets(st.sampled_from(["e0", "e1", "e2", "e3"])))
def test_auto_never_chooses_an_unavailable_engine_while_another_can_answer(
    situation: dict[str, object], score: float | None, down: set[str]
) -> None:
    allowed = list(situation["allowed_engines"])  # type: ignore[call-overload]
    unavailable = frozenset(down)
    decision = decide_route(
        requested_model=AUTO_MODEL,
        score=score,
        unavailable=unavailable,
        **situation,  # type: ignore[arg-type]
    )
    assert decision.engine in allowed
    if any(name not in unavailable for name in allowed):
        assert decision.engine not in unavailable
    else:
        assert decision == decide_route(requested_model=AUTO_MODEL, score=score, **situation)  # type: ignore[arg-type]
