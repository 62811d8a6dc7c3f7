"""Train the difficulty head on the routing dev data and write it as a numpy .npz.

    .venv/bin/python scripts/train_router.py [--data ../shared/data/routing_dev.csv.gz]
        [--out proxy/routing/artifacts/difficulty_head.npz] [--seed 0]

Target: the strong model's win with ties counted half, (1 + sign(strong_score - weak_score)) / 2,
as RouteLLM's routers estimate the strong model's win rate: 1 when the strong answer is better,
1/2 when both are equally good (or bad), 0 when the weak one is better. Ranking prompts by its
expectation ranks them by the expected quality gained by a strong call, which is what APGR
rewards; a 0/1 "strong better" label would rank a subject where the weak model often wins as if
the strong one merely tied there.

The head (see proxy/routing/classifier.py) = logistic regression on [MiniLM embedding, cheap
features] for the 0/1 label strong_score > weak_score + a similarity-weighted vote of the target
over all training prompts in a PCA-reduced embedding space + a second vote in a PCA-reduced space
of the encoder's shallow view (pooled states after MiniLM layer 2: more of the wording), with
absolute weights and a prior so that it only speaks for prompts with a close training prompt +
a stacker fitted on out-of-fold outputs of all three. The stacker is then recalibrated (one slope
and one offset, which keeps the order of scores) to the 0/1 label, so the score stays P(the small
engine's answer is worse). The linear part keeps the 0/1 label because on prompts unlike the dev
data (scripts/routing_own_prompts.jsonl) it judges hard maths as hard, where the win target learns
the dev file's maths subjects, in which the weak model often beats the strong one. Out-of-fold
splits keep near-duplicate prompts in one fold (scripts/routing_data.near_duplicate_groups).
Deterministic for a seed and data file.
Token counts in training come from MiniLM's WordPiece tokenizer (no special tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sklearn
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.cache.verifier import SHALLOW_LAYER
from proxy.routing.calibrate import threshold_for_share
from proxy.routing.classifier import (
    DEFAULT_HEAD_PATH,
    TOKENS_FEATURE,
    DifficultyClassifier,
    neighbour_logit,
)
from proxy.routing.features import CHEAP_FEATURE_NAMES
from scripts.routing_data import DEFAULT_DEV_FILE, RoutingDevData, load_dev_data

TARGET_DEFINITION = (
    "(1 + sign(strong_score - weak_score)) / 2: the strong model's win, ties counted half"
)
LABEL_DEFINITION = "strong_score > weak_score (the small/weak answer is worse than the strong one)"
STRONG_SHARES = (0.1, 0.2, 0.3, 0.5)
# Chosen by grouped 5-fold APGR on the dev data (exploration notes in docs/benchmarks.md).
DEFAULT_C = 0.001  # inverse L2 strength of the linear part: strong, the labels are noisy
DEFAULT_DIMS = 64  # PCA dimensions of the neighbour keys (int8: n * 64 bytes)
DEFAULT_BANDWIDTH = 7.0  # neighbour weight exp(bandwidth * (cosine - best cosine))
# The shallow-view vote: weight exp(bandwidth * (cosine - 1)), the mean target as this many extra
# neighbours. A stronger vote (lower bandwidth or prior) scores higher on the dev file and lower
# on mt_bench and the own prompts (docs/benchmarks.md section 5).
SHALLOW_BANDWIDTH = 17.5
SHALLOW_PRIOR_WEIGHT = 1.0
# The residual vote over the shallow keys (bandwidth, prior weight of "no correction"), or None.
# C, both votes' settings: the best mean APGR over five grouped 5-fold splits of the dev file
# among own-prompt-safe settings with APGR >= 0.60 on every benchmark of every split
# (docs/benchmarks.md section 5; the nested check estimates that choice).
RESIDUAL: tuple[float, float] | None = (25.0, 1.0)
INNER_FOLDS = 5

Arrays = dict[str, npt.NDArray[Any]]
F64 = npt.NDArray[np.float64]


def win_target(data: RoutingDevData) -> F64:
    return np.asarray((1.0 + np.sign(data.strong - data.weak)) / 2.0, dtype=np.float64)


def labels(data: RoutingDevData) -> npt.NDArray[np.int64]:
    return (data.strong > data.weak).astype(np.int64)


def grouped_folds(
    strata: npt.NDArray[Any], groups: npt.NDArray[np.int64], folds: int, seed: int
) -> npt.NDArray[np.int64]:
    """Fold number per row; whole groups are dealt round-robin per stratum after a shuffle.

    A group's stratum is that of its first row (groups rarely cross strata: near-duplicates
    share a benchmark).
    """
    rng = np.random.default_rng(seed)
    group_ids, first_row, row_group = np.unique(groups, return_index=True, return_inverse=True)
    group_stratum = np.asarray(strata)[first_row]
    fold_of_group = np.empty(group_ids.size, dtype=np.int64)
    for stratum in sorted(set(group_stratum.tolist())):
        members = np.flatnonzero(group_stratum == stratum)
        fold_of_group[rng.permutation(members)] = np.arange(members.size) % folds
    return fold_of_group[row_group]


def fold_strata(benchmark: npt.NDArray[Any], y: npt.NDArray[np.int64]) -> npt.NDArray[np.str_]:
    """Stratum per row: benchmark and label, so each fold holds every benchmark's share of both."""
    return np.char.add(np.char.add(benchmark.astype(str), ":"), y.astype(str))


