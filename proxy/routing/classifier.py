"""The difficulty head: P(the small engine's answer is worse than the large one's) from features.

Scoring is numpy only (no sklearn on the hot path). Three parts, all in one .npz written by
scripts/train_router.py:

- a linear part: a linear model on standardised [embedding (384), cheap features];
- a neighbour vote over the training prompts, compared by cosine in a PCA-reduced embedding
  space (keys stored as int8 to keep the file small): either the mean label of the k nearest
  (`knn_k`), or, when the head has a `knn_bandwidth`, a similarity-weighted mean over *all*
  training prompts with weights exp(bandwidth * (similarity - best similarity)), the way
  RouteLLM's similarity-weighted router weighs its preference data;
- optionally a second vote in another view of the same MiniLM pass (``shallow_*`` arrays: the
  pooled token states after a shallow layer, see ``proxy.cache.verifier.SHALLOW_LAYER``), with
  absolute weights exp(bandwidth * (similarity - 1)) and a prior: the mean label counts as
  ``shallow_prior_weight`` extra neighbours, so a prompt with no close training prompt gets the
  mean (the shallow layers keep much of the wording: far neighbours there say little);
- optionally a residual vote over the same shallow keys (``residual_*`` arrays): the training
  prompts' residuals (target minus the linear part's probability) weighed as in the second vote,
  with 0 (no correction) as its prior, so near wordings say how far the linear part was off;
- a stacker: a logistic regression over [linear output, neighbour logit, log tokens of the last
  turn, the second vote's logit and the residual vote if present], fitted on out-of-fold outputs
  of the other parts so that it weighs them as they do on prompts they have not seen.

A head without the neighbour arrays is a plain logistic regression (the stacker is then unused).

Arrays: feature_names, input_mean, input_scale, out_w, out_b; optionally knn_centre (384,),
knn_projection (384, d), knn_keys (n, d) int8, knn_key_scale (d,), knn_labels (n,) in [0, 1],
knn_k, knn_bandwidth, stack_w (3,), (4,) or (5,), stack_b; optionally shallow_centre,
shallow_projection, shallow_keys, shallow_key_scale, shallow_bandwidth, shallow_prior_weight (the
second vote; its labels are knn_labels); optionally residual_labels (n,), residual_bandwidth,
residual_prior_weight (the residual vote, over the shallow keys); metadata (JSON text: label,
training data, seed, default thresholds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.routing.features import CHEAP_FEATURE_NAMES, EMBEDDING_DIM, RoutingFeatures

DEFAULT_HEAD_PATH = Path(__file__).parent / "artifacts" / "difficulty_head.npz"
# Neighbour shares are pulled this far from 0 and 1 before taking a logit, so a unanimous vote
# among k neighbours stays a finite, comparable input to the stacker.
NEIGHBOUR_SMOOTHING = 0.02
TOKENS_FEATURE = CHEAP_FEATURE_NAMES.index("log_tokens_last_turn")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class ClassifierArtifactError(ValueError):
    """The head file is missing a field or was trained on different features."""


def neighbour_logit(share: npt.ArrayLike) -> F64:
    p = np.asarray(share, dtype=np.float64)
    return np.asarray(
        np.log((p + NEIGHBOUR_SMOOTHING) / (1.0 + NEIGHBOUR_SMOOTHING - p)), dtype=np.float64
    )


def kernel_vote(
    similarity: F32, values: F32, bandwidth: float, prior_weight: float, prior: float
) -> F64:
    """Weighted mean of ``values`` (one per key), weights exp(bandwidth * (similarity - 1)), with
    ``prior`` joining as ``prior_weight`` extra neighbours: (rows,) from (rows, keys)."""
    weights = np.exp(bandwidth * (similarity - 1.0))
    voted = (np.einsum("qk,k->q", weights, values) + prior_weight * prior) / (
        weights.sum(axis=1) + prior_weight
    )
    return np.asarray(voted, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class NeighbourVote:
    """Mean label of the training prompts near a prompt (cosine, PCA space).

    Without a bandwidth: the plain mean over the k nearest. With one: a weighted mean over all
    keys, weight exp(bandwidth * (similarity - best similarity)); k is then unused. With a
    `prior_weight` too: weights exp(bandwidth * (similarity - 1)), and the mean label joins the
    vote with that weight, so the vote falls back to the mean when no key is near.
    """

    centre: F32
    projection: F32
    keys: F32
    labels: F32
    k: int
    bandwidth: float | None = None
    prior_weight: float | None = None
    # The vote of a prompt with no training prompt near: the mean label (fixed with the labels).
    prior: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prior", float(self.labels.mean()))

    def project(self, embeddings: npt.ArrayLike) -> F32:
        reduced = (np.asarray(embeddings, dtype=np.float32) - self.centre) @ self.projection
        norms = np.linalg.norm(reduced, axis=1, keepdims=True)
        return np.asarray(reduced / np.maximum(norms, 1e-12), dtype=np.float32)

    def similarity(self, embeddings: npt.ArrayLike) -> F32:
        """Cosine of each row with each key, in the vote's PCA space: (rows, keys)."""
        # einsum, not `@`: BLAS would split this matrix-vector product over threads, and on a
        # busy host the wait for the second thread costs milliseconds; one core takes ~0.1 ms.
        return np.asarray(np.einsum("qd,kd->qk", self.project(embeddings), self.keys))

    def share(self, embeddings: npt.ArrayLike) -> F64:
        return self.share_of(self.similarity(embeddings))

    def share_of(self, similarity: F32) -> F64:
        """The vote from a similarity matrix (`similarity`), so two votes over the same keys
        compute it once."""
        if self.bandwidth is not None and self.prior_weight is not None:
            return kernel_vote(
                similarity, self.labels, self.bandwidth, self.prior_weight, self.prior
            )
        if self.bandwidth is not None:
            # Relative to the best match, so the largest weight is 1 and exp never overflows.
            weights = np.exp(self.bandwidth * (similarity - similarity.max(axis=1, keepdims=True)))
            voted = np.einsum("qk,k->q", weights, self.labels) / weights.sum(axis=1)
            return np.asarray(voted, dtype=np.float64)
        k = min(self.k, self.keys.shape[0])
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        return np.asarray(self.labels[nearest].mean(axis=1), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class ResidualVote:
    """How far the linear part was off on the training prompts near a prompt: their residuals
    (target minus the linear part's probability), weights exp(bandwidth * (similarity - 1)) over
    the shallow vote's keys, and 0 counted as `prior_weight` extra neighbours, so a prompt with no
    near training prompt gets no correction."""

    residuals: F32
    bandwidth: float
    prior_weight: float

    def vote(self, similarity: F32) -> F64:
        return kernel_vote(similarity, self.residuals, self.bandwidth, self.prior_weight, 0.0)


@dataclass(frozen=True, slots=True)
class DifficultyClassifier:
    input_mean: F32
    input_scale: F32
    out_w: F32
    out_b: float
    metadata: dict[str, Any]
    neighbours: NeighbourVote | None = None
    stack_w: F32 | None = None
    stack_b: float = 0.0
    shallow_neighbours: NeighbourVote | None = None
    residual_vote: ResidualVote | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> DifficultyClassifier:
        """Load a head; the default is the one shipped in proxy/routing/artifacts/."""
        source = DEFAULT_HEAD_PATH if path is None else path
        try:
            with np.load(source, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise ClassifierArtifactError(f"{source}: cannot read difficulty head: {exc}") from exc
        return cls.from_arrays(arrays, source=str(source))

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, npt.NDArray[Any]], *, source: str = "head"
    ) -> DifficultyClassifier:
        missing = {"feature_names", "input_mean", "input_scale", "out_w", "out_b"} - arrays.keys()
        if missing:
            raise ClassifierArtifactError(f"{source}: missing fields {sorted(missing)}")
        names = tuple(str(n) for n in arrays["feature_names"])
        if names != CHEAP_FEATURE_NAMES:
            raise ClassifierArtifactError(
                f"{source}: trained on cheap features {names}, code has {CHEAP_FEATURE_NAMES}"
            )
        n_in = EMBEDDING_DIM + len(CHEAP_FEATURE_NAMES)
        shapes = (arrays["out_w"].shape, arrays["input_mean"].shape, arrays["input_scale"].shape)
        if shapes != ((n_in,), (n_in,), (n_in,)):
            raise ClassifierArtifactError(
                f"{source}: head takes inputs of shapes {shapes}, features have {n_in}"
            )
        neighbours = None
        stack_w = None
        if "knn_keys" in arrays:
            key_scale = arrays["knn_key_scale"].astype(np.float32)
            neighbours = NeighbourVote(
                centre=arrays["knn_centre"].astype(np.float32),
                projection=arrays["knn_projection"].astype(np.float32),
                # int8 on disk; float32 in memory so the similarity is one matmul. Column-major:
                # einsum's one-query product runs ~1.5x faster over it (measured).
                keys=np.asfortranarray(arrays["knn_keys"].astype(np.float32) * key_scale),
                labels=arrays["knn_labels"].astype(np.float32),
                k=int(arrays["knn_k"]),
                bandwidth=float(arrays["knn_bandwidth"]) if "knn_bandwidth" in arrays else None,
            )
            stack_w = arrays["stack_w"].astype(np.float32)
        shallow_neighbours = None
        if neighbours is not None and "shallow_keys" in arrays:
            shallow_neighbours = NeighbourVote(
                centre=arrays["shallow_centre"].astype(np.float32),
                projection=arrays["shallow_projection"].astype(np.float32),
                keys=np.asfortranarray(
                    arrays["shallow_keys"].astype(np.float32)
                    * arrays["shallow_key_scale"].astype(np.float32)
                ),
                labels=neighbours.labels,
                k=neighbours.k,
                bandwidth=float(arrays["shallow_bandwidth"]),
                prior_weight=float(arrays["shallow_prior_weight"]),
            )
        residual_vote = None
        if shallow_neighbours is not None and "residual_labels" in arrays:
            residuals = arrays["residual_labels"].astype(np.float32)
            if residuals.shape != shallow_neighbours.labels.shape:
                raise ClassifierArtifactError(
                    f"{source}: residual_labels has shape {residuals.shape}, the shallow keys "
                    f"{shallow_neighbours.labels.shape}"
                )
            residual_vote = ResidualVote(
                residuals=residuals,
                bandwidth=float(arrays["residual_bandwidth"]),
                prior_weight=float(arrays["residual_prior_weight"]),
            )
        inputs = 3 + (shallow_neighbours is not None) + (residual_vote is not None)
        if stack_w is not None and stack_w.shape != (inputs,):
            raise ClassifierArtifactError(
                f"{source}: stacker has {stack_w.shape[0]} weights for {inputs} inputs"
            )
        metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
        return cls(
            input_mean=arrays["input_mean"].astype(np.float32),
            input_scale=arrays["input_scale"].astype(np.float32),
            out_w=arrays["out_w"].astype(np.float32),
            out_b=float(arrays["out_b"]),
            metadata=metadata,
            neighbours=neighbours,
            stack_w=stack_w,
            stack_b=float(arrays["stack_b"]) if "stack_b" in arrays else 0.0,
            shallow_neighbours=shallow_neighbours,
            residual_vote=residual_vote,
        )

    @property
    def default_thresholds(self) -> dict[float, float]:
        """Offline thresholds by strong share (out-of-fold scores of the training prompts)."""
        table = self.metadata.get("thresholds_by_strong_share", {})
        return {float(share): float(t) for share, t in table.items()}

    def score(self, features: RoutingFeatures) -> float:
        """P(small is worse than large) for one request, in [0, 1]."""
        shallow = None if features.shallow is None else features.shallow[None, :]
        return float(
            self.score_arrays(features.embedding[None, :], features.cheap[None, :], shallow)[0]
        )

    def score_batch(self, features: Sequence[RoutingFeatures]) -> F64:
        if not features:
            return np.zeros(0, dtype=np.float64)
        embeddings = np.stack([f.embedding for f in features])
        cheap = np.stack([f.cheap for f in features])
        if any(f.shallow is None for f in features):
            return np.array([self.score(f) for f in features], dtype=np.float64)
        shallow = np.stack([f.shallow for f in features if f.shallow is not None])
        return self.score_arrays(embeddings, cheap, shallow)

    def linear_logits(self, embeddings: npt.ArrayLike, cheap: npt.ArrayLike) -> F64:
        raw = np.concatenate(
            [np.asarray(embeddings, dtype=np.float32), np.asarray(cheap, dtype=np.float32)], axis=1
        )
        x = (raw - self.input_mean) / self.input_scale
        return np.asarray(x @ self.out_w, dtype=np.float64) + self.out_b

    def shallow_share(self, shallow: npt.ArrayLike | None, rows: int) -> F64:
        """The second vote; without the shallow view (an encoder that does not compute it) every
        row gets the vote of a prompt with no near neighbour, the mean label."""
        return self.shallow_votes(shallow, rows)[0]

    def shallow_votes(self, shallow: npt.ArrayLike | None, rows: int) -> tuple[F64, F64 | None]:
        """The second vote and the residual vote (None if the head has none), from one
        similarity matrix; without the shallow view, those of a prompt with no near neighbour
        (the mean label, no correction)."""
        assert self.shallow_neighbours is not None
        if shallow is None:
            share = np.full(rows, self.shallow_neighbours.prior, dtype=np.float64)
            residual = None if self.residual_vote is None else np.zeros(rows, dtype=np.float64)
            return share, residual
        similarity = self.shallow_neighbours.similarity(shallow)
        share = self.shallow_neighbours.share_of(similarity)
        if self.residual_vote is None:
            return share, None
        return share, self.residual_vote.vote(similarity)

    def score_arrays(
        self, embeddings: npt.ArrayLike, cheap: npt.ArrayLike, shallow: npt.ArrayLike | None = None
    ) -> F64:
        """Scores of a batch: embeddings (n, 384), cheap features (n, len(CHEAP_FEATURE_NAMES)),
        shallow views (n, 384) or None."""
        logits = self.linear_logits(embeddings, cheap)
        if self.neighbours is not None and self.stack_w is not None:
            columns = [
                logits,
                neighbour_logit(self.neighbours.share(embeddings)),
                np.asarray(cheap, dtype=np.float64)[:, TOKENS_FEATURE],
            ]
            if self.shallow_neighbours is not None:
                share, residual = self.shallow_votes(shallow, len(logits))
                columns.append(neighbour_logit(share))
                if residual is not None:
                    columns.append(residual)
            stacked = np.stack(columns, axis=1)
            logits = stacked @ self.stack_w.astype(np.float64) + self.stack_b
        # Clipped so exp never overflows; beyond +-40 the probability is 0 or 1 anyway.
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(logits, -40.0, 40.0))), dtype=np.float64)
