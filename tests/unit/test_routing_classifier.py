"""DifficultyClassifier: loading heads, scoring maths, the neighbour vote, the shipped artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.routing.classifier import (
    TOKENS_FEATURE,
    ClassifierArtifactError,
    DifficultyClassifier,
    neighbour_logit,
)
from proxy.routing.features import CHEAP_FEATURE_NAMES, EMBEDDING_DIM, RoutingFeatures

N_IN = EMBEDDING_DIM + len(CHEAP_FEATURE_NAMES)


def linear_arrays(seed: int = 0, **overrides: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {
        "feature_names": np.array(CHEAP_FEATURE_NAMES),
        "input_mean": rng.normal(size=N_IN).astype(np.float32),
        "input_scale": rng.uniform(0.5, 2.0, N_IN).astype(np.float32),
        "out_w": rng.normal(size=N_IN).astype(np.float32),
        "out_b": np.array(0.3, dtype=np.float32),
        "metadata": np.array(json.dumps({"thresholds_by_strong_share": {"0.1": 0.8, "0.3": 0.6}})),
    }
    arrays.update(overrides)
    return arrays


def neighbour_arrays(keys: np.ndarray, labels: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Identity projection onto the first keys.shape[1] embedding axes; keys stored exactly."""
    dims = keys.shape[1]
    projection = np.zeros((EMBEDDING_DIM, dims), dtype=np.float32)
    projection[np.arange(dims), np.arange(dims)] = 1.0
    return {
        "knn_centre": np.zeros(EMBEDDING_DIM, dtype=np.float32),
        "knn_projection": projection,
        "knn_keys": keys.astype(np.int8),
        "knn_key_scale": np.ones(dims, dtype=np.float32),
        "knn_labels": labels.astype(np.uint8),
        "knn_k": np.array(k),
        "stack_w": np.array([0.0, 1.0, 0.0], dtype=np.float32),
        "stack_b": np.array(0.0),
    }


def random_features(seed: int) -> RoutingFeatures:
    rng = np.random.default_rng(seed)
    embedding = rng.normal(size=EMBEDDING_DIM).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    return RoutingFeatures(
        embedding, rng.uniform(0, 3, len(CHEAP_FEATURE_NAMES)).astype(np.float32)
    )


def axis_features(axis: int) -> RoutingFeatures:
    embedding = np.zeros(EMBEDDING_DIM, dtype=np.float32)
    embedding[axis] = 1.0
    return RoutingFeatures(embedding, np.zeros(len(CHEAP_FEATURE_NAMES), dtype=np.float32))


def test_linear_score_matches_the_formula(tmp_path: Path) -> None:
    arrays = linear_arrays()
    np.savez(tmp_path / "head.npz", **arrays)
    head = DifficultyClassifier.load(tmp_path / "head.npz")
    feats = random_features(1)
    x = (np.concatenate([feats.embedding, feats.cheap]) - arrays["input_mean"]) / arrays[
        "input_scale"
    ]
    expected = 1 / (1 + np.exp(-(x @ arrays["out_w"] + 0.3)))
    assert head.score(feats) == pytest.approx(float(expected), rel=1e-5)


def test_neighbour_vote_counts_the_labels_of_the_nearest_keys() -> None:
    # Keys along axes 0..3 of a 4-d space; the first two are labelled hard.
    keys = np.eye(4) * 100
    head = DifficultyClassifier.from_arrays(
        linear_arrays() | neighbour_arrays(keys, np.array([1, 1, 0, 0]), k=1)
    )
    assert head.neighbours is not None
    near_hard = head.neighbours.share(
        np.stack([axis_features(0).embedding, axis_features(1).embedding])
    )
    near_easy = head.neighbours.share(axis_features(3).embedding[None, :])
    np.testing.assert_allclose(near_hard, [1.0, 1.0])
    np.testing.assert_allclose(near_easy, [0.0])
    # stack_w = [0, 1, 0]: the score is the sigmoid of the neighbour logit alone.
    expected = 1 / (1 + np.exp(-neighbour_logit(1.0)))
    assert head.score(axis_features(0)) == pytest.approx(float(expected))
    assert head.score(axis_features(0)) > 0.9 > 0.1 > head.score(axis_features(3))