def fit_linear(
    embeddings: npt.NDArray[np.float32],
    cheap: npt.NDArray[np.float32],
    strong_better: npt.NDArray[np.int64],
    *,
    c: float,
    seed: int,
) -> Arrays:
    x = np.concatenate([embeddings, cheap], axis=1).astype(np.float32)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0  # a constant column carries no information; keep it finite
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed)
    model.fit((x - mean) / scale, strong_better)
    return {
        "feature_names": np.array(CHEAP_FEATURE_NAMES),
        "input_mean": mean.astype(np.float32),
        "input_scale": scale.astype(np.float32),
        "out_w": model.coef_[0].astype(np.float32),
        "out_b": np.array(model.intercept_[0], dtype=np.float32),
    }


def neighbour_keys(embeddings: npt.NDArray[np.float32], *, dims: int, prefix: str) -> Arrays:
    """PCA projection and int8 keys (unit length before quantising) of a vote's training rows."""
    centre = embeddings.mean(axis=0)
    # PCA by SVD: deterministic up to the sign of each axis, which cosine similarity ignores.
    _, _, vt = np.linalg.svd(embeddings - centre, full_matrices=False)
    projection = vt[:dims].T.astype(np.float32)
    reduced = (embeddings - centre) @ projection
    reduced /= np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)
    key_scale = np.abs(reduced).max(axis=0) / 127.0
    keys = np.round(reduced / key_scale).astype(np.int8)
    return {
        f"{prefix}_centre": centre.astype(np.float32),
        f"{prefix}_projection": projection.astype(np.float16),
        f"{prefix}_keys": keys,
        f"{prefix}_key_scale": key_scale.astype(np.float32),
    }


def fit_shallow_neighbours(
    shallow: npt.NDArray[np.float32],
    *,
    dims: int,
    bandwidth: float = SHALLOW_BANDWIDTH,
    prior_weight: float = SHALLOW_PRIOR_WEIGHT,
) -> Arrays:
    """The second vote's arrays (its labels are the first vote's knn_labels)."""
    return neighbour_keys(shallow, dims=dims, prefix="shallow") | {
        "shallow_bandwidth": np.array(bandwidth, dtype=np.float32),
        "shallow_prior_weight": np.array(prior_weight, dtype=np.float32),
    }


def fit_residual_vote(
    linear: Arrays,
    embeddings: npt.NDArray[np.float32],
    cheap: npt.NDArray[np.float32],
    target: F64,
    *,
    bandwidth: float,
    prior_weight: float,
) -> Arrays:
    """The residual vote's arrays: the target minus the linear part's probability on its own
    training rows (in-sample: the linear part is strongly regularised, and no scored prompt is
    among them), for the shallow vote's keys (same rows, same order)."""
    logits = DifficultyClassifier.from_arrays(linear).linear_logits(embeddings, cheap)
    residuals = target - 1.0 / (1.0 + np.exp(-logits))
    return {
        "residual_labels": residuals.astype(np.float16),  # in [-1, 1]; 1e-3 steps are plenty
        "residual_bandwidth": np.array(bandwidth, dtype=np.float32),
        "residual_prior_weight": np.array(prior_weight, dtype=np.float32),
    }


