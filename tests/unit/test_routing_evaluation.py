"""PGR curve, APGR and CPT against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routing.evaluation import apgr, cpt, pgr_curve, routellm_curve


def test_perfect_router_on_two_prompts() -> None:
    # Prompt 0: strong wins; prompt 1: both right. Perfect router sends prompt 0 first.
    curve = pgr_curve([0.9, 0.1], weak_scores=[0, 1], strong_scores=[1, 1])
    np.testing.assert_allclose(curve.strong_share, [0, 0.5, 1])
    np.testing.assert_allclose(curve.pgr, [0, 1, 1])
    assert apgr(curve) == pytest.approx(0.75)
    assert cpt(curve, 0.5) == pytest.approx(0.25)
    assert cpt(curve, 1.0) == pytest.approx(0.5)


def test_worst_router_on_two_prompts() -> None:
    curve = pgr_curve([0.1, 0.9], weak_scores=[0, 1], strong_scores=[1, 1])
    assert apgr(curve) == pytest.approx(0.25)
    assert cpt(curve, 0.5) == pytest.approx(0.75)


def test_constant_scores_are_the_random_diagonal() -> None:
    curve = pgr_curve([0.3] * 4, weak_scores=[0, 1, 0, 1], strong_scores=[1, 1, 1, 0])
    np.testing.assert_allclose(curve.strong_share, [0, 1])
    assert apgr(curve) == pytest.approx(0.5)
    assert cpt(curve, 0.8) == pytest.approx(0.8)


def test_no_gap_is_refused() -> None:
    with pytest.raises(ValueError, match="gap"):
        pgr_curve([0.1, 0.2], weak_scores=[1, 1], strong_scores=[1, 0])


def test_cpt_target_out_of_range_is_refused() -> None:
    curve = pgr_curve([0.9, 0.1], weak_scores=[0, 1], strong_scores=[1, 1])
    with pytest.raises(ValueError, match="target"):
        cpt(curve, 1.2)


@given(st.integers(2, 60), st.integers(0, 10_000))
def test_random_scores_average_to_about_a_half(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weak = rng.integers(0, 2, n).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, n))
    strong[0], weak[0] = 1.0, 0.0  # guarantee a gap
    # The mean over all orders is the diagonal: averaging a score and its reverse gives 0.5.
    scores = rng.permutation(n).astype(float)
    forward = apgr(pgr_curve(scores, weak, strong))
    backward = apgr(pgr_curve(-scores, weak, strong))
    assert (forward + backward) / 2 == pytest.approx(0.5)


def test_routellm_sampling_of_a_perfect_router() -> None:
    curve = routellm_curve([0.9, 0.1], weak_scores=[0, 1], strong_scores=[1, 1])
    assert curve.strong_share.size == 11
    assert apgr(curve) == pytest.approx(0.75)
    assert cpt(curve, 0.5) == pytest.approx(0.25)


@given(st.integers(12, 80), st.integers(0, 10_000))
def test_routellm_points_lie_on_the_exact_curve(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weak = rng.integers(0, 2, n).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, n))
    strong[0], weak[0] = 1.0, 0.0  # a positive gap
    scores = rng.permutation(n).astype(float)  # distinct: every cut is a vertex of the curve
    exact = pgr_curve(scores, weak, strong)
    coarse = routellm_curve(scores, weak, strong)
    assert coarse.strong_share[0] == 0.0 and coarse.strong_share[-1] == 1.0
    vertices = dict(zip(exact.strong_share.tolist(), exact.pgr.tolist(), strict=True))
    for x, y in zip(coarse.strong_share.tolist(), coarse.pgr.tolist(), strict=True):
        assert y == pytest.approx(vertices[x])