def test_stacker_weighs_the_token_feature() -> None:
    keys = np.eye(4) * 100
    stack = {"stack_w": np.array([0.0, 0.0, 2.0], dtype=np.float32), "stack_b": np.array(-1.0)}
    head = DifficultyClassifier.from_arrays(
        linear_arrays() | neighbour_arrays(keys, np.array([1, 0, 0, 0]), k=2) | stack
    )
    feats = axis_features(2)
    feats.cheap[TOKENS_FEATURE] = 1.5
    assert head.score(feats) == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_k_larger_than_the_keys_uses_all_keys() -> None:
    head = DifficultyClassifier.from_arrays(
        linear_arrays() | neighbour_arrays(np.eye(2) * 100, np.array([1, 0]), k=50)
    )
    assert head.neighbours is not None
    np.testing.assert_allclose(head.neighbours.share(axis_features(0).embedding[None, :]), [0.5])


def kernel_head(labels: list[float], bandwidth: float) -> DifficultyClassifier:
    arrays = neighbour_arrays(np.eye(len(labels)) * 100, np.zeros(len(labels)), k=len(labels))
    arrays["knn_labels"] = np.array(labels, dtype=np.float16)
    arrays["knn_key_scale"] = np.full(len(labels), 0.01, dtype=np.float32)  # unit-length keys
    arrays["knn_bandwidth"] = np.array(bandwidth, dtype=np.float32)
    return DifficultyClassifier.from_arrays(linear_arrays() | arrays)


def test_similarity_weighted_vote_matches_the_formula() -> None:
    # Keys along axes 0..2; a query between axes 0 and 1 has cosine 0.8 and 0.6 with them.
    head = kernel_head([1.0, 0.5, 0.0], bandwidth=5.0)
    assert head.neighbours is not None
    query = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
    query[0, :2] = [0.8, 0.6]
    weights = np.exp(5.0 * (np.array([0.8, 0.6, 0.0]) - 0.8))
    expected = (weights @ np.array([1.0, 0.5, 0.0])) / weights.sum()
    np.testing.assert_allclose(head.neighbours.share(query), [expected], rtol=1e-5)


def test_bandwidth_moves_the_vote_from_the_mean_to_the_nearest() -> None:
    query = axis_features(0).embedding[None, :]
    flat = kernel_head([1.0, 0.0, 0.0, 0.5], bandwidth=0.0)
    sharp = kernel_head([1.0, 0.0, 0.0, 0.5], bandwidth=200.0)
    assert flat.neighbours is not None and sharp.neighbours is not None
    np.testing.assert_allclose(flat.neighbours.share(query), [0.375], rtol=1e-5)
    np.testing.assert_allclose(sharp.neighbours.share(query), [1.0], rtol=1e-5)


def test_batch_equals_single_scores() -> None:
    head = DifficultyClassifier.from_arrays(
        linear_arrays() | neighbour_arrays(np.eye(4) * 100, np.array([1, 0, 1, 0]), k=2)
    )
    feats = [random_features(i) for i in range(5)]
    np.testing.assert_allclose(head.score_batch(feats), [head.score(f) for f in feats], rtol=1e-5)
    assert head.score_batch([]).shape == (0,)


def test_extreme_logits_stay_in_unit_interval() -> None:
    head = DifficultyClassifier.from_arrays(linear_arrays(out_b=np.array(1e6, dtype=np.float32)))
    assert head.score(random_features(2)) == pytest.approx(1.0)


def test_thresholds_come_from_metadata() -> None:
    head = DifficultyClassifier.from_arrays(linear_arrays())
    assert head.default_thresholds == {0.1: 0.8, 0.3: 0.6}


def test_head_trained_on_other_features_is_refused() -> None:
    with pytest.raises(ClassifierArtifactError, match="cheap features"):
        DifficultyClassifier.from_arrays(linear_arrays(feature_names=np.array(["tokens", "turns"])))


def test_head_with_wrong_input_width_is_refused() -> None:
    with pytest.raises(ClassifierArtifactError, match="shapes"):
        DifficultyClassifier.from_arrays(linear_arrays(out_w=np.zeros(10, dtype=np.float32)))


def test_missing_field_is_named() -> None:
    arrays = linear_arrays()
    del arrays["out_b"]
    with pytest.raises(ClassifierArtifactError, match="out_b"):
        DifficultyClassifier.from_arrays(arrays)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ClassifierArtifactError, match=r"nope\.npz"):
        DifficultyClassifier.load(tmp_path / "nope.npz")


