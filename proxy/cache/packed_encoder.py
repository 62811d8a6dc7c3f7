"""Fast inference runtime for the fused MiniLM + verifier encoder.

:class:`PackedEncoder` computes what :meth:`proxy.cache.verifier.MiniLMEncoder.encode` computes,
from the same weights, in less CPU time; it changes how the numbers are computed, not the model:

* **No padding at all.** The tokens of a batch are packed into one ``(tokens, hidden)`` matrix
  for the linear layers, LayerNorm and GELU (most of the work); attention runs text by text over
  each text's own rows. A padded batch of 64 questions spent over half its time on padding, and
  attention padded to groups' longest texts cost as much as all the dense layers.
* **bfloat16 matrix products** where the CPU has them natively (AVX512-BF16, AMX): weights and
  matmul inputs in bfloat16, accumulation, residual stream, LayerNorm, attention scores and pooling
  in float32. The embeddings move by about 1e-5 in cosine (measured: min cosine 0.99997 to the
  float32 pass over 512 questions), far below what the thresholds can see; ``dtype="float32"``
  keeps the exact reference numbers (it is the fallback on CPUs without native bfloat16, where
  bfloat16 is emulated and slow).
* **Fused projections.** Query, key and value are one matrix product; bfloat16 weights are
  prepacked in oneDNN's layout once (not reordered on every call) and GELU is fused into the
  intermediate product.
* **Few distinct shapes.** oneDNN builds a kernel for each new row count of a product (0.3-0.6 ms
  each, four per row count), and keeps the last 1,024 it built. A batch's rows are rounded up to a
  multiple of ``ROW_BUCKET`` (zero rows, cut before pooling), so batches reuse a bounded set of
  shapes instead of evicting the ones lone texts use, and :meth:`PackedEncoder.warm_shapes`
  builds every lone text's shapes (1 to ``MAX_TOKENS`` rows) once at start-up, not in a user's
  request.
* **int8, opt-in** (``precision="int8"``): weights int8 with one scale per output channel, inputs
  quantized on the fly with one scale per product (fbgemm's dynamic linear; VNNI). About a quarter
  less CPU than bfloat16, but it moves the embeddings by ~6e-3 in cosine, enough to cost the
  verifier recall, and a text's vector then depends slightly on the other texts of its batch (the
  input scale is the whole batch's). Never picked by ``auto``.

Thread-safe: no state changes after construction, so several threads may encode different batches
at once (the embedding worker splits a large batch that way, one torch thread each). With
``split_single`` a lone text also uses a helper thread for its tuned stack (and, when long, for half
of its shared layers' rows).

    encoder = PackedEncoder(MiniLMEncoder.load(...))     # or Verifier.load().encoder
    batch = encoder.encode(["how do I reverse a list in python"])   # EncodedBatch(base, verifier)
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from typing import TYPE_CHECKING, Literal

import numpy as np

from proxy.cache.cross_encoder import (
    CLASSIFIER_BIAS,
    CLASSIFIER_WEIGHT,
    FIRST_JOINT_LAYER,
    SEGMENT,
    CrossEncoder,
)
from proxy.cache.verifier import (
    HEADS,
    HIDDEN,
    LAYER_NORM_EPS,
    MAX_TOKENS,
    NUM_LAYERS,
    SHALLOW_LAYER,
    EncodedBatch,
    MiniLMEncoder,
    Verifier,
    top_layer_prefix,
)
from proxy.recent import Recent

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "float32", "bfloat16", "int8"]
# What the products actually run in ("auto" resolved).
Compute = Literal["float32", "bfloat16", "int8"]

_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.")
log = logging.getLogger(__name__)


def bfloat16_is_native() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (else bf16 is emulated, slow)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: Precision) -> Compute:
    if precision == "auto":
        return "bfloat16" if bfloat16_is_native() else "float32"
    return precision


def layer_indices(weights: Mapping[str, object]) -> list[int]:
    """Encoder layer numbers present in a checkpoint's keys, ascending."""
    return sorted({int(m.group(1)) for key in weights if (m := _LAYER_KEY.match(key))})


