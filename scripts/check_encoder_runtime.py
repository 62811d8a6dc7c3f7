"""Does the proxy's encoder runtime move what the router and the cache decide?

    .venv/bin/python scripts/check_encoder_runtime.py [--prompts 400] [--precision auto] [--speed]

The router's head and the cache's thresholds were fitted on float32 MiniLM embeddings. This
encodes routing prompts (../shared/data/routing_dev.csv.gz, a seeded sample, all benchmarks) with
the reference pass (:class:`proxy.cache.verifier.MiniLMEncoder`) and with the proxy's
:class:`proxy.cache.packed_encoder.PackedEncoder`, and reports how far the embeddings and the
router's difficulty scores move (correlation, largest change, routes flipped at the head's
thresholds). The cache side is checked decision by decision with
``scripts/bench_cache_quality.py --runtime``.

``--speed`` also times the encoders alone (thread CPU per text, one torch thread; with
``--precision int8`` bfloat16 too) at batch 1 and 64 on the paraphrase questions of
../shared/data/cache_paraphrases_mock.json.gz, and each question encoded alone with and without
the proxy's split of the two top stacks over two threads.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "routing_dev.csv.gz"
QUESTIONS = REPO.parent / "shared" / "data" / "cache_paraphrases_mock.json.gz"


def cpu_ms_per_text(encode: Callable[[list[str]], object], texts: list[str], batch: int) -> float:
    """Thread CPU milliseconds per text over ``texts`` in batches (after one warm-up batch)."""
    encode(texts[:batch])
    started = time.thread_time()
    for i in range(0, len(texts), batch):
        encode(texts[i : i + batch])
    return 1000 * (time.thread_time() - started) / len(texts)


def lone_text_ms(encode: Callable[[list[str]], object], texts: list[str]) -> list[float]:
    """Calling-thread CPU milliseconds of each text encoded alone (best of 3). With the top
    stacks split over two threads this is the critical path: the latency when a core is free."""
    encode(texts[:1])
    spent = []
    for text in texts:
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            encode([text])
            best = min(best, time.thread_time() - started)
        spent.append(1000 * best)
    return spent


def speed(
    encoders: dict[str, Callable[[list[str]], object]],
    lone: dict[str, Callable[[list[str]], object]],
) -> None:
    with gzip.open(QUESTIONS, "rt", encoding="utf-8") as f:
        texts = [p["origin"] for p in json.load(f) if p.get("origin")][:256]
    print(
        f"encoder alone, thread CPU ms per text ({len(texts)} questions; load {os.getloadavg()}):"
    )
    for name, encode in encoders.items():
        one = cpu_ms_per_text(encode, texts[:64], 1)
        many = cpu_ms_per_text(encode, texts, 64)
        print(f"  {name}: batch 1 {one:.2f} ms, batch 64 {many:.2f} ms")
    print("a lone text, calling thread CPU ms (best of 3; p50 / p90 / p99 / max):")
    for name, encode in lone.items():
        spent = lone_text_ms(encode, texts)
        p50, p90, p99 = np.percentile(spent, [50, 90, 99])
        print(f"  {name}: {p50:.2f} / {p90:.2f} / {p99:.2f} / {max(spent):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument(
        "--precision", choices=("auto", "float32", "bfloat16", "int8"), default="auto"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", action="store_true", help="also time the encoders alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from proxy.cache.packed_encoder import PackedEncoder, bfloat16_is_native
    from proxy.cache.verifier import ARTIFACT_DIR, LAYERS_FILE, MiniLMEncoder
    from proxy.routing.classifier import DifficultyClassifier
    from proxy.routing.commands import load_count_tokens
    from proxy.routing.features import cheap_features

    torch.set_num_threads(1)
    csv.field_size_limit(sys.maxsize)
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        prompts = [row["prompt"] for row in csv.DictReader(f) if row["prompt"].strip()]
    prompts = random.Random(args.seed).sample(prompts, min(args.prompts, len(prompts)))

    reference = MiniLMEncoder.load(tuned_layers=ARTIFACT_DIR / LAYERS_FILE)
    packed = PackedEncoder(reference, precision=args.precision)
    started = time.perf_counter()
    ref = reference.encode(prompts)
    ref_s = time.perf_counter() - started
    started = time.perf_counter()
    new = packed.encode(prompts)
    new_s = time.perf_counter() - started

    head = DifficultyClassifier.load()
    count_tokens = load_count_tokens()
    cheap = np.stack(
        [cheap_features([{"role": "user", "content": p}], count_tokens) for p in prompts]
    )
    before = head.score_arrays(ref.base, cheap, ref.shallow)
    after = head.score_arrays(new.base, cheap, new.shallow)
    flips = {
        share: int(np.sum((before >= t) != (after >= t)))
        for share, t in sorted(head.default_thresholds.items())
    }
    base_cos = (ref.base * new.base).sum(axis=1)
    verifier_cos = (ref.verifier * new.verifier).sum(axis=1)
    print(f"{len(prompts)} routing prompts; packed runtime in {packed.precision}")
    print(f"encode time: reference {ref_s:.1f} s, packed {new_s:.1f} s (1 torch thread)")
    print(
        f"base embedding cosine to reference: min {base_cos.min():.6f}, mean {base_cos.mean():.6f}"
    )
    print(f"verifier vector cosine to reference: min {verifier_cos.min():.6f}")
    if ref.shallow is not None and new.shallow is not None:
        shallow_cos = (ref.shallow * new.shallow).sum(axis=1)
        print(f"router's shallow view cosine to reference: min {shallow_cos.min():.6f}")
    print(
        f"router score: correlation {np.corrcoef(before, after)[0, 1]:.6f}, "
        f"largest change {np.abs(before - after).max():.5f}, "
        f"mean change {np.abs(before - after).mean():.6f}"
    )
    print("routes flipped at the head's thresholds (strong share: count): " + str(flips))
    if args.speed:
        split = PackedEncoder(reference, precision=args.precision, split_single=True)
        encoders = {
            "reference (padded float32)": reference.encode,
            "packed float32": PackedEncoder(reference, precision="float32").encode,
        }
        lone = {}
        if packed.precision == "int8" and bfloat16_is_native():
            # int8 is judged against the default runtime on this CPU
            bf16 = PackedEncoder(reference, precision="bfloat16")
            encoders["packed bfloat16"] = lone["packed bfloat16"] = bf16.encode
        encoders[f"packed {packed.precision}"] = packed.encode
        lone[f"packed {packed.precision}"] = packed.encode
        lone[f"packed {packed.precision}, top stacks on two threads"] = split.encode
        speed(encoders, lone)
        split.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
