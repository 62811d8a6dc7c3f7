"""Replay harness: measure a strategy on your own workload before turning it on.

    # a trace from the shared dev data (or write your own: see proxy/bench/trace.py)
    python scripts/make_trace.py --n 2000 --rate 5 --seed 0 --out trace.jsonl

    # one running proxy (loopback only): table on stdout, JSON summary in --out
    frugal bench replay --trace trace.jsonl --url http://127.0.0.1:8000 --timed --speed 10 \\
        --config frugal.yaml --out replay.json

    # several strategies, each on a fresh proxy with an empty cache: bench-compare/report.html
    frugal bench compare --trace trace.jsonl --configs scripts/strategies/*.yaml --timed --speed 10

Modules: ``trace`` (line format), ``replay`` (the I/O loop and response parsing), ``summary``
(pure numbers), ``compare`` (proxy processes), ``report`` (HTML), ``config`` (what is read from a
Frugal config), ``cli`` (flags).
"""
