"""Train the semantic cache's cross-encoder and the head that uses its score.

Reads ../shared/data/cache_pairs_dev.csv.gz (never copied into the repo) with the split of
scripts/train_verifier.py: the cross-encoder trains on the *fit* pairs of the tune half, the head
(logistic regression over the bi-encoder features plus the cross-encoder logit) and its defaults
are fitted on the *calib* pairs, and the *report* half is left to scripts/bench_cache_quality.py.

Stages:
  train  fine-tune MiniLM layers >= --first-tuned, the segment embeddings and a linear classifier
         over the pooled pair ``[CLS] a [SEP] b [SEP]`` (BCE; both orders of each pair; small
         sources repeated); checkpoints and progress go to --work.
  head   score the calib pairs with the cross-encoder, fit the head with it as a feature, choose
         the threshold / cut-off, and write cross_encoder.safetensors plus the ``cross`` section
         of verifier_head.json into --out (the bi-encoder head stays as it is, for when the
         cross-encoder is switched off).

Usage:
  .venv/bin/python scripts/train_cross_encoder.py train --work out/cross_run1
  .venv/bin/python scripts/train_cross_encoder.py head --work out/cross_run1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_verifier import (  # noqa: E402
    DATA,
    SOURCES,
    TARGETS,
    Pair,
    TokenCache,
    build_token_cache,
    choose_defaults,
    fit_head,
    load_pairs,
    log,
    out_of_fold_scores,
    part,
    recall_at_precision,
    tuned_vectors,
)

from proxy.cache import cross_encoder, guards, verifier  # noqa: E402

CHECKPOINT = "checkpoint.safetensors"
MIN_THRESHOLD = 0.50  # the lowest similarity threshold choose_defaults considers
# Small sources are repeated so qqp does not drown them.
REPEAT = {"qqp": 1, "apt": 2, "redis_chatgpt": 8}


def token_cache(args: argparse.Namespace, encoder: verifier.MiniLMEncoder) -> TokenCache:
    """Lower-layer token states of every text of the split (the cache train_verifier.py builds)."""
    pairs = load_pairs(args.data)
    chosen = (
        *part(pairs, "fit", args.qqp_limit),
        *part(pairs, "calib", args.qqp_limit // 4),
        *part(pairs, "report", args.qqp_limit // 2),
    )
    texts = sorted({t for p in chosen for t in (p.a, p.b)})
    return build_token_cache(encoder, texts, args.cache_dir)


def length_bucketed(
    examples: list[tuple[str, str, int]],
    batch_size: int,
    rng: random.Random,
    tokens: Callable[[str], int],
) -> list[list[tuple[str, str, int]]]:
    """Shuffled batches of similar lengths (little padding): sort inside windows of 50 batches."""
    rng.shuffle(examples)
    window = batch_size * 50
    batches = []
    for start in range(0, len(examples) - batch_size + 1, window):
        chunk = sorted(examples[start : start + window], key=lambda e: tokens(e[0]) + tokens(e[1]))
        batches += [
            chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)
        ]
    rng.shuffle(batches)
    return batches


def padded_batch(
    cache: TokenCache, texts: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached lower-layer states of texts, each cut to max_tokens, padded to the longest."""
    import torch

    rows = [cache.index[t] for t in texts]
    lengths = [min(int(cache.offsets[r + 1] - cache.offsets[r]), max_tokens) for r in rows]
    hidden = np.zeros((len(rows), max(lengths), verifier.HIDDEN), dtype=np.float32)
    mask = np.zeros((len(rows), max(lengths)), dtype=np.int64)
    for j, (r, n) in enumerate(zip(rows, lengths, strict=True)):
        hidden[j, :n] = cache.states[cache.offsets[r] : cache.offsets[r] + n]
        mask[j, :n] = 1
    return torch.from_numpy(hidden), torch.from_numpy(mask)


