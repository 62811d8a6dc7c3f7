"""The encoder's batch pass beside a busy Python thread: eager torch calls or TorchScript stacks.

    .venv/bin/python scripts/bench_gil_contention.py [--batch 30] [--batches 13]

In the proxy the event loop's thread runs Python while the embedding threads encode. An eager
pass needs the GIL between every two torch operations, so it slows with the Python thread's duty;
the scripted stacks (proxy/cache/scripted_layers.py) hold it only around each call. A second
thread runs pure Python in 1 ms bursts at each duty (share of the time busy) while the packed
encoder (the proxy's runtime and precision) encodes batches of paraphrase questions from
../shared/data/cache_paraphrases_mock.json.gz, both ways in turn; medians per batch.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "cache_paraphrases_mock.json.gz"


def busy_python(stop: threading.Event, duty: float) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < 0.001:
            sum(range(50))
        if duty < 1:
            time.sleep(0.001 * (1 - duty) / duty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--batches", type=int, default=13)
    args = parser.parse_args()

    import numpy as np
    import torch

    from proxy.cache import packed_encoder
    from proxy.cache.verifier import Verifier

    torch.set_num_threads(1)  # as the proxy
    encoder = packed_encoder.pack_verifier(Verifier.load())
    encoder.warm_shapes()
    layers = [*encoder._lower, *encoder._top_base, *encoder._top_tuned]
    scripted = [layer.scripted for layer in layers]
    if any(arguments is None for arguments in scripted):
        raise SystemExit(f"precision {encoder.precision}: no scripted stacks to compare")

    def set_scripted(on: bool) -> None:
        for layer, arguments in zip(layers, scripted, strict=True):
            layer.scripted = arguments if on else None

    with gzip.open(DATA, "rt") as f:
        texts = [row["similar"] for row in json.load(f) if row.get("similar")]
    batches = [
        texts[i * args.batch : (i + 1) * args.batch] for i in range(args.batches)
    ]  # fmt: skip
    outputs = {}
    for on in (False, True):
        set_scripted(on)
        outputs[on] = encoder.encode(batches[0])
    same = np.array_equal(outputs[False].base, outputs[True].base) and np.array_equal(
        outputs[False].verifier, outputs[True].verifier
    )
    print(f"precision {encoder.precision}; batches of {args.batch}; scripted output identical "
          f"to eager: {same}\n")  # fmt: skip
    print("| Python thread busy | eager (ms a batch) | scripted (ms a batch) |")
    print("| ---: | ---: | ---: |")
    for duty in (0.0, 0.3, 0.6, 0.9):
        medians = []
        for on in (False, True):
            set_scripted(on)
            stop = threading.Event()
            other = threading.Thread(target=busy_python, args=(stop, duty)) if duty else None
            if other is not None:
                other.start()
            times = []
            for batch in batches:
                started = time.perf_counter()
                encoder.encode(batch)
                times.append(time.perf_counter() - started)
            stop.set()
            if other is not None:
                other.join()
            medians.append(1000 * statistics.median(times))
        print(f"| {duty:.0%} | {medians[0]:.1f} | {medians[1]:.1f} |")
    set_scripted(True)


if __name__ == "__main__":
    main()
