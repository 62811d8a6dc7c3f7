#!/usr/bin/env python
"""Build a realistic, seeded replay trace from the shared development data.

    .venv/bin/python scripts/make_trace.py --n 2000 --rate 5 --seed 0 --out trace.jsonl

What goes in (see ``proxy/bench/trace.py`` for the line format):

* questions repeat with a Zipf distribution over a pool: popular questions come back often, the
  tail rarely; a repeat is sometimes a paraphrase (positive pairs of cache_pairs_dev.csv.gz,
  joined transitively, and cache_paraphrases_mock.json.gz) carrying the same ``group``, so a
  semantic hit across groups can be counted as a false hit;
* near-miss questions (both sides of negative pairs) sit in the pool together, in different
  groups, so an over-eager semantic cache is caught;
* routing prompts (routing_dev.csv.gz) with their weak/strong reference scores in ``ref``;
  MT-Bench second turns become two-turn conversations;
* a share of multi-turn follow-ups whose last turn is generic ("Can you give an example?"), so a
  cache keyed on the last turn alone would answer them wrongly: each follow-up gets its own group;
* a share of sampled requests (temperature > 0), of streamed ones, and of /v1/completions ones;
* arrivals from a two-state Markov-modulated Poisson process: bursts and lulls around a mean rate.

The data is read at run time from ``--data-dir`` (default ``../shared/data`` next to the repo);
nothing from it is stored in the repository except the small derived test trace.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from proxy.bench.trace import TraceRequest, dump_line

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"

FOLLOW_UPS = (
    "Can you give me an example?",
    "Can you explain that more simply?",
    "Why is that?",
    "Can you make that shorter?",
    "What are the main exceptions to this?",
    "Are you sure? Please double-check.",
)
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True, slots=True)
class Question:
    """One question (group) and the texts that ask it; ``texts[0]`` is the usual wording."""

    group: str
    texts: tuple[str, ...]
    source: str
    ref: dict[str, float] = field(default_factory=dict)


def group_id(prefix: str, texts: Sequence[str]) -> str:
    """Stable across runs and samples: a hash of the group's smallest text."""
    return prefix + hashlib.sha1(min(texts).encode()).hexdigest()[:12]


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_pair_questions(path: Path) -> tuple[list[Question], list[tuple[Question, Question]]]:
    """Paraphrase groups (positive pairs joined transitively) and near-miss pairs (negatives)."""
    parent: dict[str, str] = {}
    source_of: dict[str, str] = {}

    def find(text: str) -> str:
        parent.setdefault(text, text)
        while parent[text] != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    negatives: list[tuple[str, str]] = []
    with gzip.open(path, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            a, b = _clean(row["query_a"]), _clean(row["query_b"])
            if len(a) < 8 or len(b) < 8 or a == b:
                continue
            for text in (a, b):
                find(text)
                source_of.setdefault(text, row["source"])
            if row["label"] == "1":
                parent[find(a)] = find(b)
            else:
                negatives.append((a, b))
    members: dict[str, list[str]] = {}
    for text in parent:  # insertion order = file order, so texts[0] is the first wording seen
        members.setdefault(find(text), []).append(text)
    questions = {
        root: Question(group_id("q:", texts), tuple(texts), source_of[texts[0]])
        for root, texts in members.items()
    }
    pairs = [(questions[find(a)], questions[find(b)]) for a, b in negatives if find(a) != find(b)]
    groups = [q for q in questions.values() if len(q.texts) > 1]
    return groups, pairs


def read_mock_questions(path: Path) -> list[Question]:
    with gzip.open(path, "rb") as handle:
        items = orjson.loads(handle.read())
    out = []
    for item in items:
        texts = tuple(dict.fromkeys((_clean(item["origin"]), _clean(item["similar"]))))
        out.append(Question(group_id("m:", texts), texts, "mock"))
    return out


def read_routing_prompts(path: Path) -> list[Question]:
    out = []
    with gzip.open(path, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            prompt = row["prompt"].strip()
            ref = {"weak": float(row["weak_score"]), "strong": float(row["strong_score"])}
            out.append(Question(group_id("r:", [prompt]), (prompt,), row["benchmark"], ref))
    return out


def zipf_weights(size: int, exponent: float) -> np.ndarray:
    ranks = np.arange(1, size + 1, dtype=np.float64)
    weights = ranks**-exponent
    result: np.ndarray = weights / weights.sum()
    return result


def mmpp_arrivals(
    n: int,
    rate: float,
    burst_factor: float,
    mean_burst_s: float,
    mean_lull_s: float,
    rng: np.random.Generator,
) -> list[float]:
    """Arrival times of a two-state Markov-modulated Poisson process with mean rate ``rate``.

    The burst rate is ``burst_factor`` times the lull rate; both are set so the long-run average
    is ``rate``. Exponential dwell times make the state switch memoryless, so arrivals can be
    redrawn from the switch time.
    """
    lull_rate = rate * (mean_burst_s + mean_lull_s) / (burst_factor * mean_burst_s + mean_lull_s)
    rates = (lull_rate, lull_rate * burst_factor)
    dwell = (mean_lull_s, mean_burst_s)
    state = 0
    now = 0.0
    switch_at = rng.exponential(dwell[state])
    out: list[float] = []
    while len(out) < n:
        gap = rng.exponential(1.0 / rates[state])
        if now + gap > switch_at:
            now = switch_at
            state = 1 - state
            switch_at = now + rng.exponential(dwell[state])
            continue
        now += gap
        out.append(now)
    return out


def _split_turns(prompt: str) -> list[str]:
    return [part.strip() for part in prompt.split(" [TURN2] ")]


def _messages(turns: Sequence[str]) -> list[dict[str, str]]:
    """A conversation; earlier assistant replies are stand-ins (the trace has no real answers)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for position, turn in enumerate(turns):
        if position:
            messages.append(
                {"role": "assistant", "content": f"Here is my answer to: {turns[position - 1]}"}
            )
        messages.append({"role": "user", "content": turn})
    return messages


@dataclass(frozen=True, slots=True)
class Shares:
    routing: float
    paraphrase: float
    followup: float
    sampled: float
    stream: float
    completions: float


def generate(
    args: argparse.Namespace,
    questions: Sequence[Question],
    routing: Sequence[Question],
    rng: np.random.Generator,
) -> Iterator[TraceRequest]:
    shares = Shares(
        args.routing_share,
        args.paraphrase_share,
        args.followup_share,
        args.sampled_share,
        args.stream_share,
        args.completions_share,
    )
    question_weights = zipf_weights(len(questions), args.zipf)
    routing_weights = zipf_weights(len(routing), args.routing_zipf) if routing else None
    times = mmpp_arrivals(
        args.n, args.rate, args.burst_factor, args.mean_burst_s, args.mean_lull_s, rng
    )
    keys = _parse_keys(args.api_keys)
    for index, t in enumerate(times):
        is_routing = routing_weights is not None and rng.random() < shares.routing
        if is_routing:
            question = routing[int(rng.choice(len(routing), p=routing_weights))]
            turns = _split_turns(question.texts[0])
            kind = "routing"
            group = question.group
        else:
            question = questions[int(rng.choice(len(questions), p=question_weights))]
            paraphrase = len(question.texts) > 1 and rng.random() < shares.paraphrase
            text = (
                question.texts[1 + int(rng.integers(len(question.texts) - 1))]
                if paraphrase
                else question.texts[0]
            )
            turns = [text]
            kind = "paraphrase" if paraphrase else "question"
            group = question.group
            if rng.random() < shares.followup:
                which = int(rng.integers(len(FOLLOW_UPS)))
                turns.append(FOLLOW_UPS[which])
                kind = "followup"
                group = f"{question.group}>fu{which}"
        sampled = rng.random() < shares.sampled
        body: dict[str, Any] = {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "temperature": 0.8 if sampled else 0.0,
        }
        endpoint = "chat"
        if len(turns) == 1 and rng.random() < shares.completions:
            endpoint = "completions"
            body["prompt"] = turns[0]
        else:
            body["messages"] = _messages(turns)
        if rng.random() < shares.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        api_key = None
        if keys:
            names, weights = zip(*keys, strict=True)
            api_key = names[int(rng.choice(len(names), p=np.array(weights) / sum(weights)))]
        yield TraceRequest(
            index=index,
            id=f"r{index:06d}",
            t=t,
            endpoint="chat" if endpoint == "chat" else "completions",
            body=body,
            api_key=api_key,
            group=group,
            kind=kind,
            ref=dict(question.ref),
            extra={"source": question.source},
        )


def _parse_keys(text: str | None) -> list[tuple[str, float]]:
    """``"sk-free:0.7,sk-gold:0.3"`` -> [(key, weight), ...]."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        key, _, weight = item.partition(":")
        out.append((key.strip(), float(weight) if weight else 1.0))
    return out


def build_pool(
    args: argparse.Namespace,
    groups: Sequence[Question],
    near_misses: Sequence[tuple[Question, Question]],
    mock: Sequence[Question],
    rng: np.random.Generator,
) -> list[Question]:
    """The question pool, in Zipf rank order (a random order: popularity is not data order)."""
    pool: dict[str, Question] = {}
    n_pairs = int(args.pool_size * args.near_miss_share / 2)
    for position in rng.permutation(len(near_misses))[:n_pairs]:
        for question in near_misses[int(position)]:
            pool.setdefault(question.group, question)
    paraphrased = [*groups, *mock]
    for position in rng.permutation(len(paraphrased)):
        if len(pool) >= args.pool_size:
            break
        question = paraphrased[int(position)]
        pool.setdefault(question.group, question)
    items = list(pool.values())
    return [items[int(i)] for i in rng.permutation(len(items))]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (JSON lines)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=2000, help="requests (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=5.0, help="mean arrivals per second")
    parser.add_argument("--burst-factor", type=float, default=6.0, help="burst rate / lull rate")
    parser.add_argument("--mean-burst-s", type=float, default=5.0)
    parser.add_argument("--mean-lull-s", type=float, default=15.0)
    parser.add_argument("--pool-size", type=int, default=1000, help="distinct questions")
    parser.add_argument("--routing-pool-size", type=int, default=1000, help="distinct prompts")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of popularity")
    parser.add_argument(
        "--routing-zipf",
        type=float,
        default=0.5,
        help="Zipf exponent of routing prompts (flatter: hard prompts repeat less, and one "
        "popular prompt should not dominate the quality estimate)",
    )
    parser.add_argument("--near-miss-share", type=float, default=0.3, help="of the pool")
    parser.add_argument("--routing-share", type=float, default=0.25)
    parser.add_argument("--paraphrase-share", type=float, default=0.35, help="of repeats")
    parser.add_argument("--followup-share", type=float, default=0.1)
    parser.add_argument("--sampled-share", type=float, default=0.1)
    parser.add_argument("--stream-share", type=float, default=0.3)
    parser.add_argument("--completions-share", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="auto", help="body model (auto = let Frugal route)")
    parser.add_argument("--api-keys", help='tier keys and weights, e.g. "sk-free:0.7,sk-gold:0.3"')
    parser.add_argument(
        "--max-routing-chars", type=int, default=4000, help="skip longer routing prompts"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    data = args.data_dir
    groups, near_misses = read_pair_questions(data / "cache_pairs_dev.csv.gz")
    mock = read_mock_questions(data / "cache_paraphrases_mock.json.gz")
    pool = build_pool(args, groups, near_misses, mock, rng)
    all_routing = [
        q
        for q in read_routing_prompts(data / "routing_dev.csv.gz")
        if len(q.texts[0]) <= args.max_routing_chars
    ]
    routing = [
        all_routing[int(i)] for i in rng.permutation(len(all_routing))[: args.routing_pool_size]
    ]
    requests = list(generate(args, pool, routing, rng))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as handle:
        for request in requests:
            handle.write(dump_line(request) + b"\n")
    kinds = Counter(r.kind for r in requests)
    print(
        f"wrote {len(requests)} requests to {args.out}: "
        f"{dict(sorted(kinds.items()))}, {len({r.group for r in requests})} groups, "
        f"{sum(r.stream for r in requests)} streamed, {sum(r.sampled for r in requests)} sampled, "
        f"{sum(r.endpoint == 'completions' for r in requests)} completions, "
        f"span {requests[-1].t or 0:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
