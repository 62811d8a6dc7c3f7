"""Train the difficulty head on the routing dev data and write it as a numpy .npz.

    .venv/bin/python scripts/train_router.py [--data ../shared/data/routing_dev.csv.gz]
        [--out proxy/routing/artifacts/difficulty_head.npz] [--seed 0]

Label: 1 when the strong model's score beats the weak model's (strong_score > weak_score), else 0.
For GSM8K/MMLU that is "GPT-4 right and Mixtral wrong"; for MT-Bench "GPT-4 judged higher".
The head (see proxy/routing/classifier.py) = logistic regression on [MiniLM embedding, cheap
features] + a k-nearest-neighbour vote in a PCA-reduced embedding space + a stacker fitted on
out-of-fold outputs of both. Deterministic for a given seed and data file.
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

from proxy.routing.calibrate import threshold_for_share
from proxy.routing.classifier import (
    DEFAULT_HEAD_PATH,
    TOKENS_FEATURE,
    DifficultyClassifier,
    neighbour_logit,
)
from proxy.routing.features import CHEAP_FEATURE_NAMES
from scripts.routing_data import DEFAULT_DEV_FILE, RoutingDevData, load_dev_data

LABEL_DEFINITION = "strong_score > weak_score (the small/weak answer is worse than the strong one)"
STRONG_SHARES = (0.1, 0.2, 0.3, 0.5)
# Chosen by 5-fold APGR on the dev data (exploration notes in docs/benchmarks.md).
DEFAULT_C = 0.003  # inverse L2 strength of the linear part: strong, the labels are noisy
DEFAULT_DIMS = 64  # PCA dimensions of the neighbour keys (int8: n * 64 bytes)
DEFAULT_K = 50  # neighbours per vote
INNER_FOLDS = 5

Arrays = dict[str, npt.NDArray[Any]]


def labels(data: RoutingDevData) -> npt.NDArray[np.int64]:
    return (data.strong > data.weak).astype(np.int64)


def stratified_folds(
    strata: npt.NDArray[Any], y: npt.NDArray[np.int64], folds: int, seed: int
) -> npt.NDArray[np.int64]:
    """Fold number per row; each (stratum, label) group is dealt round-robin after a shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for key in sorted(set(zip(strata.tolist(), y.tolist(), strict=True))):
        members = np.flatnonzero((strata == key[0]) & (y == key[1]))
        fold_of[rng.permutation(members)] = np.arange(members.size) % folds
    return fold_of


def fit_linear(
    embeddings: npt.NDArray[np.float32],
    cheap: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    c: float,
    seed: int,
) -> Arrays:
    x = np.concatenate([embeddings, cheap], axis=1).astype(np.float32)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0  # a constant column carries no information; keep it finite
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed)
    model.fit((x - mean) / scale, y)
    return {
        "feature_names": np.array(CHEAP_FEATURE_NAMES),
        "input_mean": mean.astype(np.float32),
        "input_scale": scale.astype(np.float32),
        "out_w": model.coef_[0].astype(np.float32),
        "out_b": np.array(model.intercept_[0], dtype=np.float32),
    }


def fit_neighbours(
    embeddings: npt.NDArray[np.float32], y: npt.NDArray[np.int64], *, dims: int, k: int
) -> Arrays:
    centre = embeddings.mean(axis=0)
    # PCA by SVD: deterministic up to the sign of each axis, which cosine similarity ignores.
    _, _, vt = np.linalg.svd(embeddings - centre, full_matrices=False)
    projection = vt[:dims].T.astype(np.float32)
    reduced = (embeddings - centre) @ projection
    reduced /= np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)
    key_scale = np.abs(reduced).max(axis=0) / 127.0
    keys = np.round(reduced / key_scale).astype(np.int8)
    return {
        "knn_centre": centre.astype(np.float32),
        "knn_projection": projection.astype(np.float16),
        "knn_keys": keys,
        "knn_key_scale": key_scale.astype(np.float32),
        "knn_labels": y.astype(np.uint8),
        "knn_k": np.array(k),
    }


def train_head(
    embeddings: npt.NDArray[np.float32],
    cheap: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    strata: npt.NDArray[Any],
    *,
    c: float = DEFAULT_C,
    dims: int = DEFAULT_DIMS,
    k: int = DEFAULT_K,
    seed: int = 0,
) -> tuple[Arrays, npt.NDArray[np.float64]]:
    """The head's arrays (no metadata) and the training rows' out-of-fold scores."""
    # Out-of-fold outputs of both parts, so the stacker weighs them as on unseen prompts.
    fold_of = stratified_folds(strata, y, INNER_FOLDS, seed + 1)
    linear_oof = np.zeros(len(y))
    share_oof = np.zeros(len(y))
    for fold in range(INNER_FOLDS):
        test = fold_of == fold
        train = ~test
        part = DifficultyClassifier.from_arrays(
            fit_linear(embeddings[train], cheap[train], y[train], c=c, seed=seed)
            | fit_neighbours(embeddings[train], y[train], dims=dims, k=k)
            | {"stack_w": np.zeros(3, dtype=np.float32), "stack_b": np.array(0.0)}
        )
        assert part.neighbours is not None
        linear_oof[test] = part.linear_logits(embeddings[test], cheap[test])
        share_oof[test] = part.neighbours.share(embeddings[test])
    stack_x = np.stack(
        [linear_oof, neighbour_logit(share_oof), cheap[:, TOKENS_FEATURE].astype(np.float64)],
        axis=1,
    )
    stacker = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(stack_x, y)
    arrays = (
        fit_linear(embeddings, cheap, y, c=c, seed=seed)
        | fit_neighbours(embeddings, y, dims=dims, k=k)
        | {
            "stack_w": stacker.coef_[0].astype(np.float32),
            "stack_b": np.array(stacker.intercept_[0], dtype=np.float32),
        }
    )
    return arrays, stacker.predict_proba(stack_x)[:, 1].astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DEV_FILE)
    parser.add_argument("--out", type=Path, default=DEFAULT_HEAD_PATH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_dev_data(args.data)
    y = labels(data)
    arrays, oof_scores = train_head(data.embeddings, data.cheap, y, data.benchmark, seed=args.seed)
    metadata: dict[str, Any] = {
        "model": "logistic regression + 50-NN vote (PCA-64, int8 keys) + stacker",
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
        "seed": args.seed,
        "hyperparameters": {"c": DEFAULT_C, "pca_dims": DEFAULT_DIMS, "k": DEFAULT_K},
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
