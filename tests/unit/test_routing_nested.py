"""The multi-seed and nested evaluation of the difficulty head (scripts/routing_nested.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.routing.classifier import DifficultyClassifier, NeighbourVote
from proxy.routing.features import CHEAP_FEATURE_NAMES, EMBEDDING_DIM
from scripts.routing_data import RoutingDevData
from scripts.routing_nested import (
    SHIPPED,
    ShallowSetting,
    absolute_vote,
    evaluate_fold_seed,
    head_scores_by_setting,
    meets_targets,
    metrics,
    parse_grid,
    select_setting,
)
from scripts.train_router import fold_strata, grouped_folds, labels, train_head, win_target


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, EMBEDDING_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_data(n: int = 240, seed: int = 0) -> RoutingDevData:
    """Dev-shaped data whose labels depend on the embedding, so the head has something to learn."""
    rng = np.random.default_rng(seed)
    # Prompts in 12 topics, half of them hard: the neighbour votes and the linear part can tell.
    topic = rng.integers(0, 12, n)
    embeddings = unit_rows(rng, 12)[topic] + 0.5 * unit_rows(rng, n)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    shallow = unit_rows(rng, 12)[topic] + unit_rows(rng, n)
    shallow /= np.linalg.norm(shallow, axis=1, keepdims=True)
    hard = topic % 2 == 0
    strong = np.where(hard, 1.0, rng.integers(0, 2, n)).astype(np.float64)
    weak = np.where(hard, 0.0, strong).astype(np.float64)
    weak[:5] = 1.0  # a few prompts where the weak model wins
    strong[:5] = 0.0
    cheap = rng.normal(size=(n, len(CHEAP_FEATURE_NAMES))).astype(np.float32)
    return RoutingDevData(
        benchmark=np.array(["mmlu" if i % 4 else "gsm8k" for i in range(n)]),
        subset=np.array(["s"] * n),
        prompts=[f"prompt {i}" for i in range(n)],
        weak=weak,
        strong=strong,
        embeddings=embeddings,
        cheap=cheap,
        groups=np.arange(n, dtype=np.int64) // 2,  # pairs, as near-duplicates
        shallow=shallow,
    )


def test_grid_parsing() -> None:
    assert parse_grid("none, 20:1,15:0.5,20:1") == (
        ShallowSetting(None),
        ShallowSetting(20.0, 1.0),
        ShallowSetting(15.0, 0.5),
    )
    assert parse_grid("17.5:1+r25:1") == (SHIPPED,)
    assert parse_grid("25") == (ShallowSetting(25.0, SHIPPED.prior_weight),)
    assert parse_grid("15:2:0.8") == (ShallowSetting(15.0, 2.0, 0.8),)
    assert parse_grid("20:0.5+r25:1@0.001, none@0.01") == (
        ShallowSetting(
            20.0, 0.5, residual_bandwidth=25.0, residual_prior_weight=1.0, linear_c=0.001
        ),
        ShallowSetting(None, linear_c=0.01),
    )
    with pytest.raises(ValueError, match="residual vote"):
        parse_grid("20:1+rx")
    with pytest.raises(ValueError, match="'x:1'"):
        parse_grid("x:1")


@settings(max_examples=30, deadline=None)
@given(
    bandwidth=st.floats(1.0, 40.0),
    prior_weight=st.floats(0.0, 5.0),
    seed=st.integers(0, 1000),
)
def test_absolute_vote_is_the_classifiers_vote(
    bandwidth: float, prior_weight: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    keys = unit_rows(rng, 30)[:, :8] / np.sqrt(30)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    vote = NeighbourVote(
        centre=np.zeros(8, np.float32),
        projection=np.eye(8, dtype=np.float32),
        keys=keys,
        labels=rng.integers(0, 3, 30).astype(np.float32) / 2,
        k=30,
        bandwidth=bandwidth,
        prior_weight=prior_weight + 1e-3,
    )
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    similarity = vote.project(queries) @ vote.keys.T
    got = absolute_vote(similarity, vote.labels, bandwidth, prior_weight + 1e-3)
    np.testing.assert_allclose(got, vote.share(queries), rtol=1e-5, atol=1e-6)


RESIDUAL_SETTING = ShallowSetting(20.0, 0.5, residual_bandwidth=25.0, residual_prior_weight=1.0)


@pytest.mark.parametrize(
    "setting",
    [
        SHIPPED,
        ShallowSetting(None),
        RESIDUAL_SETTING,
        ShallowSetting(
            15.0, 2.0, residual_bandwidth=30.0, residual_prior_weight=0.5, linear_c=0.01
        ),
    ],
)
def test_scores_by_setting_are_those_of_a_trained_head(setting: ShallowSetting) -> None:
    data = synthetic_data()
    test = np.arange(len(data.prompts)) % 5 == 0
    # Scored beside other settings, as in the nested check: parts shared between settings (and
    # linear parts of another C) must not leak into this setting's scores.
    grid = [setting, ShallowSetting(20.0, 1.0, linear_c=0.1), RESIDUAL_SETTING]
    got = head_scores_by_setting(data, ~test, test, grid, seed=0)[setting]
    train = ~test
    arrays, _ = train_head(
        data.embeddings[train],
        data.cheap[train],
        win_target(data)[train],
        fold_strata(data.benchmark, labels(data))[train],
        data.groups[train],
        None if setting.bandwidth is None else data.shallow[train],
        c=setting.linear_c,
        shallow_bandwidth=SHIPPED.bandwidth if setting.bandwidth is None else setting.bandwidth,
        shallow_prior_weight=setting.prior_weight,
        residual=setting.residual,
        seed=0,
    )
    head = DifficultyClassifier.from_arrays(arrays)
    assert (head.residual_vote is not None) == (setting.residual is not None)
    shallow = None if setting.bandwidth is None else data.shallow[test]
    expected = head.score_arrays(data.embeddings[test], data.cheap[test], shallow)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_selection_picks_the_setting_that_ranks_best() -> None:
    data = synthetic_data()
    gain = data.strong - data.weak
    rng = np.random.default_rng(1)
    good, noisy = ShallowSetting(20.0, 1.0), ShallowSetting(15.0, 1.0)
    scores = {noisy: gain + 3 * rng.normal(size=gain.size), good: gain}
    rows = np.ones(gain.size, dtype=bool)
    assert select_setting(data, scores, rows) == good
    assert metrics(data, scores[good])["overall"] > metrics(data, scores[noisy])["overall"]


def test_selection_with_a_floor_passes_over_a_setting_that_fails_a_benchmark() -> None:
    data = synthetic_data()
    gain = data.strong - data.weak
    gsm8k = data.benchmark == "gsm8k"
    rows = np.ones(gain.size, dtype=bool)
    best, safe = ShallowSetting(15.0, 1.0), ShallowSetting(20.0, 1.0)
    # `best` ranks MMLU perfectly and GSM8K backwards; `safe` ranks both through much noise.
    # Overall `best` wins (MMLU is most rows), but its GSM8K APGR is far below `safe`'s.
    scores = {
        best: np.where(gsm8k, -gain, gain) + 1e-3 * np.random.default_rng(2).normal(size=gain.size),
        safe: gain + 1.5 * np.random.default_rng(3).normal(size=gain.size),
    }
    by = {s: metrics(data, v) for s, v in scores.items()}
    assert by[best]["overall"] > by[safe]["overall"]
    assert by[best]["gsm8k"] < 0.4 <= by[safe]["gsm8k"]
    assert select_setting(data, scores, rows) == best
    assert select_setting(data, scores, rows, per_benchmark_floor=0.4) == safe
    # No setting reaches the floor: the best overall, as without one.
    assert select_setting(data, scores, rows, per_benchmark_floor=0.9) == best


def test_nested_with_one_candidate_scores_as_that_setting() -> None:
    data = synthetic_data()
    fold_of = grouped_folds(fold_strata(data.benchmark, labels(data)), data.groups, 3, 0)
    result = evaluate_fold_seed(
        data, fold_of, 0, [SHIPPED], seed=0, nested=True, log=lambda _: None
    )
    assert result.picks == [SHIPPED] * 3
    assert result.nested == result.by_setting[SHIPPED]
    assert result.nested["overall"] > 0.6  # the labels follow the embedding: learnable


def test_nested_picks_come_from_the_grid_and_its_scores_from_the_outer_heads() -> None:
    data = synthetic_data()
    fold_of = grouped_folds(fold_strata(data.benchmark, labels(data)), data.groups, 3, 0)
    grid = [ShallowSetting(None), SHIPPED]
    result = evaluate_fold_seed(data, fold_of, 0, grid, seed=0, nested=True, log=lambda _: None)
    assert len(result.picks) == 3 and set(result.picks) <= set(grid)
    assert set(result.by_setting) == set(grid)
    if len(set(result.picks)) == 1:
        assert result.nested == result.by_setting[result.picks[0]]


def test_targets() -> None:
    row = {"overall": 0.69, "gsm8k": 0.61, "mmlu": 0.7, "cpt50": 0.29, "cpt80": 0.6}
    assert meets_targets(row)
    assert not meets_targets(row | {"gsm8k": 0.59})
    assert not meets_targets(row | {"overall": 0.679})
    assert not meets_targets(row | {"cpt50": 0.31})


def test_a_similarity_cutoff_leaves_far_prompts_at_the_prior() -> None:
    similarity = np.array([[0.95, 0.5, 0.2], [0.6, 0.5, 0.2]], dtype=np.float32)
    labels_ = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    cut = absolute_vote(similarity, labels_, 10.0, 1.0, min_similarity=0.9)
    uncut = absolute_vote(similarity, labels_, 10.0, 1.0)
    prior = float(labels_.mean())
    assert cut[1] == pytest.approx(prior)  # no key at 0.9 or above: the mean label
    assert uncut[1] != pytest.approx(prior)
    assert cut[0] == pytest.approx((np.exp(-0.5) + prior) / (np.exp(-0.5) + 1.0))