def train(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    encoder = verifier.MiniLMEncoder.load()
    cache = token_cache(args, encoder)
    # Start from the bi-encoder verifier's tuned top layers: they already know the question space.
    init = load_file(str(args.init_layers))
    params = {k: v.float().clone().requires_grad_(True) for k, v in init.items()}
    params[cross_encoder.SEGMENT] = torch.zeros(verifier.HIDDEN, requires_grad=True)
    params[cross_encoder.CLASSIFIER_WEIGHT] = torch.zeros(
        1, 3 * verifier.HIDDEN, requires_grad=True
    )
    params[cross_encoder.CLASSIFIER_BIAS] = torch.zeros(1, requires_grad=True)
    if args.resume is not None:
        # Continue an earlier run (its checkpoint holds every trained tensor).
        params = {
            k: v.float().clone().requires_grad_(True)
            for k, v in load_file(str(args.resume)).items()
        }
        log(f"continuing from {args.resume}")

    fit = part(load_pairs(args.data), "fit", args.qqp_limit)
    examples: list[tuple[str, str, int]] = []
    for p in fit:
        for _ in range(REPEAT.get(p.source, 1)):
            # One order per repeat, chosen at random: the cache sees either order.
            a, b = (p.a, p.b) if rng.random() < 0.5 else (p.b, p.a)
            examples.append((a, b, p.label))
    steps_per_epoch = len(examples) // args.batch_size
    total = min(steps_per_epoch * args.epochs, args.max_steps or 10**9)
    log(f"{len(fit)} fit pairs, {len(examples)} examples, {total} steps of {args.batch_size}")
    new = (cross_encoder.SEGMENT, cross_encoder.CLASSIFIER_WEIGHT, cross_encoder.CLASSIFIER_BIAS)
    optimiser = torch.optim.AdamW(
        [
            {"params": [v for k, v in params.items() if k not in new], "lr": args.lr},
            {"params": [params[k] for k in new], "lr": args.lr * 20},
        ],
        weight_decay=0.01,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=[args.lr, args.lr * 20], total_steps=max(total, 1), pct_start=0.1
    )
    args.work.mkdir(parents=True, exist_ok=True)
    step, running, started = 0, 0.0, time.time()

    def tokens(text: str) -> int:
        row = cache.index[text]
        return int(cache.offsets[row + 1] - cache.offsets[row])

    while step < total:
        for batch in length_bucketed(examples, args.batch_size, rng, tokens):
            if step >= total:
                break
            ha, ma = padded_batch(cache, [a for a, _, _ in batch], args.max_tokens)
            hb, mb = padded_batch(cache, [b for _, b, _ in batch], args.max_tokens)
            labels = torch.tensor([float(y) for _, _, y in batch])
            logits = cross_encoder.joint_forward(ha, ma, hb, mb, params)  # type: ignore[arg-type]
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimiser.step()
            scheduler.step()
            step += 1
            running += loss.item()
            if step % 20 == 0:
                elapsed = time.time() - started
                log(
                    f"step {step}/{total} loss {running / 20:.4f} ({elapsed:.0f}s, "
                    f"eta {elapsed / step * (total - step):.0f}s)"
                )
                running = 0.0
            if step % 80 == 0 or step == total:
                save(params, args, args.work / CHECKPOINT, step)
    log(f"done: {step} steps in {time.time() - started:.0f}s")


def save(params: dict[str, object], args: argparse.Namespace, path: Path, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().to(torch.float16).contiguous() for k, v in params.items()},  # type: ignore[attr-defined]
        str(path),
        metadata={
            "init_layers": str(args.init_layers.name),
            "resumed_from": str(args.resume) if args.resume else "",
            "steps": str(step),
            "seed": str(args.seed),
            "lr": str(args.lr),
            "batch_size": str(args.batch_size),
            "qqp_limit": str(args.qqp_limit),
            "max_tokens_per_question": str(args.max_tokens),
        },
    )


