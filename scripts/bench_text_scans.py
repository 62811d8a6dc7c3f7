"""Time of the two text scans the request path runs on the event loop, ordinary and hostile texts.

    .venv/bin/python scripts/bench_text_scans.py
    PYTHONPATH=/path/to/other/checkout .venv/bin/python scripts/bench_text_scans.py  # A/B

``split_text`` cuts a cached answer into the chunks of a replayed stream; ``cheap_features`` is
the router's feature vector for an ``auto`` request. Both once took time quadratic in a run of
blank lines (docs/benchmarks.md, session of 2026-11-30 04:03 UTC). Token counting uses a
whitespace split as a stand-in for the engine's tokenizer, the same in every checkout, so what is
timed is the scans. Figures: microseconds a call, the minimum of five repeats.
"""

from __future__ import annotations

import argparse
import functools
import timeit
from collections.abc import Callable

from proxy.cache.stream_codec import split_text
from proxy.routing.features import cheap_features

ANSWERS = {
    "answer of 8 words": "The capital of France is Paris, of course.",
    "answer of 200 words": " ".join(f"word{i}," for i in range(200)) + "\n",
    "answer of 2,000 words": "Lorem ipsum dolor sit amet.\n\n" * 400,
    "answer ending in 10,000 newlines": "ok" + "\n" * 10_000,
}
CODE = "def f(x):\n    return [i * i for i in range(x) if i % 3 == 0]\n"
PROMPTS = {
    "short question": [{"role": "user", "content": "What is the capital of France? Be brief."}],
    "code prompt of 1.5 KB": [{"role": "user", "content": f"Fix this:\n```python\n{CODE * 25}```"}],
    "two user turns": [
        {"role": "user", "content": "Solve 3x + 5 = 20."},
        {"role": "assistant", "content": "x = 5"},
        {"role": "user", "content": "Now explain step by step why."},
    ],
    "prompt of 10,000 newlines": [{"role": "user", "content": "hi" + "\n" * 10_000}],
}


def _words(text: str) -> int:
    return len(text.split())


def _time_us(call: Callable[[], object], budget_s: float) -> float:
    once = timeit.timeit(call, number=1)
    number = max(1, int(budget_s / 5 / max(once, 1e-7)))
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=0.5, help="time per case, roughly")
    args = parser.parse_args()
    for name, text in ANSWERS.items():
        us = _time_us(functools.partial(split_text, text), args.budget_s)
        print(f"split_text, {name}: {us:,.1f} µs")
    for name, messages in PROMPTS.items():
        us = _time_us(functools.partial(cheap_features, messages, _words), args.budget_s)
        print(f"cheap_features, {name}: {us:,.1f} µs")


if __name__ == "__main__":
    main()