def test_shipped_head_loads_and_has_default_thresholds() -> None:
    head = DifficultyClassifier.load()
    thresholds = head.default_thresholds
    assert {0.1, 0.3} <= thresholds.keys()
    assert thresholds[0.1] > thresholds[0.3]  # a smaller strong share needs a higher threshold
    assert "strong_score > weak_score" in head.metadata["label"]
    assert head.neighbours is not None
    assert head.neighbours.bandwidth is not None  # the similarity-weighted vote
    assert head.shallow_neighbours is not None  # the second vote, in the shallow view
    assert head.shallow_neighbours.prior_weight is not None
    assert head.metadata["hyperparameters"]["shallow_prior_weight"] > 0
    assert head.residual_vote is not None  # the linear part's residuals, over the shallow keys
    assert head.residual_vote.residuals.shape == head.shallow_neighbours.labels.shape
    assert head.stack_w is not None and head.stack_w.shape == (5,)
    assert 0.0 <= head.score(random_features(3)) <= 1.0


def shallow_arrays(
    labels: list[float], bandwidth: float, prior_weight: float
) -> dict[str, np.ndarray]:
    """kernel_head's arrays plus a second vote over the same unit keys in the shallow view; the
    stacker reads only that vote's logit."""
    n = len(labels)
    projection = np.zeros((EMBEDDING_DIM, n), dtype=np.float32)
    projection[np.arange(n), np.arange(n)] = 1.0
    return (
        linear_arrays()
        | neighbour_arrays(np.eye(n) * 100, np.zeros(n), k=n)
        | {
            "knn_labels": np.array(labels, dtype=np.float16),
            "knn_key_scale": np.full(n, 0.01, dtype=np.float32),
            "knn_bandwidth": np.array(1.0, dtype=np.float32),
            "shallow_centre": np.zeros(EMBEDDING_DIM, dtype=np.float32),
            "shallow_projection": projection,
            "shallow_keys": (np.eye(n) * 100).astype(np.int8),
            "shallow_key_scale": np.full(n, 0.01, dtype=np.float32),
            "shallow_bandwidth": np.array(bandwidth, dtype=np.float32),
            "shallow_prior_weight": np.array(prior_weight, dtype=np.float32),
            "stack_w": np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32),
        }
    )


def shallow_head(
    labels: list[float], bandwidth: float, prior_weight: float
) -> DifficultyClassifier:
    return DifficultyClassifier.from_arrays(shallow_arrays(labels, bandwidth, prior_weight))


def test_shallow_vote_matches_the_formula_with_its_prior() -> None:
    labels = [1.0, 0.5, 0.0]
    head = shallow_head(labels, bandwidth=4.0, prior_weight=2.0)
    query = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
    query[0, :2] = [0.8, 0.6]
    weights = np.exp(4.0 * (np.array([0.8, 0.6, 0.0]) - 1.0))
    expected = (weights @ np.array(labels) + 2.0 * np.mean(labels)) / (weights.sum() + 2.0)
    np.testing.assert_allclose(head.shallow_share(query, 1), [expected], rtol=1e-5)


def test_shallow_vote_falls_back_to_the_mean_without_a_near_key_or_a_view() -> None:
    head = shallow_head([1.0, 1.0, 0.0, 1.0], bandwidth=60.0, prior_weight=1.0)
    far = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
    far[0, :4] = 0.5  # cosine 0.5 with every key: weights exp(-30), nothing is near
    np.testing.assert_allclose(head.shallow_share(far, 1), [0.75], rtol=1e-4)
    near = axis_features(3).embedding[None, :]  # on key 3 (label 1): weight 1 against prior 1
    np.testing.assert_allclose(head.shallow_share(near, 1), [(1.0 + 0.75) / 2], rtol=1e-4)
    np.testing.assert_allclose(head.shallow_share(None, 2), [0.75, 0.75])
    # Scoring: the stacker reads the second vote's logit only.
    feats = axis_features(0)
    without = head.score(feats)
    assert without == pytest.approx(1 / (1 + np.exp(-neighbour_logit(0.75))), rel=1e-5)
    with_view = head.score(
        RoutingFeatures(feats.embedding, feats.cheap, shallow=near[0].astype(np.float32))
    )
    assert with_view > without


