"""The encoder's shallow views, kept for the router beside the embedding that flows to it.

The embedding worker hands the request path one vector per text (the base embedding, which the
cache also uses), but the fused MiniLM pass computes more: the difficulty head's second vote reads
the pass's shallow view (``proxy.cache.verifier.EncodedBatch.shallow``). The encode function
remembers each shallow view under its base embedding's bytes, and the router looks it up with
the embedding it is given, so the two always come from the same pass (a text key would depend
on how each side extracts the text). A view that is not (or no longer) here is scored as a
prompt with no near neighbour in that view (``DifficultyClassifier.shallow_share``).

Thread-safe: the encoder remembers from the worker's threads, the router reads on the event loop.

    views = ShallowViews()
    views.remember(batch.base, batch.shallow)        # in the encode function
    shallow = views.get(embedding)                   # in the router, None if unknown
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from proxy.recent import Recent

if TYPE_CHECKING:
    from proxy.cache.packed_encoder import Precision

DEFAULT_CAPACITY = 4096


def _key(embedding: npt.NDArray[np.float32]) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(embedding).tobytes(), digest_size=16).digest()


class ShallowViews:
    """A bounded map from a base embedding to the shallow view of the same pass (least recently
    used out)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._views: Recent[bytes, npt.NDArray[np.float32]] = Recent(capacity)

    def __len__(self) -> int:
        return len(self._views)

    def remember(
        self, embeddings: npt.NDArray[np.float32], views: npt.NDArray[np.float32] | None
    ) -> None:
        """Keep each row of `views` under the matching row of `embeddings` (None: nothing)."""
        if views is None:
            return
        if embeddings.shape != views.shape:
            raise ValueError(f"{embeddings.shape[0]} embeddings but views of shape {views.shape}")
        self._views.put_all(zip([_key(row) for row in embeddings], views, strict=True))

    def get(self, embedding: npt.ArrayLike) -> npt.NDArray[np.float32] | None:
        """The view remembered for `embedding`, now the most recent (as the embedding worker's
        own memory keeps a repeated text's vector), or None."""
        return self._views.get(_key(np.asarray(embedding, dtype=np.float32).reshape(-1)))


def load_encoder_with_views(
    views: ShallowViews, precision: Precision = "auto"
) -> Callable[[list[str]], npt.NDArray[np.float32]]:
    """The base MiniLM encoder (no verifier layers) as an ``encode`` function that also remembers
    each text's shallow view in `views`: for a router whose head reads the view when the semantic
    cache, whose fused encoder otherwise provides it, is off."""
    import torch

    from proxy.cache.packed_encoder import PackedEncoder
    from proxy.cache.verifier import MiniLMEncoder

    torch.set_num_threads(1)  # as for the fused encoder: the worker splits large batches itself
    encoder = PackedEncoder(MiniLMEncoder.load(), precision=precision)
    encoder.warm_up()

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        batch = encoder.encode(texts)
        views.remember(batch.base, batch.shallow)
        return batch.base

    return encode
