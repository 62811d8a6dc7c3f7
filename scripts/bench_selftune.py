"""Self-tuning benchmark: does the audited cut-off bring false hits under the target?

Two replayed lookup streams with known labels; in both, one lookup is one (cached question,
incoming question, label) pair and the decision is the real one: base MiniLM cosine, guard vetoes,
trained verifier score, and :func:`proxy.cache.verifier.accept` with the cut-off the production
:class:`proxy.shadow.tuner.CacheTuner` gives the tier at that moment.

``pairs`` (run A, the hard case): the *report* half of cache_pairs_dev.csv.gz (the same seeded
split as scripts/bench_cache_quality.py, so none of the verifier's training or tuning pairs is
reused), every source, in a seeded shuffled order: the cache holds ``query_a``, ``query_b`` arrives.
91 % of it is qqp, whose "different question" pairs are mostly near-duplicates on one topic.

``cache`` (closer to cache traffic): the cache holds earlier questions and the later ones are

- true paraphrases: the 999 pairs of cache_paraphrases_mock.json.gz (``origin`` cached,
  ``similar`` asked) and the redis_chatgpt report pairs labelled 1;
- near-miss negatives: the redis_chatgpt report pairs labelled 0 (cache-style queries on the same
  topic asking another thing; cached ``query_a``, asked ``query_b``); ``--near-miss
  redis_chatgpt,apt`` adds the apt ones (adversarial word swaps built to fool paraphrase
  detectors: a harder, less cache-like mix);
- unrelated new questions: ``--unrelated`` qqp report ``query_b``s (general Quora questions),
  each looked up against its nearest cached question by base cosine among all the cached texts
  above (mock origins, redis and apt ``query_a``s); labelled 0. qqp texts are left out of the
  cache so that an unrelated question's neighbour is not an unlabelled true duplicate.

shuffled together (seeded). None of these texts trained the verifier (mock data is not in the
training set; pairs are from the report half).

Audits are simulated by the labels: the production :class:`AuditSampler` picks every
``1/share``-th event among the lookups whose best candidate passed the cosine gate and the guards
and scored at least ``tune.min``; on a hit that is a hit audit, on a miss (refused only by the
cut-off) a counterfactual audit; an audit *disagrees* when its pair is labelled "not the same
question". ``--no-counterfactual`` turns the latter off; ``--rule step`` runs the stepping rule.

Reported per window of lookups: the cut-off, the hit rate, the true false-hit share among the hits
served (labels), the audits. Writes out/selftune/<trace>/path.png, results.md and results.json.

Usage: .venv/bin/python scripts/bench_selftune.py [--trace both|pairs|cache] [--audit-share 0.2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_cache_quality import Scored, encode_cached, score_pairs  # noqa: E402
from train_verifier import DATA, load_pairs, log, part  # noqa: E402

from proxy.cache import verifier  # noqa: E402
from proxy.policy.schema import Cache  # noqa: E402
from proxy.shadow.audit import AuditSampler  # noqa: E402
from proxy.shadow.stats import wilson_interval  # noqa: E402
from proxy.shadow.tuner import CacheTuner  # noqa: E402

TIER = "bench"
MOCK = DATA.parent / "cache_paraphrases_mock.json.gz"
Item = tuple[str, str, str, int]  # (kind, cached a, asked b, label)


@dataclass(slots=True)
class Window:
    start: int
    lookups: int = 0
    hits: int = 0
    false_hits: int = 0
    audits: int = 0
    disagreements: int = 0
    counterfactual: int = 0
    would_disagree: int = 0
    cutoff_end: float = 0.0

    def row(self) -> dict[str, float | int | None]:
        share = self.false_hits / self.hits if self.hits else None
        audited = wilson_interval(self.disagreements, self.audits)
        return {
            "start": self.start,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": round(self.hits / self.lookups, 4) if self.lookups else None,
            "false_hit_share": round(share, 4) if share is not None else None,
            "audits": self.audits,
            "audited_disagreement": round(audited.rate, 4) if self.audits else None,
            "counterfactual_audits": self.counterfactual,
            "would_disagree": self.would_disagree,
            "cutoff_end": self.cutoff_end,
        }


def gate(s: Scored, threshold: float) -> bool:
    """The candidate passes the cosine gate and the guards: only the cut-off decides."""
    return s.cosine >= threshold and not s.vetoed


def replay(
    scored: list[Scored],
    order: list[int],
    policy: Cache,
    *,
    start: float,
    threshold: float,
    share: float,
    window: int,
    counterfactual: bool,
) -> tuple[list[float], list[Window], CacheTuner]:
    tuner = CacheTuner(base_cutoff=start, window=10_000)
    sampler = AuditSampler()
    path: list[float] = []
    windows: list[Window] = []
    for position, i in enumerate(order):
        if position % window == 0:
            windows.append(Window(start=position))
        current = windows[-1]
        s = scored[i]
        cutoff = tuner.cutoff(TIER, policy)
        path.append(cutoff)
        decision = verifier.accept(
            cosine=s.cosine,
            score=s.score,
            vetoes=("guard",) if s.vetoed else (),
            threshold=threshold,
            cutoff=cutoff,
        )
        current.lookups += 1
        disagreed = s.label == 0
        if decision.accepted:
            current.hits += 1
            current.false_hits += disagreed
            if sampler.take(TIER, share):
                current.audits += 1
                current.disagreements += disagreed
                tuner.record(TIER, policy, disagreed=disagreed, cutoff_used=cutoff, score=s.score)
        elif (
            counterfactual
            and gate(s, threshold)
            and s.score >= policy.tune.min
            and sampler.take(TIER, share)
        ):
            # The engine answers this miss; its answer is compared with the refused one's.
            current.counterfactual += 1
            current.would_disagree += disagreed
            tuner.record(
                TIER,
                policy,
                disagreed=disagreed,
                cutoff_used=cutoff,
                score=s.score,
                counterfactual=True,
            )
        current.cutoff_end = tuner.cutoff(TIER, policy)
    return path, windows, tuner


def static(scored: list[Scored], threshold: float, cutoff: float) -> dict[str, float | int]:
    hits = [s for s in scored if gate(s, threshold) and s.score >= cutoff]
    false = sum(s.label == 0 for s in hits)
    same = sum(s.label == 1 for s in scored)
    return {
        "cutoff": round(cutoff, 4),
        "hits": len(hits),
        "hit_rate": round(len(hits) / len(scored), 4),
        "false_hit_share": round(false / len(hits), 4) if hits else float("nan"),
        "recall": round((len(hits) - false) / same, 4) if same else float("nan"),
    }


def oracle(
    scored: list[Scored], threshold: float, target: float, low: float
) -> dict[str, float | int]:
    """The lowest cut-off whose whole-trace false-hit share (labels) is under target: the most hits
    a perfectly informed fixed cut-off could serve."""
    for cutoff in sorted({round(s.score, 4) for s in scored if s.score >= low} | {low}):
        row = static(scored, threshold, cutoff)
        if row["hits"] and row["false_hit_share"] < target:
            return row
    return static(scored, threshold, 1.0)


def plot(
    path: list[float],
    windows: list[Window],
    target: float,
    default: float,
    title: str,
    file: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.4), dpi=110, sharex=True)
    top.set_title(title, fontsize=9)
    top.plot(range(len(path)), path, color="tab:blue", label="tuned cut-off")
    top.axhline(default, color="tab:gray", linestyle=":", label=f"shipped default {default:.2f}")
    top.set_ylabel("verifier cut-off")
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    centres = [w.start + w.lookups / 2 for w in windows]
    true = [w.false_hits / w.hits if w.hits else np.nan for w in windows]
    hit_rate = [w.hits / w.lookups if w.lookups else np.nan for w in windows]
    bottom.plot(centres, true, marker="o", color="tab:red", label="false-hit share (labels)")
    bottom.plot(centres, hit_rate, color="tab:green", alpha=0.6, label="hit rate")
    bottom.axhline(target, color="black", linewidth=0.8, linestyle=":", label=f"target {target}")
    bottom.set_xlabel("lookup")
    bottom.set_ylabel("share per window")
    finite = [v for v in [*true, *hit_rate] if not np.isnan(v)]
    bottom.set_ylim(0, max(0.1, *(finite or [0.1])) * 1.05)
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)


# -- traces -----------------------------------------------------------------------------------


def pairs_trace(args: argparse.Namespace) -> list[Item]:
    sources = set(args.sources.split(","))
    report = part(load_pairs(args.data), "report", args.qqp_limit)
    return [(p.source, p.a, p.b, p.label) for p in report if p.source in sources]


def cache_trace(args: argparse.Namespace, model: verifier.Verifier) -> list[Item]:
    report = part(load_pairs(args.data), "report")
    with gzip.open(MOCK, "rt", encoding="utf-8") as handle:
        mock = json.load(handle)
    items: list[Item] = [("paraphrase_mock", m["origin"], m["similar"], 1) for m in mock]
    items += [
        ("paraphrase_redis", p.a, p.b, 1)
        for p in report
        if p.source == "redis_chatgpt" and p.label == 1
    ]
    near = set(args.near_miss.split(",")) if args.near_miss else set()
    items += [
        (f"near_miss_{p.source}", p.a, p.b, 0) for p in report if p.source in near and p.label == 0
    ]
    pool = sorted({a for _, a, _, _ in items})
    rng = random.Random(args.seed)
    qqp = sorted(
        {p.b for p in report if p.source == "qqp"} - set(pool) - {b for _, _, b, _ in items}
    )
    rng.shuffle(qqp)
    unrelated = qqp[: args.unrelated]
    # The same text set score_pairs will encode (every pool text is some item's query_a), so the
    # on-disk encoding cache serves both calls.
    texts = sorted({t for _, a, b, _ in items for t in (a, b)} | set(unrelated))
    encoded = encode_cached(model, texts, args.cache_dir)
    row = {t: i for i, t in enumerate(texts)}
    pool_vectors = encoded.base[[row[t] for t in pool]]
    queries = encoded.base[[row[t] for t in unrelated]]
    nearest = np.argmax(queries @ pool_vectors.T, axis=1)
    items += [
        ("unrelated_qqp", pool[int(j)], q, 0) for q, j in zip(unrelated, nearest, strict=True)
    ]
    return items


def run(trace: str, args: argparse.Namespace, model: verifier.Verifier) -> dict[str, object]:
    out = args.out / (trace if args.tag is None else f"{trace}-{args.tag}")
    out.mkdir(parents=True, exist_ok=True)
    items = pairs_trace(args) if trace == "pairs" else cache_trace(args, model)
    kinds: dict[str, int] = {}
    for kind, *_ in items:
        kinds[kind] = kinds.get(kind, 0) + 1
    log(f"{trace}: {len(items)} lookups {kinds}")
    started = time.time()
    scored, _, _ = score_pairs(model, items, args.cache_dir)
    log(f"scored in {time.time() - started:.0f}s")

    policy = Cache(
        audit={"share": args.audit_share, "target": args.target},
        tune={
            "enabled": True,
            "rule": args.rule,
            "min": args.low,
            "max": args.high,
            "step": args.step,
            "min_audits": args.min_audits,
            "confidence": args.confidence,
            "samples": args.samples,
            "set_point": args.set_point,
            "counterfactual": args.counterfactual,
        },
    )
    rng = random.Random(args.seed)
    order: list[int] = []
    for _ in range(args.passes):
        shuffled = list(range(len(scored)))
        rng.shuffle(shuffled)
        order += shuffled
    threshold = model.threshold
    path, windows, tuner = replay(
        scored,
        order,
        policy,
        start=args.start,
        threshold=threshold,
        share=args.audit_share,
        window=args.window,
        counterfactual=args.counterfactual and args.rule == "evidence",
    )
    rows = [w.row() for w in windows]
    final = path[-1]
    converged_at = None
    for k in range(len(windows)):
        rest = [w for w in windows[k:] if w.hits]
        if rest and all(w.false_hits / w.hits < args.target for w in rest):
            converged_at = windows[k].start
            break
    served = sum(w.hits for w in windows)
    served_false = sum(w.false_hits for w in windows)
    later = windows[1:]
    later_hits = sum(w.hits for w in later)
    later_false = sum(w.false_hits for w in later)
    moves = [(i, path[i - 1], path[i]) for i in range(1, len(path)) if path[i] != path[i - 1]]
    by_kind = sorted(kinds)
    summary: dict[str, object] = {
        "trace": trace,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "lookups": len(order),
        "items": len(scored),
        "kinds": kinds,
        "passes": args.passes,
        "rule": args.rule,
        "counterfactual": args.counterfactual,
        "audit_share": args.audit_share,
        "target": args.target,
        "confidence": args.confidence,
        "start": args.start,
        "bounds": [args.low, args.high],
        "min_audits": args.min_audits,
        "similarity_threshold": threshold,
        "final_cutoff": final,
        "moves": [{"lookup": i, "from": a, "to": b} for i, a, b in moves],
        "converged_at_lookup": converged_at,
        "served_hits": served,
        "served_false_hit_share": round(served_false / served, 4) if served else None,
        "served_after_first_window": later_hits,
        "served_false_hit_share_after_first_window": (
            round(later_false / later_hits, 4) if later_hits else None
        ),
        "windows": rows,
        "static_start": static(scored, threshold, args.start),
        "static_default": static(scored, threshold, model.cutoff),
        "static_final": static(scored, threshold, final),
        "oracle": oracle(scored, threshold, args.target, args.low),
        "audits": tuner.report().get(TIER, {}),
        "per_kind_final": {
            kind: static(
                [s for s, it in zip(scored, items, strict=True) if it[0] == kind], threshold, final
            )
            for kind in by_kind
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    title = (
        f"{trace}: rule {args.rule}, counterfactual {args.counterfactual}, target {args.target}, "
        f"audit share {args.audit_share}"
    )
    plot(path, windows, args.target, model.cutoff, title, out / "path.png")
    lines = [
        f"trace {trace}: lookups {len(order)} ({len(scored)} items x {args.passes} passes;"
        f" {kinds}),"
        f" rule {args.rule}, counterfactual {args.counterfactual}, audit share {args.audit_share},"
        f" target {args.target}, confidence {args.confidence}, start {args.start},"
        f" bounds [{args.low}, {args.high}], min audits {args.min_audits}",
        "",
        "| lookups | cut-off at end | hit rate | false-hit share (labels) | hit audits "
        "(disagreed) | counterfactual audits (would disagree) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w, r in zip(windows, rows, strict=True):
        share = "-" if r["false_hit_share"] is None else f"{r['false_hit_share']:.3f}"
        lines.append(
            f"| {w.start}-{w.start + w.lookups} | {w.cutoff_end:.3f} | {r['hit_rate']:.3f} | "
            f"{share} | {w.audits} ({w.disagreements}) | {w.counterfactual} ({w.would_disagree}) |"
        )
    lines += [
        "",
        f"moves: {len(moves)}: "
        + ", ".join(f"{i} -> {b:.3f}" for i, _, b in moves[:40])
        + (" ..." if len(moves) > 40 else ""),
        f"final cut-off {final:.3f}; every later window under target from lookup {converged_at}",
        f"served: {served} hits, false-hit share {summary['served_false_hit_share']}; "
        f"after the first window {later_hits} hits, "
        f"{summary['served_false_hit_share_after_first_window']}",
        f"static, whole trace: start {summary['static_start']}",
        f"static, whole trace: shipped default {summary['static_default']}",
        f"static, whole trace: final {summary['static_final']}",
        f"oracle (lowest fixed cut-off under target on the labels): {summary['oracle']}",
        f"per kind at the final cut-off: {summary['per_kind_final']}",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", choices=["both", "pairs", "cache"], default="both")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "selftune")
    parser.add_argument("--qqp-limit", type=int, default=None, help="pairs: qqp report pairs")
    parser.add_argument("--sources", default="qqp,apt,redis_chatgpt", help="pairs: sources")
    parser.add_argument("--unrelated", type=int, default=1500, help="cache: unrelated questions")
    parser.add_argument(
        "--near-miss",
        default="redis_chatgpt",
        help="cache: sources of the near-miss negatives (redis_chatgpt, apt; comma-separated)",
    )
    parser.add_argument("--rule", choices=["evidence", "step"], default="evidence")
    parser.add_argument(
        "--no-counterfactual", dest="counterfactual", action="store_false", default=True
    )
    parser.add_argument("--audit-share", type=float, default=0.2)
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--start", type=float, default=0.5, help="the loose starting cut-off")
    parser.add_argument("--min", type=float, default=0.5, dest="low")
    parser.add_argument("--max", type=float, default=0.99, dest="high")
    parser.add_argument("--step", type=float, default=0.03, help="step rule: one move at 0.5")
    parser.add_argument("--set-point", type=float, default=0.5, help="step rule")
    parser.add_argument("--min-audits", type=int, default=20)
    parser.add_argument("--window", type=int, default=None, help="lookups per report window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tag", default=None, help="output folder suffix: out/selftune/TRACE-TAG")
    parser.add_argument("--passes", type=int, default=1, help="replay this many times (new order)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "out" / "verifier_cache")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model = verifier.Verifier.load()
    traces = ["pairs", "cache"] if args.trace == "both" else [args.trace]
    window = args.window
    for trace in traces:
        args.window = window or (2000 if trace == "pairs" else 500)
        run(trace, args, model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