def fit_neighbours(
    embeddings: npt.NDArray[np.float32], target: F64, *, dims: int, bandwidth: float
) -> Arrays:
    return neighbour_keys(embeddings, dims=dims, prefix="knn") | {
        "knn_labels": target.astype(np.float16),  # 0, 1/2, 1: exact in float16
        "knn_k": np.array(len(target)),
        "knn_bandwidth": np.array(bandwidth, dtype=np.float32),
    }


def fit_soft_logistic(x: F64, target: F64, *, seed: int) -> LogisticRegression:
    """Logistic regression on targets in [0, 1]: each row once as 1 (weight t), once as 0 (1-t)."""
    rows = np.concatenate([x, x])
    outcome = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    weight = np.concatenate([target, 1.0 - target])
    keep = weight > 0
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    return model.fit(rows[keep], outcome[keep], sample_weight=weight[keep])


def train_head(
    embeddings: npt.NDArray[np.float32],
    cheap: npt.NDArray[np.float32],
    target: F64,
    strata: npt.NDArray[Any],
    groups: npt.NDArray[np.int64],
    shallow: npt.NDArray[np.float32] | None = None,
    *,
    c: float = DEFAULT_C,
    dims: int = DEFAULT_DIMS,
    bandwidth: float = DEFAULT_BANDWIDTH,
    shallow_bandwidth: float = SHALLOW_BANDWIDTH,
    shallow_prior_weight: float = SHALLOW_PRIOR_WEIGHT,
    residual: tuple[float, float] | None = RESIDUAL,
    seed: int = 0,
) -> tuple[Arrays, F64]:
    """The head's arrays (no metadata) and the training rows' out-of-fold scores.

    `target` is the win target (win_target); the linear part learns its 0/1 part (strong
    better or not), the neighbour votes and the stacker the target itself. Without `shallow`
    (the encoder's shallow views) the head has no second vote and no residual vote; `residual`
    is the residual vote's (bandwidth, prior weight), None for a head without it.
    """
    strong_better = (target == 1.0).astype(np.int64)
    residual = None if shallow is None else residual
    inputs = 3 if shallow is None else 4 + (residual is not None)

    def shallow_parts(rows: npt.NDArray[np.bool_], linear: Arrays) -> Arrays:
        assert shallow is not None
        arrays = fit_shallow_neighbours(
            shallow[rows], dims=dims, bandwidth=shallow_bandwidth, prior_weight=shallow_prior_weight
        )
        if residual is not None:
            arrays |= fit_residual_vote(
                linear,
                embeddings[rows],
                cheap[rows],
                target[rows],
                bandwidth=residual[0],
                prior_weight=residual[1],
            )
        return arrays

    # Out-of-fold outputs of all parts, so the stacker weighs them as on unseen prompts.
    fold_of = grouped_folds(strata, groups, INNER_FOLDS, seed + 1)
    stack_x = np.zeros((len(target), inputs))
    stack_x[:, 2] = cheap[:, TOKENS_FEATURE]
    for fold in range(INNER_FOLDS):
        test = fold_of == fold
        train = ~test
        linear = fit_linear(embeddings[train], cheap[train], strong_better[train], c=c, seed=seed)
        arrays = (
            linear
            | fit_neighbours(embeddings[train], target[train], dims=dims, bandwidth=bandwidth)
            | {"stack_w": np.zeros(inputs, dtype=np.float32), "stack_b": np.array(0.0)}
        )
        if shallow is not None:
            arrays |= shallow_parts(train, linear)
        part = DifficultyClassifier.from_arrays(arrays)
        assert part.neighbours is not None
        stack_x[test, 0] = part.linear_logits(embeddings[test], cheap[test])
        stack_x[test, 1] = neighbour_logit(part.neighbours.share(embeddings[test]))
        if shallow is not None:
            share, residual_share = part.shallow_votes(shallow[test], int(test.sum()))
            stack_x[test, 3] = neighbour_logit(share)
            if residual_share is not None:
                stack_x[test, 4] = residual_share
    stacker = fit_soft_logistic(stack_x, target, seed=seed)
    stacked = stacker.decision_function(stack_x)
    # One slope and offset, fitted to the 0/1 label: the order of scores (all that routing by
    # share uses) stays, and a score reads as P(the small answer is worse).
    calibration = LogisticRegression(C=1e6, max_iter=1000, random_state=seed)
    calibration.fit(stacked[:, None], strong_better)
    slope, offset = float(calibration.coef_[0, 0]), float(calibration.intercept_[0])
    linear = fit_linear(embeddings, cheap, strong_better, c=c, seed=seed)
    arrays = (
        linear
        | fit_neighbours(embeddings, target, dims=dims, bandwidth=bandwidth)
        | {
            "stack_w": (slope * stacker.coef_[0]).astype(np.float32),
            "stack_b": np.array(slope * stacker.intercept_[0] + offset, dtype=np.float32),
        }
    )
    if shallow is not None:
        arrays |= shallow_parts(np.ones(len(target), dtype=bool), linear)
    oof_scores = 1.0 / (1.0 + np.exp(-(slope * stacked + offset)))
    return arrays, np.asarray(oof_scores, dtype=np.float64)


