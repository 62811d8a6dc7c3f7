"""The packed encoder's BERT layers as TorchScript: one call runs a whole stack of layers.

Why: the eager pass calls a few dozen torch operations a layer, plus six per text for attention,
and needs the GIL between any two of them. Whenever the event loop's thread runs Python (at c=64
it answers a finished batch's requests while the next batch encodes), an encoder thread waits
for the GIL at every one of those boundaries: with a Python thread busy 60% of the time beside
it, a batch of 30 questions took 131 ms instead of 96 (90%: 241 ms). A scripted stack releases
the GIL for the whole call: the same batch took 94 ms (90%: 96 ms; idle: 88), with the same
numbers to the last bit (``scripts/bench_gil_contention.py``, 2026-11-29).

The functions compute exactly what :class:`proxy.cache.packed_encoder._Layer` computes for
bfloat16 (oneDNN's prepacked weights) and float32 products; int8 products stay eager (their
prepacked weights are not tensors).

This module imports torch: import it only where the encoder is built.
"""

import torch
import torch.nn.functional as F


@torch.jit.script
def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool, packed: bool
) -> torch.Tensor:
    """``x @ W.T + b`` (then exact GELU); ``packed``: W is oneDNN's prepacked bfloat16 weight."""
    if packed:
        x = x.to(torch.bfloat16)
        if gelu:  # GELU on the float32 accumulator, before the output is rounded
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")  # type: ignore[no-any-return]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # type: ignore[no-any-return]
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


@torch.jit.script
def attend(qkv: torch.Tensor, spans: list[tuple[int, int]], heads: int) -> torch.Tensor:
    """Self-attention of each text over its own rows (float32, no padding, no mask); rows that
    belong to no text (a batch's padding) come out zero."""
    hidden = qkv.shape[1] // 3
    head_dim = hidden // heads
    scale = head_dim**-0.5
    out = torch.zeros(qkv.shape[0], hidden, dtype=qkv.dtype)
    for span in spans:
        start, end = span
        n = end - start
        parts = qkv[start:end].view(n, 3, heads, head_dim).permute(1, 2, 0, 3)
        q, k, v = parts[0], parts[1], parts[2]
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # (heads, n, n)
        context = torch.bmm(torch.softmax(scores, dim=-1), v)  # (heads, n, head_dim)
        out[start:end].view(n, heads, head_dim).copy_(context.transpose(0, 1))
    return out


@torch.jit.script
def stack(
    x: torch.Tensor,
    spans: list[tuple[int, int]],
    layers: list[list[torch.Tensor]],
    packed: bool,
    heads: int,
    eps: float,
) -> list[torch.Tensor]:
    """Each layer's output, ``x`` through ``layers`` in turn. A layer's tensors, in order: QKV
    weight and bias, attention output weight and bias, LayerNorm weight and bias, intermediate
    weight and bias, output weight and bias, LayerNorm weight and bias."""
    hidden = x.shape[1]
    states: list[torch.Tensor] = []
    for w in layers:
        attended = attend(linear(x, w[0], w[1], False, packed).float(), spans, heads)
        # torch.add promotes a bfloat16 product to float32 in the same pass (exact).
        x = F.layer_norm(
            torch.add(x, linear(attended, w[2], w[3], False, packed)), [hidden], w[4], w[5], eps
        )
        inner = linear(x, w[6], w[7], True, packed)
        x = F.layer_norm(
            torch.add(x, linear(inner, w[8], w[9], False, packed)), [hidden], w[10], w[11], eps
        )
        states.append(x)
    return states