# The tokens of one text in a packed batch: rows [start, end).
_Span = tuple[int, int]
HEAD_DIM = HIDDEN // HEADS
# A batch's rows beyond one text's maximum are rounded up to a multiple of this (see module doc).
ROW_BUCKET = 8
# A lone text of at least this many tokens has its shared layers' rows split over two threads
# (one barrier a layer). Measured alone (scripts/bench_lone_split.py): 0.5 ms saved at 64-79
# tokens, 1.0 at 80-95, 1.9 at 112-128; none at 48-63, and below that the barriers cost more
# than the halved products save.
SPLIT_ROWS = 64
# A barrier waits at most this long for the other thread (a bug must not hang the encoder).
_BARRIER_TIMEOUT_S = 30.0
# The proxy's ``split_idle_s``: after this long without a pass, a long lone text's rows are not
# split (its two top stacks still are). On these 2-vCPU VMs the row split's two threads, which
# meet once a layer and hand the GIL back and forth for its eager products, are slow to meet after
# the machine has idled. 80-95-token texts alone / with the helper, one pass after each pause
# (encoder alone, 2026-11-29): 0 ms pause 9.1 / 7.1 ms, 10 ms 8.8 / 7.4, 20 ms 9.5 / 11.4, 50 ms
# 9.8 / 11.4. In the proxy with 50 ms between requests, texts of 64 tokens or more: 10.5-10.9 ms
# median with the split, 9.6-9.8 without it; shorter texts 4.9 with the top stacks on two
# threads, 5.3 without (so those stay).
SPLIT_IDLE_S = 0.008


def padded_rows(rows: int) -> int:
    """The row count a packed batch of ``rows`` tokens is computed with: exact up to one text's
    maximum (those shapes are warmed), else rounded up to a multiple of ``ROW_BUCKET``."""
    if rows <= MAX_TOKENS:
        return rows
    return -(-rows // ROW_BUCKET) * ROW_BUCKET


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The bfloat16 weight in oneDNN's own blocked layout, or None where that is unavailable.

    A plain bfloat16 product reorders the weight into that layout on every call; at the few
    dozen rows of a lone question the reorder cost about a fifth of the product.
    """
    import torch

    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):
        return None


class _Linear:
    """``x @ W.T + b`` (optionally followed by exact GELU) with the weight stored once in the
    compute dtype; bfloat16 weights are prepacked for oneDNN, which also fuses the GELU; int8
    weights (one scale per output channel) are prepacked for fbgemm, which quantizes each input
    on the fly (one scale per call) and accumulates in int32."""

    __slots__ = ("bias", "dtype", "gelu", "packed", "quantized", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        compute: Compute,
        *,
        gelu: bool = False,
    ) -> None:
        import torch

        self.dtype = torch.bfloat16 if compute == "bfloat16" else torch.float32
        self.weight = weight.to(self.dtype).contiguous()
        self.bias = bias.to(self.dtype).contiguous()
        self.gelu = gelu
        self.packed = _prepack(self.weight) if compute == "bfloat16" else None
        self.quantized = _quantize(self.weight, self.bias) if compute == "int8" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if self.quantized is not None:
            y = torch.ops.quantized.linear_dynamic(x, self.quantized, False)
            return F.gelu(y) if self.gelu else y
        x = x.to(self.dtype)
        if self.packed is not None:
            # GELU on the float32 accumulator, before the output is rounded to bfloat16.
            attr = "gelu" if self.gelu else "none"
            return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
                x, self.packed, self.bias, attr, [], "none" if self.gelu else ""
            )
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.gelu else y


def _quantize(weight: torch.Tensor, bias: torch.Tensor) -> object:
    """The weight as symmetric int8 with one scale per output channel, prepacked for the
    quantized engine's dynamic linear (VNNI: 4 int8 products per 32-bit lane, against 2 bf16)."""
    import warnings

    import torch

    scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # quantized tensors are deprecated as a user type; the prepacked op is what runs
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, bias)