def train_on(data: RoutingDevData, rows: npt.NDArray[np.bool_], seed: int) -> tuple[Arrays, F64]:
    """train_head on a subset of the dev rows (all of them for the shipped head)."""
    return train_head(
        data.embeddings[rows],
        data.cheap[rows],
        win_target(data)[rows],
        fold_strata(data.benchmark, labels(data))[rows],
        data.groups[rows],
        data.shallow[rows],
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DEV_FILE)
    parser.add_argument("--out", type=Path, default=DEFAULT_HEAD_PATH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_dev_data(args.data)
    y = labels(data)
    arrays, oof_scores = train_on(data, np.ones(len(y), dtype=bool), args.seed)
    metadata: dict[str, Any] = {
        "model": (
            "logistic regression + similarity-weighted vote over all prompts "
            f"(PCA-{DEFAULT_DIMS}, int8 keys, bandwidth {DEFAULT_BANDWIDTH:g}) + a second vote "
            f"in the shallow view (layer {SHALLOW_LAYER}, PCA-{DEFAULT_DIMS}, absolute weights "
            f"exp({SHALLOW_BANDWIDTH:g} * (cosine - 1)), prior weight {SHALLOW_PRIOR_WEIGHT:g}) "
            + (
                ""
                if RESIDUAL is None
                else "+ a residual vote over the shallow keys (the linear part's training "
                f"residuals, weights exp({RESIDUAL[0]:g} * (cosine - 1)), prior 0 with weight "
                f"{RESIDUAL[1]:g}) "
            )
            + "+ stacker, recalibrated to the 0/1 label"
        ),
        "target": TARGET_DEFINITION,
        "label": LABEL_DEFINITION,
        "training_data": {
            "file": args.data.name,
            "sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "rows": len(y),
            "positive_rate": round(float(y.mean()), 4),
            "source": "RouteLLM eval data: GSM8K, MMLU, MT-Bench; Mixtral-8x7B vs GPT-4-1106",
            "license": "Apache-2.0",
        },
        "token_counter": "all-MiniLM-L6-v2 WordPiece tokenizer (no special tokens)",
        "embedding": "all-MiniLM-L6-v2, L2-normalised, last user turn",
        "shallow_view": (
            f"all-MiniLM-L6-v2 token states after encoder layer {SHALLOW_LAYER}, mean-pooled, "
            "L2-normalised (float32 reference encoder, 128 tokens)"
        ),
        "seed": args.seed,
        "hyperparameters": {
            "linear_c": DEFAULT_C,
            "pca_dims": DEFAULT_DIMS,
            "bandwidth": DEFAULT_BANDWIDTH,
            "shallow_bandwidth": SHALLOW_BANDWIDTH,
            "shallow_prior_weight": SHALLOW_PRIOR_WEIGHT,
            "residual_bandwidth": None if RESIDUAL is None else RESIDUAL[0],
            "residual_prior_weight": None if RESIDUAL is None else RESIDUAL[1],
        },
        "sklearn": sklearn.__version__,
        # Out-of-fold scores: the shipped head's in-sample scores would be inflated by the
        # neighbour vote finding each training prompt itself.
        "thresholds_by_strong_share": {
            str(share): round(threshold_for_share(oof_scores, share), 6) for share in STRONG_SHARES
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, metadata=np.array(json.dumps(metadata)), **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    print(json.dumps(metadata["thresholds_by_strong_share"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
