"""Self-tuning benchmark: does the audited cut-off bring false hits under the target?

A replayed lookup stream with known labels: the *report* half of cache_pairs_dev.csv.gz (the same
seeded split as scripts/bench_cache_quality.py, so none of the verifier's training or tuning pairs
is reused), every source, in a seeded shuffled order. Each pair is one lookup: the cache holds
``query_a`` and ``query_b`` arrives (the cache-quality protocol). The decision is the real one: base
MiniLM cosine, guard vetoes, trained verifier score, and :func:`proxy.cache.verifier.accept` with
the cut-off the real :class:`proxy.shadow.tuner.CacheTuner` gives the tier at that moment.

The audit is simulated by the labels: the production sampler (:class:`AuditSampler`) picks every
``1/share``-th hit, and an audited hit *disagrees* when its pair is labelled "not the same
question". The tuner starts from a deliberately loose cut-off and gets the tier policy's bounds.

Reported per window of lookups: the cut-off, the hit rate, the true false-hit share among all hits
(from the labels), and the audited estimate. Writes out/selftune/path.png, results.md and
results.json.

Usage: .venv/bin/python scripts/bench_selftune.py [--audit-share 0.2] [--start 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_cache_quality import Scored, score_pairs  # noqa: E402
from train_verifier import DATA, load_pairs, log, part  # noqa: E402

from proxy.cache import verifier  # noqa: E402
from proxy.policy.schema import Cache  # noqa: E402
from proxy.shadow.audit import AuditSampler  # noqa: E402
from proxy.shadow.stats import wilson_interval  # noqa: E402
from proxy.shadow.tuner import CacheTuner  # noqa: E402

TIER = "bench"


@dataclass(slots=True)
class Window:
    start: int
    lookups: int = 0
    hits: int = 0
    false_hits: int = 0
    audits: int = 0
    disagreements: int = 0
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
            "audited_low": round(audited.low, 4),
            "audited_high": round(audited.high, 4),
            "cutoff_end": self.cutoff_end,
        }


def replay(
    scored: list[Scored],
    order: list[int],
    policy: Cache,
    *,
    start: float,
    threshold: float,
    share: float,
    window: int,
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
        if decision.accepted:
            current.hits += 1
            current.false_hits += s.label == 0
            if sampler.take(TIER, share):
                current.audits += 1
                current.disagreements += s.label == 0
                tuner.record(TIER, policy, disagreed=s.label == 0, cutoff_used=cutoff)
        current.cutoff_end = tuner.cutoff(TIER, policy)
    return path, windows, tuner


def static(scored: list[Scored], threshold: float, cutoff: float) -> dict[str, float | int]:
    hits = [
        s
        for s in scored
        if verifier.accept(
            cosine=s.cosine,
            score=s.score,
            vetoes=("guard",) if s.vetoed else (),
            threshold=threshold,
            cutoff=cutoff,
        ).accepted
    ]
    false = sum(s.label == 0 for s in hits)
    same = sum(s.label == 1 for s in scored)
    return {
        "cutoff": cutoff,
        "hits": len(hits),
        "hit_rate": round(len(hits) / len(scored), 4),
        "false_hit_share": round(false / len(hits), 4) if hits else float("nan"),
        "recall": round((len(hits) - false) / same, 4) if same else float("nan"),
    }


def plot(
    path: list[float], windows: list[Window], target: float, default: float, file: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.4), dpi=110, sharex=True)
    top.plot(range(len(path)), path, color="tab:blue", label="tuned cut-off")
    top.axhline(default, color="tab:gray", linestyle=":", label=f"shipped default {default:.2f}")
    top.set_ylabel("verifier cut-off")
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    centres = [w.start + w.lookups / 2 for w in windows]
    true = [w.false_hits / w.hits if w.hits else np.nan for w in windows]
    audited = [w.disagreements / w.audits if w.audits else np.nan for w in windows]
    hit_rate = [w.hits / w.lookups if w.lookups else np.nan for w in windows]
    bottom.plot(centres, true, marker="o", color="tab:red", label="false-hit share (labels)")
    bottom.plot(
        centres, audited, marker="x", linestyle="--", color="tab:orange", label="audited estimate"
    )
    bottom.plot(centres, hit_rate, color="tab:green", alpha=0.6, label="hit rate")
    bottom.axhline(target, color="black", linewidth=0.8, linestyle=":", label=f"target {target}")
    bottom.set_xlabel("lookup")
    bottom.set_ylabel("share per window")
    bottom.set_ylim(0, max(0.5, np.nanmax(hit_rate) if windows else 0.5))
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "selftune")
    parser.add_argument("--qqp-limit", type=int, default=None, help="qqp report pairs (all)")
    parser.add_argument("--sources", default="qqp,apt,redis_chatgpt")
    parser.add_argument("--audit-share", type=float, default=0.2)
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--start", type=float, default=0.5, help="the loose starting cut-off")
    parser.add_argument("--min", type=float, default=0.5, dest="low")
    parser.add_argument("--max", type=float, default=0.99, dest="high")
    parser.add_argument("--step", type=float, default=0.03)
    parser.add_argument("--min-audits", type=int, default=20)
    parser.add_argument("--strict", action="store_true", help="raise on the observed rate")
    parser.add_argument("--window", type=int, default=2000, help="lookups per report window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--passes", type=int, default=1, help="replay the trace this many times (new order each)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "out" / "verifier_cache")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = verifier.Verifier.load()
    sources = set(args.sources.split(","))
    report = part(load_pairs(args.data), "report", args.qqp_limit)
    pairs = [p for p in report if p.source in sources]
    items = [(p.source, p.a, p.b, p.label) for p in pairs]
    log(f"{len(items)} report pairs from {sorted(sources)}")
    started = time.time()
    scored, _, _ = score_pairs(model, items, args.cache_dir)
    log(f"scored in {time.time() - started:.0f}s")

    policy = Cache(
        audit={"share": args.audit_share, "target": args.target},
        tune={
            "enabled": True,
            "min": args.low,
            "max": args.high,
            "step": args.step,
            "min_audits": args.min_audits,
            "strict": args.strict,
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
    )
    rows = [w.row() for w in windows]
    final = path[-1]
    # Converged: from this window on, every window with hits has a true false-hit share < target.
    converged_at = None
    for k in range(len(windows)):
        rest = [w for w in windows[k:] if w.hits]
        if rest and all(w.false_hits / w.hits < args.target for w in rest):
            converged_at = windows[k].start
            break
    moves = [(i, path[i - 1], path[i]) for i in range(1, len(path)) if path[i] != path[i - 1]]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "lookups": len(order),
        "pairs": len(scored),
        "passes": args.passes,
        "sources": sorted(sources),
        "audit_share": args.audit_share,
        "target": args.target,
        "start": args.start,
        "bounds": [args.low, args.high],
        "step": args.step,
        "min_audits": args.min_audits,
        "strict": args.strict,
        "similarity_threshold": threshold,
        "final_cutoff": final,
        "moves": [{"lookup": i, "from": a, "to": b} for i, a, b in moves],
        "converged_at_lookup": converged_at,
        "windows": rows,
        "static_start": static(scored, threshold, args.start),
        "static_default": static(scored, threshold, model.cutoff),
        "static_final": static(scored, threshold, final),
        "audits": tuner.report().get(TIER, {}),
        "per_source_final": {
            src: static([s for s in scored if s.source == src], threshold, final)
            for src in sorted(sources)
        },
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(path, windows, args.target, model.cutoff, args.out / "path.png")
    lines = [
        f"lookups {len(order)} ({len(scored)} pairs x {args.passes} passes), "
        f"audit share {args.audit_share}, target {args.target}, "
        f"start {args.start}, bounds [{args.low}, {args.high}], step {args.step}, "
        f"min audits {args.min_audits}, strict {args.strict}",
        "",
        "| lookups | cut-off at end | hit rate | false-hit share (labels) | audits | audited "
        "disagreement [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for w, r in zip(windows, rows, strict=True):
        share = "-" if r["false_hit_share"] is None else f"{r['false_hit_share']:.3f}"
        audited = "-"
        if w.audits:
            audited = (
                f"{r['audited_disagreement']:.3f} [{r['audited_low']:.3f}, {r['audited_high']:.3f}]"
            )
        lines.append(
            f"| {w.start}-{w.start + w.lookups} | {w.cutoff_end:.3f} | {r['hit_rate']:.3f} | "
            f"{share} | {w.audits} | {audited} |"
        )
    lines += [
        "",
        f"moves: {len(moves)}; final cut-off {final:.3f}; "
        f"converged (every later window under target) from lookup {converged_at}",
        f"static, whole trace: start {summary['static_start']}",
        f"static, whole trace: shipped default {summary['static_default']}",
        f"static, whole trace: final {summary['static_final']}",
        f"per source at the final cut-off: {summary['per_source_final']}",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