class _Layer:
    """One BERT layer (post-LayerNorm, exact GELU) over packed tokens."""

    def __init__(self, weights: Mapping[str, torch.Tensor], prefix: str, compute: Compute) -> None:
        import torch

        def w(name: str) -> torch.Tensor:
            return weights[prefix + name].float()

        parts = ("query", "key", "value")
        self.qkv = _Linear(
            torch.cat([w(f"attention.self.{p}.weight") for p in parts]),
            torch.cat([w(f"attention.self.{p}.bias") for p in parts]),
            compute,
        )
        self.attention_out = _Linear(
            w("attention.output.dense.weight"), w("attention.output.dense.bias"), compute
        )
        self.norm1 = (w("attention.output.LayerNorm.weight"), w("attention.output.LayerNorm.bias"))
        self.intermediate = _Linear(
            w("intermediate.dense.weight"), w("intermediate.dense.bias"), compute, gelu=True
        )
        self.output = _Linear(w("output.dense.weight"), w("output.dense.bias"), compute)
        self.norm2 = (w("output.LayerNorm.weight"), w("output.LayerNorm.bias"))
        # This layer as the arguments of one TorchScript call (proxy/cache/scripted_layers.py):
        # its tensors and whether they are prepacked bfloat16; None where it cannot run there.
        self.scripted = self._script_arguments(compute)

    def _script_arguments(self, compute: Compute) -> tuple[list[torch.Tensor], bool] | None:
        linears = (self.qkv, self.attention_out, self.intermediate, self.output)
        if compute == "float32":
            weights = [linear.weight for linear in linears]
        elif compute == "bfloat16" and all(linear.packed is not None for linear in linears):
            weights = [linear.packed for linear in linears if linear.packed is not None]
        else:
            return None  # int8 (its prepacked weights are no tensors), or no oneDNN prepacking
        qkv, attention_out, intermediate, output = weights
        return [
            qkv, self.qkv.bias, attention_out, self.attention_out.bias, *self.norm1,
            intermediate, self.intermediate.bias, output, self.output.bias, *self.norm2,
        ], compute == "bfloat16"  # fmt: skip

    def __call__(self, x: torch.Tensor, spans: Sequence[_Span]) -> torch.Tensor:
        return self.finish(x, _attend(self.project(x), spans))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Query, key and value of each row (float32)."""
        return self.qkv(x).float()

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention; row by row, so any rows may go alone."""
        import torch
        import torch.nn.functional as F

        # torch.add promotes the bfloat16 product to float32 in the same pass (exact).
        x = F.layer_norm(
            torch.add(x, self.attention_out(attended)), (HIDDEN,), *self.norm1, LAYER_NORM_EPS
        )
        inner = self.intermediate(x)
        return F.layer_norm(
            torch.add(x, self.output(inner)), (HIDDEN,), *self.norm2, LAYER_NORM_EPS
        )


def _attend(qkv: torch.Tensor, spans: Sequence[_Span]) -> torch.Tensor:
    """Self-attention of each text over its own tokens, in float32, no padding and no mask.

    One text at a time measured faster than padded groups at every batch size: a group is padded
    to its longest text and attention grows with the square of the length (a group of 16 mixed
    questions up to 128 tokens spent 13x the time of the texts alone).
    """
    import torch

    out = qkv.new_empty(qkv.shape[0], HIDDEN)
    if spans and spans[-1][1] < qkv.shape[0]:
        out[spans[-1][1] :].zero_()  # a batch's padding rows: keep them finite
    scale = HEAD_DIM**-0.5
    for start, end in spans:
        n = end - start
        q, k, v = qkv[start:end].view(n, 3, HEADS, HEAD_DIM).permute(1, 2, 0, 3)
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # (heads, n, n)
        context = torch.bmm(torch.softmax(scores, dim=-1), v)  # (heads, n, head_dim)
        out[start:end].view(n, HEADS, HEAD_DIM).copy_(context.transpose(0, 1))
    return out


