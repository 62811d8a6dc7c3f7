"""Pair scorer for the semantic cache: MiniLM's top layers read query and candidate together.

The bi-encoder verifier compares two independent vectors, so it cannot see how the words of one
question line up with the other's ("convert a list to a set" / "convert a set to a list"). This
model joins the two questions' token states after MiniLM's frozen lower layers (the same states
the embedding pass computes) into one sequence, marks the candidate's tokens with a learned segment
vector, and runs the top ``NUM_LAYERS - TUNED_LAYERS`` layers over the joined pair, so they attend
across it (a late-interaction cross-encoder). A linear classifier over the pooled pair and the two
pooled halves (``[joint, |u - v|, u * v]``) gives a same-question logit.

The artifact holds only the tuned top layers, the segment vector and the classifier (fp16, ~7 MB);
the embeddings and lower layers are the base model's. Trained by ``scripts/train_cross_encoder.py``
on the tune half of the dev pairs, starting from the bi-encoder verifier's tuned layers.

Cost: one lower-layer pass over both questions plus the top layers over the joined pair, about one
embedding pass per (query, candidate); the verifier runs it only on candidates that already passed
the cheap checks (see :class:`proxy.cache.verifier.Verifier`). Synchronous; call it from a worker
thread. This class is the reference (float32, padded; training shares :func:`joint_forward`); the
proxy serves with :class:`proxy.cache.packed_encoder.PackedCrossEncoder`, the same function on the
packed runtime, which reuses the query's lower states from its embedding pass.

Usage::

    cross = CrossEncoder.load(ARTIFACT_DIR / CROSS_FILE, encoder)
    logits = cross.logits([("how do I exit vim", "how to quit the vim editor")])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from proxy.cache.verifier import (
    CROSS_FILE,
    NUM_LAYERS,
    TUNED_LAYERS,
    MiniLMEncoder,
    layer_forward,
    mask_bias_for,
    top_layer_prefix,
)

if TYPE_CHECKING:
    import torch

__all__ = ["CROSS_FILE", "CrossEncoder", "joint_forward"]

CLASSIFIER_WEIGHT = "cross.classifier.weight"
CLASSIFIER_BIAS = "cross.classifier.bias"
SEGMENT = "cross.segment"
FIRST_JOINT_LAYER = NUM_LAYERS - TUNED_LAYERS


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.unsqueeze(-1).to(x.dtype)
    return (x * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


def joint_forward(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    candidate: torch.Tensor,
    candidate_mask: torch.Tensor,
    tuned: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Same-question logits (batch,) from the two questions' lower-layer token states.

    Shared by serving (inference mode) and training (``tuned`` holds tensors that need grad).
    """
    import torch
    import torch.nn.functional as F

    x = torch.cat([query, candidate + tuned[SEGMENT]], dim=1)
    mask = torch.cat([query_mask, candidate_mask], dim=1)
    bias = mask_bias_for(mask, x.dtype)
    for index in range(FIRST_JOINT_LAYER, NUM_LAYERS):
        x = layer_forward(x, bias, tuned, top_layer_prefix(index))
    split = query.shape[1]
    u = masked_mean(x[:, :split], query_mask)
    v = masked_mean(x[:, split:], candidate_mask)
    pooled = torch.cat([masked_mean(x, mask), (u - v).abs(), u * v], dim=-1)
    return F.linear(pooled, tuned[CLASSIFIER_WEIGHT], tuned[CLASSIFIER_BIAS]).squeeze(-1)


@dataclass(slots=True)
class CrossEncoder:
    """The loaded pair scorer over ``encoder``'s lower layers (shared with the embedding pass)."""

    encoder: MiniLMEncoder
    tuned: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: Path, encoder: MiniLMEncoder) -> CrossEncoder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from safetensors.torch import load_file

        tuned = {k: v.float() for k, v in load_file(str(path)).items()}
        if CLASSIFIER_WEIGHT not in tuned or SEGMENT not in tuned:
            raise ValueError(f"{path}: not a cross-encoder artifact (no {CLASSIFIER_WEIGHT})")
        return cls(encoder, tuned)

    def logits(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> NDArray[np.float64]:
        """Same-question logit of each (query, candidate) pair, in input order (batched)."""
        import torch

        out = np.zeros(len(pairs), dtype=np.float64)
        if not pairs:
            return out
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                # One lower pass over both sides of the chunk, then the joint top layers.
                ids, mask = self.encoder.tokenize(
                    [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
                )
                hidden = self.encoder.lower(ids, mask)
                n = len(chunk)
                values = joint_forward(hidden[:n], mask[:n], hidden[n:], mask[n:], self.tuned)
                out[chunk] = values.double().numpy()
        return out