def test_batch_with_and_without_shallow_views_equals_single_scores() -> None:
    head = shallow_head([1.0, 0.0, 1.0, 0.0], bandwidth=10.0, prior_weight=0.5)
    feats = [random_features(i) for i in range(4)]
    views = [
        RoutingFeatures(f.embedding, f.cheap, shallow=random_features(10 + i).embedding)
        for i, f in enumerate(feats)
    ]
    for batch in (views, feats, views[:2] + feats[2:]):
        np.testing.assert_allclose(
            head.score_batch(batch), [head.score(f) for f in batch], rtol=1e-5
        )


def test_stacker_width_must_match_the_votes() -> None:
    bad = linear_arrays() | neighbour_arrays(np.eye(2) * 100, np.zeros(2), k=2)
    bad["stack_w"] = np.zeros(4, dtype=np.float32)
    with pytest.raises(ClassifierArtifactError, match="stacker has 4 weights for 3 inputs"):
        DifficultyClassifier.from_arrays(bad)


def residual_arrays(
    residuals: list[float], bandwidth: float, prior_weight: float
) -> dict[str, np.ndarray]:
    """A residual vote over shallow_arrays' keys; the stacker reads only that vote."""
    return {
        "residual_labels": np.array(residuals, dtype=np.float16),
        "residual_bandwidth": np.array(bandwidth, dtype=np.float32),
        "residual_prior_weight": np.array(prior_weight, dtype=np.float32),
        "stack_w": np.array([0.0, 0.0, 0.0, 0.0, 1.0], dtype=np.float32),
    }


def residual_head(
    labels: list[float], residuals: list[float], bandwidth: float, prior_weight: float
) -> DifficultyClassifier:
    return DifficultyClassifier.from_arrays(
        shallow_arrays(labels, bandwidth=20.0, prior_weight=1.0)
        | residual_arrays(residuals, bandwidth, prior_weight)
    )


def test_residual_vote_matches_the_formula_with_no_correction_as_its_prior() -> None:
    residuals = [0.5, -0.25, 0.75]
    head = residual_head([1.0, 0.5, 0.0], residuals, bandwidth=4.0, prior_weight=2.0)
    query = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
    query[0, :2] = [0.8, 0.6]
    weights = np.exp(4.0 * (np.array([0.8, 0.6, 0.0]) - 1.0))
    expected = (weights @ np.array(residuals)) / (weights.sum() + 2.0)
    share, residual = head.shallow_votes(query, 1)
    assert residual is not None
    np.testing.assert_allclose(residual, [expected], rtol=1e-4)
    np.testing.assert_allclose(share, head.shallow_share(query, 1))
    # The stacker reads the residual vote itself (it is not a share, so no logit).
    feats = RoutingFeatures(query[0], random_features(0).cheap, shallow=query[0])
    assert head.score(feats) == pytest.approx(1 / (1 + np.exp(-expected)), rel=1e-5)


def test_residual_vote_is_no_correction_without_a_near_key_or_a_view() -> None:
    head = residual_head([1.0, 0.0], [0.9, 0.9], bandwidth=60.0, prior_weight=1.0)
    far = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
    far[0, :2] = 0.7  # cosine 0.7 with both keys: weights exp(-18), nothing is near
    assert abs(float(head.shallow_votes(far, 1)[1][0])) < 1e-6  # type: ignore[index]
    share, residual = head.shallow_votes(None, 3)
    np.testing.assert_allclose(share, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(residual, [0.0, 0.0, 0.0])  # type: ignore[arg-type]
    assert head.score(random_features(1)) == pytest.approx(0.5)


def test_residual_labels_must_match_the_shallow_keys_and_the_stacker_its_inputs() -> None:
    with pytest.raises(ClassifierArtifactError, match="residual_labels has shape"):
        residual_head([1.0, 0.0, 1.0], [0.1, 0.2], bandwidth=4.0, prior_weight=1.0)
    four_weights = shallow_arrays([1.0, 0.0], bandwidth=4.0, prior_weight=1.0) | residual_arrays(
        [0.1, 0.2], bandwidth=4.0, prior_weight=1.0
    )
    four_weights["stack_w"] = np.zeros(4, dtype=np.float32)
    with pytest.raises(ClassifierArtifactError, match="stacker has 4 weights for 5 inputs"):
        DifficultyClassifier.from_arrays(four_weights)