def _attend_rows(qkv: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Attention of one text's rows ``[start, end)`` over all of its rows (``qkv`` holds that
    one text): the same numbers as :func:`_attend` gives those rows."""
    import torch

    n, rows = qkv.shape[0], end - start
    q = qkv[start:end].view(rows, 3, HEADS, HEAD_DIM)[:, 0].transpose(0, 1)
    keys_values = qkv.view(n, 3, HEADS, HEAD_DIM)
    k, v = keys_values[:, 1].transpose(0, 1), keys_values[:, 2].transpose(0, 1)
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(HEAD_DIM**-0.5)  # (heads, rows, n)
    context = torch.bmm(torch.softmax(scores, dim=-1), v)  # (heads, rows, head_dim)
    return context.transpose(0, 1).reshape(rows, HIDDEN)


class PackedEncoder(MiniLMEncoder):
    """Drop-in :class:`MiniLMEncoder` for inference: same weights, faster ``encode``; its outputs
    equal the reference's in float32 and stay within about 3e-5 in cosine in bfloat16.

    The split between shared and tuned layers is read from the tuned checkpoint's keys, so a
    verifier retrained with more or fewer tuned layers loads unchanged.

    ``split_single=True`` runs a lone text's two top stacks (base and tuned) at the same time on
    two threads after the shared layers: its latency drops by the stacks' share (a quarter of the
    pass) when a second core is free, at the cost of one helper thread (:meth:`close` ends it).
    A lone text of ``SPLIT_ROWS`` tokens or more also has the shared layers' rows split between
    the two threads (the long questions are a lone lookup's slowest).
    Batches of several texts are not split here: the embedding worker spreads those already.
    """

    __slots__ = (
        "_embed",
        "_helper",
        "_helper_free",
        "_last_pass",
        "_lower",
        "_split_idle_s",
        "_tokens",
        "_top_base",
        "_top_tuned",
        "compute",
        "on_lower",
    )

    def __init__(
        self,
        encoder: MiniLMEncoder,
        *,
        precision: Precision = "auto",
        split_single: bool = False,
        split_idle_s: float | None = None,
    ) -> None:
        import torch

        super().__init__(encoder.tokenizer, encoder.weights, encoder.tuned)
        self.compute = resolve_precision(precision)
        from proxy.cache import scripted_layers  # noqa: F401  (compiled here, not in a request)

        # A private copy of the tokenizer without padding: packed batches need none.
        tokens = type(encoder.tokenizer).from_str(encoder.tokenizer.to_str())
        tokens.no_padding()
        self._tokens = tokens
        weights = encoder.weights
        all_layers = layer_indices(weights)
        tuned = layer_indices(encoder.tuned)
        first_tuned = tuned[0] if tuned else len(all_layers)
        if tuned and tuned != all_layers[first_tuned:]:
            raise ValueError(f"tuned layers {tuned} are not the top of {all_layers}")
        if first_tuned <= SHALLOW_LAYER:
            raise ValueError(f"the router's shallow layer {SHALLOW_LAYER} must be a shared layer")
        self._embed = {
            name: weights[f"embeddings.{name}"].float()
            for name in (
                "word_embeddings.weight",
                "position_embeddings.weight",
                "token_type_embeddings.weight",
                "LayerNorm.weight",
                "LayerNorm.bias",
            )
        }
        self._lower = [_Layer(weights, f"encoder.layer.{i}.", self.compute) for i in all_layers]
        self._top_base = self._lower[first_tuned:]
        self._lower = self._lower[:first_tuned]
        self._top_tuned = [
            _Layer(encoder.tuned, f"encoder.layer.{i}.", self.compute) for i in tuned
        ]
        self._helper = (
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="encoder-top",
                # as many intra-op threads as the thread building the encoder (the proxy: 1)
                initializer=torch.set_num_threads,
                initargs=(torch.get_num_threads(),),
            )
            if split_single and self._top_tuned
            else None
        )
        # Held while the helper runs a stack: a second lone text (another thread) does not queue
        # behind it but runs both stacks itself.
        self._helper_free = threading.Lock()
        # A long lone text's rows are not split when no pass has ended for this long (None:
        # always split).
        self._split_idle_s = split_idle_s
        self._last_pass = -math.inf  # when the latest pass ended (perf_counter; any thread)
        # Receives each encoded text's states after the lower layers (the cross-encoder's input).
        self.on_lower: Callable[[Iterable[tuple[str, torch.Tensor]]], None] | None = None

    @property
    def precision(self) -> str:
        return self.compute

    @property
    def shared_layers(self) -> int:
        """The lower layers the base and tuned stacks share (those :meth:`lower_states` runs)."""
        return len(self._lower)

    def warm_shapes(self) -> None:
        """Build oneDNN's kernels for every row count a lone text can have (bfloat16 only: the
        float32 and int8 products need no per-shape build). A text of a length not seen before
        otherwise pays 2-3 ms for them inside its request. All layers share the four product
        shapes, so one layer's products cover them; about half a second, once."""
        import torch

        if self.compute != "bfloat16":
            return
        layer = self._lower[0]
        with torch.inference_mode():
            for rows in range(1, MAX_TOKENS + 1):
                hidden = torch.zeros(rows, HIDDEN)
                layer.qkv(hidden)
                layer.attention_out(hidden)
                layer.output(layer.intermediate(hidden))

    def warm_up(self) -> None:
        """Everything a first request would otherwise pay for, at start-up on the calling
        thread: every lone text's kernels (:meth:`warm_shapes`), the scripted stacks' first
        runs (TorchScript profiles and optimises them: ~35 ms), the tokenizer's thread pool
        (started at normal priority: threads inherit their starter's), and a long lone text's
        split over the helper thread."""
        self.warm_shapes()
        self.encode(["warm up the encoder", "and its batch path"])
        self.encode([" ".join(["warm up a long lone question"] * 16)])

    def close(self) -> None:
        """End the helper thread of ``split_single`` (encode still works, unsplit)."""
        with self._helper_free:  # not while a lone text is using it
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.shutdown(wait=True)

    def encode(
        self, texts: Sequence[str], batch_size: int = 256, *, use_helper: bool = True
    ) -> EncodedBatch:
        """Base embeddings and verifier vectors (float32, L2-normalised), in input order.

        ``batch_size`` bounds the texts packed into one pass (memory), not the speed.
        ``use_helper=False`` keeps a lone text on the calling thread (background work must not
        take the helper, and with it the second core, from a user's text).
        """
        import torch

        idle = self._split_idle_s
        split_rows = idle is None or time.perf_counter() - self._last_pass <= idle

        if not texts:
            empty = np.zeros((0, HIDDEN), dtype=np.float32)
            return EncodedBatch(empty, empty, empty, np.zeros(0, dtype=bool))
        base = np.zeros((len(texts), HIDDEN), dtype=np.float32)
        tuned = np.zeros((len(texts), HIDDEN), dtype=np.float32) if self._top_tuned else base
        shallow = np.zeros((len(texts), HIDDEN), dtype=np.float32)
        whole = np.zeros(len(texts), dtype=bool)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                end = min(start + batch_size, len(texts))
                b, t, s, w = self._encode_packed(texts[start:end], use_helper, split_rows)
                base[start:end] = b
                shallow[start:end] = s
                whole[start:end] = w
                if self._top_tuned:
                    tuned[start:end] = t
        self._last_pass = time.perf_counter()
        return EncodedBatch(base, tuned, shallow, whole)

    def lower_states(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's token states (tokens, hidden; float32) after the shared lower layers: the
        input of the cross-encoder's joint layers (:class:`PackedCrossEncoder`)."""
        import torch

        if not texts:
            return []
        with torch.inference_mode():
            x, spans, _, _ = self._embedded(texts)
            for layer in self._lower:
                x = layer(x, spans)
            return [x[start:end].clone() for start, end in spans]

    def _embedded(
        self, texts: Sequence[str]
    ) -> tuple[torch.Tensor, list[_Span], list[int], list[bool]]:
        """The texts' packed input rows (padded to :func:`padded_rows`), spans, lengths, and
        whether each text fit the window (False: cut at ``MAX_TOKENS`` word pieces)."""
        import torch
        import torch.nn.functional as F

        encodings = self._tokens.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        ids = torch.tensor([t for e in encodings for t in e.ids], dtype=torch.long)
        positions = torch.tensor([p for n in lengths for p in range(n)], dtype=torch.long)
        ends = list(accumulate(lengths))
        spans = [(end - n, end) for n, end in zip(lengths, ends, strict=True)]
        e = self._embed
        x = (
            F.embedding(ids, e["word_embeddings.weight"])
            + F.embedding(positions, e["position_embeddings.weight"])
            + e["token_type_embeddings.weight"][0]
        )
        x = F.layer_norm(x, (HIDDEN,), e["LayerNorm.weight"], e["LayerNorm.bias"], LAYER_NORM_EPS)
        return _pad_rows(x), spans, lengths, [not e.overflowing for e in encodings]

    def _encode_packed(
        self, texts: Sequence[str], use_helper: bool = True, split_rows: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[bool]]:
        x, spans, lengths, whole = self._embedded(texts)
        pool = _mean_pool(lengths)
        if (
            len(texts) == 1
            and use_helper
            and self._helper is not None
            and self._helper_free.acquire(False)
        ):
            try:
                helper = self._helper  # read under the lock: close() may have ended it
                if helper is not None:
                    lone = self._encode_lone(helper, texts[0], x, spans, pool, split_rows)
                    return (*lone, whole)
            finally:
                self._helper_free.release()
        x, shallow = self._run_lower(texts, x, spans, pool)
        base = pool(_run(self._top_base, x, spans))
        tuned = pool(_run(self._top_tuned, x, spans)) if self._top_tuned else base
        return base, tuned, shallow, whole

    def _run_lower(
        self,
        texts: Sequence[str],
        x: torch.Tensor,
        spans: Sequence[_Span],
        pool: Callable[[torch.Tensor], np.ndarray],
        split: ThreadPoolExecutor | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The shared layers: their output and the shallow view. With ``split`` (a lone text of
        at least ``SPLIT_ROWS`` tokens) its rows are shared with that helper thread."""
        layers = self._lower
        states = _lower_rows_split(split, layers, x) if split is not None else None
        if states is None:  # not split, or the helper never started
            states = _run_states(layers, x, spans)
        x = states[-1]
        if self.on_lower is not None:
            self.on_lower((t, x[a:b].clone()) for t, (a, b) in zip(texts, spans, strict=True))
        # __init__ checked that the shallow layer is a shared one
        return x, pool(states[SHALLOW_LAYER])

    def _encode_lone(
        self,
        helper: ThreadPoolExecutor,
        text: str,
        x: torch.Tensor,
        spans: Sequence[_Span],
        pool: Callable[[torch.Tensor], np.ndarray],
        split_rows: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A lone text on this thread and the helper: the shared layers' rows split between them
        when the text is long enough (and ``split_rows``), then one top stack each."""
        # (not with int8: its inputs are scaled per product, so each half would be scaled alone
        # and the text's vector would depend on whether the helper was free)
        long_enough = x.shape[0] >= SPLIT_ROWS and self.compute != "int8"
        split = helper if split_rows and long_enough else None
        x, shallow = self._run_lower([text], x, spans, pool, split)
        tuned_future = helper.submit(_run_top, self._top_tuned, x, spans, pool)
        base = pool(_run(self._top_base, x, spans))
        if tuned_future.cancel():
            # The helper got no core while this thread ran the base stack (a busy machine):
            # run the tuned stack here instead of waiting for a core.
            return base, pool(_run(self._top_tuned, x, spans)), shallow
        return base, tuned_future.result(), shallow


def _lower_rows_split(
    helper: ThreadPoolExecutor, layers: Sequence[_Layer], x: torch.Tensor
) -> list[torch.Tensor] | None:
    """Each layer's output for one text, its rows split between this thread and ``helper``;
    None when the helper had not started by the first barrier (a busy machine: the caller runs
    the layers alone rather than wait for a core)."""
    rows = x.shape[0]
    half = rows // 2
    projected = [x.new_empty(rows, 3 * HIDDEN) for _ in layers]
    states = [x.new_empty(rows, HIDDEN) for _ in layers]
    barrier = threading.Barrier(2, timeout=_BARRIER_TIMEOUT_S)
    future = helper.submit(_rows_pass, layers, x, projected, states, (half, rows), barrier, None)
    # However the helper's task ends in error (even before its pass began), this thread must
    # not wait at a barrier for it.
    future.add_done_callback(
        lambda done: barrier.abort() if not done.cancelled() and done.exception() else None
    )
    try:
        done = _rows_pass(
            layers, x, projected, states, (0, half), barrier, lambda: not future.cancel()
        )
    except threading.BrokenBarrierError:
        # The helper failed, or stalled past the barrier's timeout: run the layers alone rather
        # than fail the text or wait on (the helper's own pass ends at its broken barrier).
        error = future.exception(timeout=0) if future.done() and not future.cancelled() else None
        log.warning("encoder.helper_failed", exc_info=error or True)
        return None
    if not done:
        return None
    future.result()
    return states


def _rows_pass(
    layers: Sequence[_Layer],
    x: torch.Tensor,
    projected: Sequence[torch.Tensor],
    states: Sequence[torch.Tensor],
    rows: tuple[int, int],
    barrier: threading.Barrier,
    partner_started: Callable[[], bool] | None,
) -> bool:
    """One thread's share of :func:`_lower_rows_split`: its rows through every layer, meeting
    the other thread once a layer (attention reads every row's keys and values). False, having
    written nothing the other thread reads, when ``partner_started`` says the partner never
    will."""
    import torch

    start, end = rows
    try:
        with torch.inference_mode():
            mine = x[start:end]
            for index, layer in enumerate(layers):
                projected[index][start:end] = layer.project(mine)
                if index == 0 and partner_started is not None and not partner_started():
                    return False
                barrier.wait()
                mine = layer.finish(mine, _attend_rows(projected[index], start, end))
                states[index][start:end] = mine
        return True
    except BaseException:
        barrier.abort()  # the other thread must not wait for this one
        raise


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zero rows appended up to :func:`padded_rows`: they belong to no text
    (attention skips them, pooling cuts them off)."""
    import torch

    rows = padded_rows(x.shape[0])
    if rows == x.shape[0]:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], HIDDEN)])


def _run(layers: Sequence[_Layer], x: torch.Tensor, spans: Sequence[_Span]) -> torch.Tensor:
    """``x`` through ``layers``."""
    return _run_states(layers, x, spans)[-1] if layers else x


def _run_states(
    layers: Sequence[_Layer], x: torch.Tensor, spans: Sequence[_Span]
) -> list[torch.Tensor]:
    """Each layer's output, ``x`` through ``layers``: in one TorchScript call where the layers
    allow (no GIL held for the whole stack; see proxy/cache/scripted_layers.py), else eagerly."""
    arguments = [layer.scripted for layer in layers]
    if arguments and all(a is not None for a in arguments):
        from proxy.cache import scripted_layers

        tensors = [a[0] for a in arguments if a is not None]
        packed = arguments[0] is not None and arguments[0][1]
        return scripted_layers.stack(  # type: ignore[no-any-return]
            x, list(spans), tensors, packed, HEADS, LAYER_NORM_EPS
        )
    states = []
    for layer in layers:
        x = layer(x, spans)
        states.append(x)
    return states


def _run_top(
    layers: Sequence[_Layer],
    x: torch.Tensor,
    spans: Sequence[_Span],
    pool: Callable[[torch.Tensor], np.ndarray],
) -> np.ndarray:
    """A top stack and its pooling on the helper thread (inference mode is per thread)."""
    import torch

    with torch.inference_mode():
        return pool(_run(layers, x, spans))


def _mean_pool(lengths: Sequence[int]) -> Callable[[torch.Tensor], np.ndarray]:
    """Masked mean over each text's tokens, L2-normalised, one row per text."""
    import torch
    import torch.nn.functional as F

    count = len(lengths)
    rows = sum(lengths)
    sizes = torch.tensor(lengths)
    segment = torch.repeat_interleave(torch.arange(count), sizes) if count > 1 else None

    def pool(hidden: torch.Tensor) -> np.ndarray:
        hidden = hidden[:rows]  # without a batch's padding rows
        if segment is None:
            summed = hidden.float().sum(dim=0, keepdim=True)
        else:
            summed = torch.zeros(count, HIDDEN).index_add_(0, segment, hidden.float())
        pooled = F.normalize(summed / sizes[:, None].float(), p=2.0, dim=-1)
        return pooled.numpy()

    return pool


# Pairs packed into one joint pass at most (bounds the memory of a large call).
_PAIRS_PER_PASS = 64


class PackedCrossEncoder:
    """The cross-encoder's pair scorer (:class:`proxy.cache.cross_encoder.CrossEncoder`) on the
    packed runtime: same weights, same function, less CPU.

    * The lower layers' token states come from the :class:`PackedEncoder` (bfloat16 products where
      native) instead of the reference padded float32 pass, and recent texts' states are
      remembered: the embedding pass hands over each query's (so a lookup does not run the lower
      layers for its query twice), and a stored question is the candidate of many lookups.
    * The joint layers run over the pairs packed together without padding, attention pair by
      pair (a pair is one query's and one candidate's tokens, the candidate's marked with the
      segment vector).

    In float32 its logits equal ``CrossEncoder.logits`` to about 1e-5. Thread-safe: the cache's
    verifier calls it from several worker threads at once.
    """

    def __init__(
        self, cross: CrossEncoder, encoder: PackedEncoder, *, remembered: int = 1024
    ) -> None:
        if encoder.shared_layers != FIRST_JOINT_LAYER:
            raise ValueError(
                f"the cross-encoder reads the states after {FIRST_JOINT_LAYER} layers; this "
                f"encoder's shared stack has {encoder.shared_layers}"
            )
        tuned = cross.tuned
        self._encoder = encoder
        self._layers = [
            _Layer(tuned, top_layer_prefix(i), encoder.compute)
            for i in range(FIRST_JOINT_LAYER, NUM_LAYERS)
        ]
        self._segment = tuned[SEGMENT].float().reshape(HIDDEN)
        self._weight = tuned[CLASSIFIER_WEIGHT].float()
        self._bias = tuned[CLASSIFIER_BIAS].float()
        # ~1.5 kB a token (float32): 1,024 questions of ~30 tokens are ~50 MB.
        self._states: Recent[str, torch.Tensor] = Recent(remembered)
        encoder.on_lower = self._states.put_all

    def logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Same-question logit of each (query, candidate) pair, in input order."""
        out = np.zeros(len(pairs), dtype=np.float64)
        for start in range(0, len(pairs), _PAIRS_PER_PASS):
            chunk = pairs[start : start + _PAIRS_PER_PASS]
            out[start : start + len(chunk)] = self._joint(chunk, self._lower_states(chunk))
        return out

    def _lower_states(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        found = {text: self._states.get(text) for text in texts}
        missing = [text for text, states in found.items() if states is None]
        computed = (
            list(zip(missing, self._encoder.lower_states(missing), strict=True)) if missing else []
        )
        self._states.put_all(computed)
        states = {text: s for text, s in found.items() if s is not None}
        states.update(computed)
        return states

    def _joint(
        self, pairs: Sequence[tuple[str, str]], states: Mapping[str, torch.Tensor]
    ) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            blocks: list[torch.Tensor] = []
            spans: list[_Span] = []
            splits: list[int] = []  # where each pair's candidate starts
            at = 0
            for query, candidate in pairs:
                q, c = states[query], states[candidate] + self._segment
                blocks += (q, c)
                spans.append((at, at + len(q) + len(c)))
                splits.append(at + len(q))
                at += len(q) + len(c)
            x = _pad_rows(torch.cat(blocks))
            for layer in self._layers:
                x = layer(x, spans)
            pooled = []
            for (start, end), split in zip(spans, splits, strict=True):
                u, v = x[start:split].mean(dim=0), x[split:end].mean(dim=0)
                pooled.append(torch.cat([x[start:end].mean(dim=0), (u - v).abs(), u * v]))
            logits = F.linear(torch.stack(pooled), self._weight, self._bias).squeeze(-1)
            return logits.double().numpy()


def pack_verifier(
    verifier: Verifier,
    *,
    precision: Precision = "auto",
    split_single: bool = False,
    split_idle_s: float | None = None,
) -> PackedEncoder:
    """Put the packed runtime under ``verifier``: its encoder and, when it has one, its
    cross-encoder. Returns the packed encoder (``verifier.encoder``)."""
    packed = PackedEncoder(
        verifier.encoder,
        precision=precision,
        split_single=split_single,
        split_idle_s=split_idle_s,
    )
    verifier.encoder = packed
    if isinstance(verifier.cross, CrossEncoder):
        verifier.cross = PackedCrossEncoder(verifier.cross, packed)
    return packed