def head(args: argparse.Namespace) -> None:
    import shutil

    from safetensors import safe_open

    model = verifier.Verifier.load(args.out, cross=False)
    cross = cross_encoder.CrossEncoder.load(args.work / CHECKPOINT, model.encoder)
    calib: list[Pair] = part(load_pairs(args.data), "calib", args.qqp_limit // 4)
    # Lower-layer states come from the token cache (as in training): only the top layers run.
    cache = token_cache(args, model.encoder)
    qa, ca = [p.b for p in calib], [p.a for p in calib]
    log(f"{len(calib)} calib pairs: tuned vectors")
    cosines = (
        cache.base[[cache.index[t] for t in qa]] * cache.base[[cache.index[t] for t in ca]]
    ).sum(axis=1)
    tuned = dict(model.encoder.tuned)
    vcos = (
        tuned_vectors(model.encoder, cache, qa, tuned)
        * tuned_vectors(model.encoder, cache, ca, tuned)
    ).sum(axis=1)
    comparisons = [guards.compare(guards.parse(p.b), guards.parse(p.a)) for p in calib]
    vetoed = np.array([bool(c.vetoes) for c in comparisons])
    # The head only ever sees pairs past the lowest threshold and the guards: fit it on those.
    eligible = (cosines >= MIN_THRESHOLD) & ~vetoed
    idx = np.flatnonzero(eligible)
    started = time.time()
    logits = np.full(len(calib), -10.0)
    logits[idx] = cached_logits(cross, cache, [(calib[i].b, calib[i].a) for i in idx])
    log(f"cross-encoder scored {len(idx)} eligible pairs in {time.time() - started:.0f}s")
    rows = np.asarray(
        [
            verifier.cross_pair_features(float(v), float(c), comp.features, float(x))
            for v, c, comp, x in zip(vcos, cosines, comparisons, logits, strict=True)
        ],
        dtype=np.float64,
    )
    labels = np.array([p.label for p in calib])
    sources = [p.source for p in calib]
    scores = np.zeros(len(calib))
    scores[idx] = out_of_fold_scores(
        rows[idx], labels[idx], [sources[i] for i in idx], args.seed, "logistic"
    )
    fitted = fit_head(rows[idx], labels[idx], [sources[i] for i in idx], args.seed, "logistic")
    fitted = verifier.Head(
        weights=fitted.weights,
        bias=fitted.bias,
        mean=fitted.mean,
        scale=fitted.scale,
        feature_names=verifier.CROSS_FEATURE_NAMES,
    )
    bi = model.head.predict(rows[:, : len(verifier.FEATURE_NAMES)])  # in-sample, as served
    for source in SOURCES:
        mask = np.array([p.source == source for p in calib])
        goal = TARGETS[source][0]
        log(
            f"calib {source}: recall at precision {goal:.2f}: cross logit alone "
            f"{recall_at_precision(labels[mask], logits[mask], goal):.3f}, "
            f"cross head (out of fold) {recall_at_precision(labels[mask], scores[mask], goal):.3f}"
        )
    threshold, cutoff, slack, metrics = choose_defaults(calib, cosines, scores, vetoed)
    log(f"defaults: threshold {threshold:.2f} cutoff {cutoff:.2f} slack {slack:.2f} {metrics}")
    gate = choose_gate(labels, (cosines >= threshold) & ~vetoed & (scores >= cutoff), bi)
    log(f"cross gate (bi-encoder score below which the cross-encoder is skipped): {gate:.2f}")
    with safe_open(str(args.work / CHECKPOINT), framework="pt") as handle:
        training = dict(handle.metadata() or {})
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.work / CHECKPOINT, args.out / verifier.CROSS_FILE)
    head_path = args.out / verifier.HEAD_FILE
    doc = json.loads(head_path.read_text(encoding="utf-8"))
    doc["cross"] = {
        "head": fitted.to_json(),
        "defaults": {
            "similarity_threshold": round(threshold, 2),
            "verifier_cutoff": round(cutoff, 2),
            "cross_gate": gate,
        },
        "metadata": {
            "data": "cache_pairs_dev.csv.gz",
            "trained_on": "fit part of the tune half",
            "head_on": "calib part of the tune half",
            "calib_pairs": len(calib),
            "precision_slack_on_calib": round(slack, 2),
            "calib_metrics_out_of_fold": {s: list(m) for s, m in metrics.items()},
            "training": training,
            "head_fitted_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    head_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    np.savez(args.work / "calib_scores.npz", scores=scores, logits=logits, labels=labels)
    log(f"wrote {args.out / verifier.CROSS_FILE} and the cross section of {head_path}")


def cached_logits(
    cross: cross_encoder.CrossEncoder, cache: TokenCache, pairs: Sequence[tuple[str, str]]
) -> np.ndarray:
    """Cross-encoder logits from cached lower-layer states (the top layers only)."""
    import torch

    out = np.zeros(len(pairs))
    with torch.inference_mode():
        for start in range(0, len(pairs), 64):
            chunk = pairs[start : start + 64]
            hq, mq = padded_batch(cache, [q for q, _ in chunk], 128)
            hc, mc = padded_batch(cache, [c for _, c in chunk], 128)
            out[start : start + len(chunk)] = (
                cross_encoder.joint_forward(hq, mq, hc, mc, cross.tuned).double().numpy()
            )
    return out


def choose_gate(labels: np.ndarray, accepted: np.ndarray, bi: np.ndarray) -> float:
    """The highest bi-encoder score gate that keeps >= 99% of the correct calib hits: pairs
    below it are rejected without a cross-encoder pass (cheaper lookups, same answers)."""
    correct = int((accepted & (labels == 1)).sum())
    for gate in (0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01):
        kept = int((accepted & (labels == 1) & (bi >= gate)).sum())
        if kept >= 0.99 * correct:
            return gate
    return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=("train", "head"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "cross_run")
    parser.add_argument("--out", type=Path, default=verifier.ARTIFACT_DIR)
    parser.add_argument("--qqp-limit", type=int, default=12000, help="qqp fit pairs")
    parser.add_argument(
        "--init-layers",
        type=Path,
        default=verifier.ARTIFACT_DIR / verifier.LAYERS_FILE,
        help="top layers to start from (default: the bi-encoder verifier's)",
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="per question, training")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "out" / "verifier_cache")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="0: whole epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TRAIN_THREADS", "2")))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.stage == "train":
        train(args)
    else:
        head(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
