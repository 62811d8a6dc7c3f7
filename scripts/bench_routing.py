"""Routing benchmark: RouteLLM's APGR / CPT on held-out dev prompts, own prompts, scoring latency.

    .venv/bin/python scripts/bench_routing.py [--out out/routing] [--folds 5] [--seed 0]
    .venv/bin/python scripts/bench_routing.py --fold-seeds 0,1,2,3,4 --nested [--grid none,20:1]

1. k-fold over routing_dev.csv.gz: every prompt is scored by a head trained without it (same model
   and settings as train_router.py). Folds are stratified by benchmark and label and keep
   near-duplicate prompts (cosine >= 0.95, and the two turns of one MT-Bench question) together.
   APGR, CPT(50%), CPT(80%) overall and per benchmark, beside a random router and a prompt-length
   router, with bootstrap 95% intervals for APGR; APGR and CPT(50%) also as RouteLLM's evaluation
   code computes them (11 decile thresholds). A harder split holds out whole MMLU subjects.
2. Own prompts (scripts/routing_own_prompts.jsonl, written for this, not from the dev data),
   scored by the shipped head: do the hard ones score higher? (AUC, mean score per kind)
3. Scoring latency of the shipped head with the embedding given (features + score, per request).

Writes routing_benchmark.md and routing_pgr.png into --out.

With --fold-seeds, only the held-out figures, repeated over folds dealt with each seed: mean,
spread and worst seed of APGR (overall, per benchmark) and CPT for every setting of the
shallow-view vote in --grid, and with --nested the figures of a head whose setting inner
cross-validation on each outer training part picks (scripts/routing_nested.py). Writes
routing_multiseed.md and routing_multiseed.json into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.routing.classifier import DEFAULT_HEAD_PATH, DifficultyClassifier
from proxy.routing.commands import embed_texts, load_count_tokens, load_embedder, shallow_views
from proxy.routing.evaluation import GapCurve, apgr, cpt, pgr_curve, routellm_curve
from proxy.routing.features import cheap_features, extract_features, last_user_text
from scripts.routing_data import DEFAULT_DEV_FILE, RoutingDevData, load_dev_data
from scripts.routing_nested import (
    DEFAULT_GRID,
    ShallowSetting,
    evaluate_fold_seed,
    parse_grid,
    parse_seeds,
    scores_of_other_prompts,
    summary_lines,
)
from scripts.train_router import (
    DEFAULT_C,
    fit_linear,
    fold_strata,
    grouped_folds,
    labels,
    train_on,
)

OWN_PROMPTS = Path(__file__).resolve().parent / "routing_own_prompts.jsonl"
F64 = npt.NDArray[np.float64]


def out_of_fold_scores(
    data: RoutingDevData,
    fold_of: npt.NDArray[np.int64],
    fit: Callable[[npt.NDArray[np.bool_]], DifficultyClassifier],
) -> F64:
    """Every prompt scored by a head `fit` on the other folds (given the training-row mask)."""
    scores = np.zeros(len(data.prompts))
    for fold in range(int(fold_of.max()) + 1):
        test = fold_of == fold
        head = fit(~test)
        scores[test] = head.score_arrays(
            data.embeddings[test], data.cheap[test], data.shallow[test]
        )
        print(f"  fold {fold + 1} done", flush=True)
    return scores


def dev_folds(data: RoutingDevData, folds: int, seed: int) -> npt.NDArray[np.int64]:
    return grouped_folds(fold_strata(data.benchmark, labels(data)), data.groups, folds, seed)


def subject_folds(data: RoutingDevData, folds: int, seed: int) -> npt.NDArray[np.int64]:
    """Like dev_folds, but every MMLU subject lies wholly in one fold (unseen subjects)."""
    mmlu = data.benchmark == "mmlu"
    subject_ids = np.unique(data.subset[mmlu], return_inverse=True)[1]
    groups = data.groups.copy()
    groups[mmlu] = -1 - subject_ids  # negative ids never clash with row-index group ids
    return grouped_folds(
        np.where(mmlu, "mmlu", fold_strata(data.benchmark, labels(data))), groups, folds, seed
    )


def full_head(
    data: RoutingDevData, seed: int
) -> Callable[[npt.NDArray[np.bool_]], DifficultyClassifier]:
    def fit(train: npt.NDArray[np.bool_]) -> DifficultyClassifier:
        arrays, _ = train_on(data, train, seed)
        return DifficultyClassifier.from_arrays(arrays)

    return fit


def linear_head(
    data: RoutingDevData, c: float, seed: int, cheap_only: bool = False
) -> Callable[[npt.NDArray[np.bool_]], DifficultyClassifier]:
    y = labels(data)

    def fit(train: npt.NDArray[np.bool_]) -> DifficultyClassifier:
        embeddings = data.embeddings[train]
        if cheap_only:
            # Ablation: a constant embedding gets zero weight, so only cheap features count.
            embeddings = np.zeros_like(embeddings)
        arrays = fit_linear(embeddings, data.cheap[train], y[train], c=c, seed=seed)
        return DifficultyClassifier.from_arrays(arrays)

    return fit


def metric_row(scores: F64, weak: F64, strong: F64, rng: np.random.Generator) -> dict[str, float]:
    curve = pgr_curve(scores, weak, strong)
    boot = []
    for _ in range(300):
        pick = rng.integers(0, scores.size, scores.size)
        if strong[pick].sum() > weak[pick].sum():
            boot.append(apgr(pgr_curve(scores[pick], weak[pick], strong[pick])))
    low, high = np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan)
    coarse = routellm_curve(scores, weak, strong)
    return {
        "apgr": apgr(curve),
        "apgr_low": float(low),
        "apgr_high": float(high),
        "cpt50": cpt(curve, 0.5),
        "cpt80": cpt(curve, 0.8),
        "routellm_apgr": apgr(coarse),
        "routellm_cpt50": cpt(coarse, 0.5),
    }


def auc(scores: F64, positive: npt.NDArray[np.bool_]) -> float:
    """P(a random positive scores above a random negative), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def own_prompts_section(head: DifficultyClassifier) -> tuple[list[str], dict[str, float]]:
    rows = [json.loads(line) for line in OWN_PROMPTS.read_text().splitlines() if line.strip()]
    count_tokens = load_count_tokens()
    texts = [last_user_text(r["messages"]) for r in rows]
    embeddings = embed_texts(load_embedder(), texts)
    feats = [
        extract_features(r["messages"], e, count_tokens, v)
        for r, e, v in zip(rows, embeddings, shallow_views(texts), strict=True)
    ]
    scores = head.score_batch(feats)
    hard = np.array([bool(r["hard"]) for r in rows])
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: [r["kind"] for r in rows].index(k))
    lines = [
        f"{len(rows)} prompts written for this benchmark ({hard.sum()} labelled hard), scored by "
        "the shipped head (trained on all dev prompts; none of these is in the dev file).",
        "",
        f"**AUC hard vs easy: {auc(scores, hard):.3f}** (0.5 = no separation)",
        "",
        "| kind | label | n | mean score | min | max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in kinds:
        mask = np.array([r["kind"] == kind for r in rows])
        label = "hard" if hard[mask][0] else "easy"
        s = scores[mask]
        lines.append(
            f"| {kind} | {label} | {mask.sum()} | {s.mean():.3f} | {s.min():.3f} | {s.max():.3f} |"
        )
    for share, t in sorted(head.default_thresholds.items()):
        sent = scores >= t
        lines.append("")
        lines.append(
            f"At the shipped threshold for strong share {share:g} ({t:.3f}): "
            f"{sent[hard].sum()}/{hard.sum()} hard and {sent[~hard].sum()}/{(~hard).sum()} easy "
            "prompts go to the large engine."
        )
    return lines, {"auc": auc(scores, hard)}


def latency_section(head: DifficultyClassifier, data: RoutingDevData) -> list[str]:
    from scripts.routing_data import dev_prompt_messages

    count_tokens = load_count_tokens()
    picks = np.random.default_rng(0).integers(0, len(data.prompts), 3000)
    messages = [dev_prompt_messages(data.prompts[i]) for i in picks]
    timings: dict[str, list[float]] = {"wall": [], "cpu": [], "head_wall": [], "head_cpu": []}
    for i, m in zip(picks, messages, strict=True):
        wall, cpu = time.perf_counter(), time.thread_time()
        feats = extract_features(m, data.embeddings[i], count_tokens, data.shallow[i])
        mid_wall, mid_cpu = time.perf_counter(), time.thread_time()
        head.score(feats)
        end_wall, end_cpu = time.perf_counter(), time.thread_time()
        timings["wall"].append((end_wall - wall) * 1000)
        timings["cpu"].append((end_cpu - cpu) * 1000)
        timings["head_wall"].append((end_wall - mid_wall) * 1000)
        timings["head_cpu"].append((end_cpu - mid_cpu) * 1000)
    load = os.getloadavg()[0]

    def row(name: str, key: str) -> str:
        values = timings[key]
        p50, p99 = np.percentile(values, [50, 99])
        return f"| {name} | {p50:.3f} | {p99:.3f} | {max(values):.3f} |"

    return [
        f"{len(picks)} single-request calls on dev prompts, embedding given, one thread; token "
        "counting with MiniLM's fast tokenizer (the engine's tokenizer at run time). Host load "
        f"average {load:.1f} on {os.cpu_count()} cores while measuring: wall-clock tails include "
        "time the process waited for a core; thread CPU time does not.",
        "",
        "| step | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- |",
        row("features + score, wall clock", "wall"),
        row("features + score, thread CPU time", "cpu"),
        row("score only, wall clock", "head_wall"),
        row("score only, thread CPU time", "head_cpu"),
    ]


def plot(curves: dict[str, dict[str, GapCurve]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(next(iter(curves.values())).keys())
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), sharey=True)
    for ax, group in zip(np.atleast_1d(axes), groups, strict=True):
        for method, by_group in curves.items():
            c = by_group[group]
            ax.plot(c.strong_share, c.pgr, label=f"{method} ({apgr(c):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title(group)
        ax.set_xlabel("share of strong calls")
        ax.legend(fontsize=7, loc="lower right")
    np.atleast_1d(axes)[0].set_ylabel("performance gap recovered")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def own_prompt_aucs(
    data: RoutingDevData, settings: Sequence[ShallowSetting], seed: int
) -> dict[ShallowSetting, float]:
    """AUC hard vs easy on the own prompts of each setting's head trained on all dev prompts."""
    rows = [json.loads(line) for line in OWN_PROMPTS.read_text().splitlines() if line.strip()]
    texts = [last_user_text(r["messages"]) for r in rows]
    count_tokens = load_count_tokens()
    scores = scores_of_other_prompts(
        data,
        embed_texts(load_embedder(), texts, progress=False),
        np.stack([cheap_features(r["messages"], count_tokens) for r in rows]),
        shallow_views(texts),
        settings,
        seed,
    )
    hard = np.array([bool(r["hard"]) for r in rows])
    return {s: auc(v, hard) for s, v in scores.items()}


def multiseed_main(args: argparse.Namespace, command: str) -> int:
    """The held-out figures over several fold seeds (and nested), for every setting in the grid."""
    data = load_dev_data(args.data)
    settings = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    results = []
    started, started_at = time.time(), dt.datetime.now(dt.UTC)
    loads = [os.getloadavg()[0]]
    for fold_seed in parse_seeds(args.fold_seeds):
        print(f"fold seed {fold_seed}", flush=True)
        fold_of = dev_folds(data, args.folds, fold_seed)
        results.append(
            evaluate_fold_seed(
                data,
                fold_of,
                fold_seed,
                settings,
                seed=args.seed,
                nested=args.nested,
                per_benchmark_floor=args.nested_floor,
            )
        )
        loads.append(os.getloadavg()[0])
    own_auc = own_prompt_aucs(data, settings, args.seed)
    lines = [
        "# Routing benchmark: several fold splits"
        + (" and nested selection" if args.nested else ""),
        "",
        f"Run {started_at:%Y-%m-%d %H:%M} UTC: `{command}` "
        f"({(time.time() - started) / 60:.1f} min; "
        f"load average {min(loads):.1f}-{max(loads):.1f}). "
        f"{args.folds}-fold grouped splits as in the main benchmark (seed 0 is its split); heads "
        f"trained with model seed {args.seed}. Settings: the shallow-view vote's bandwidth b and "
        "prior weight a; residual r: the residual vote's bandwidth:prior weight; C: the linear "
        "part's. Nested: for each outer fold, the setting with the best overall APGR in a "
        f"{args.folds}-fold inner CV of the outer training part (grouped, its own seed)"
        + (
            ""
            if args.nested_floor is None
            else f" among those with APGR >= {args.nested_floor:g} on every benchmark there"
        )
        + ", then scored on the outer fold.",
        "",
        *summary_lines(results, settings, own_auc),
        "",
    ]
    (args.out / "routing_multiseed.md").write_text("\n".join(lines))
    (args.out / "routing_multiseed.json").write_text(
        json.dumps(
            [
                {
                    "fold_seed": r.fold_seed,
                    "by_setting": {s.label: m for s, m in r.by_setting.items()},
                    "nested": r.nested,
                    "picks": [p.label for p in r.picks],
                }
                for r in results
            ]
            + [{"own_prompt_auc": {s.label: a for s, a in own_auc.items()}}],
            indent=1,
        )
    )
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DEV_FILE)
    parser.add_argument("--out", type=Path, default=Path("out/routing"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c", type=float, default=DEFAULT_C, help="linear-part ablation")
    parser.add_argument("--head", type=Path, default=None, help="shipped head to test (default)")
    parser.add_argument(
        "--fold-seeds", default=None, help="e.g. 0,1,2,3,4: only the held-out figures, per seed"
    )
    parser.add_argument(
        "--nested", action="store_true", help="with --fold-seeds: settings picked by inner CV"
    )
    parser.add_argument(
        "--nested-floor",
        type=float,
        default=None,
        help="with --nested: inner CV picks among the settings whose APGR on every benchmark "
        "reaches this (e.g. 0.6, the per-benchmark target), if any does",
    )
    parser.add_argument(
        "--grid", default=None, help="with --fold-seeds: shallow-vote settings, e.g. none,20:1"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_routing.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.fold_seeds:
        return multiseed_main(args, command.strip())

    data = load_dev_data(args.data)
    rng = np.random.default_rng(args.seed)
    fold_of = dev_folds(data, args.folds, args.seed)
    methods: dict[str, F64] = {}
    print("k-fold: shipped head (linear + neighbours + stacker)")
    methods["classifier (shipped recipe)"] = out_of_fold_scores(
        data, fold_of, full_head(data, args.seed)
    )
    print("k-fold: linear part alone")
    methods["linear part alone"] = out_of_fold_scores(
        data, fold_of, linear_head(data, args.c, args.seed)
    )
    print("k-fold: cheap features only (ablation)")
    methods["cheap features only"] = out_of_fold_scores(
        data, fold_of, linear_head(data, 1.0, args.seed, cheap_only=True)
    )
    methods["prompt length (tokens)"] = data.cheap[:, 0].astype(np.float64)
    # One tie group: the curve is the diagonal, i.e. the random router's expected curve.
    methods["random (expected)"] = np.zeros(len(data.prompts))
    print("k-fold with whole MMLU subjects held out")
    unseen_subjects = out_of_fold_scores(
        data, subject_folds(data, args.folds, args.seed), full_head(data, args.seed)
    )

    groups = {"overall": np.ones(len(data.prompts), dtype=bool)}
    groups |= {b: data.benchmark == b for b in sorted(set(data.benchmark.tolist()))}
    table = [
        "| router | set | n | APGR (95% CI) | CPT(50%) | CPT(80%) | RouteLLM APGR "
        "| RouteLLM CPT(50%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def table_row(method: str, group: str, scores: F64, mask: npt.NDArray[np.bool_]) -> str:
        row = metric_row(scores[mask], data.weak[mask], data.strong[mask], rng)
        return (
            f"| {method} | {group} | {mask.sum()} | {row['apgr']:.3f} "
            f"({row['apgr_low']:.3f}-{row['apgr_high']:.3f}) | {row['cpt50']:.3f} | "
            f"{row['cpt80']:.3f} | {row['routellm_apgr']:.3f} | {row['routellm_cpt50']:.3f} |"
        )

    curves: dict[str, dict[str, GapCurve]] = {}
    for method, scores in methods.items():
        curves[method] = {}
        for group, mask in groups.items():
            table.append(table_row(method, group, scores, mask))
            curves[method][group] = pgr_curve(scores[mask], data.weak[mask], data.strong[mask])
    for group, mask in groups.items():
        table.append(
            table_row("shipped recipe, MMLU subjects unseen", group, unseen_subjects, mask)
        )
    plot(curves, args.out / "routing_pgr.png")

    head = DifficultyClassifier.load(args.head)
    own_lines, _ = own_prompts_section(head)
    shipped = head.default_thresholds
    today = dt.date.today().isoformat()
    command = "python scripts/bench_routing.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = [
        "# Routing benchmark",
        "",
        f"Run {today}: `{command.strip()}`",
        "",
        f"## Held-out dev prompts ({args.folds}-fold, every prompt scored out of fold)",
        "",
        f"Data: {args.data.name}, {len(data.prompts)} prompts (RouteLLM eval data; weak = "
        "Mixtral-8x7B, strong = GPT-4-1106). Training target: the strong model's win with ties "
        "counted half. Folds keep near-duplicates (cosine >= 0.95; both turns of an MT-Bench "
        "question) together; the last rows hold out whole MMLU subjects instead. "
        "RouteLLM columns: the same scores through RouteLLM's evaluation procedure (11 decile "
        "thresholds, trapezoids). "
        "Random router: its expected curve (the diagonal; APGR 0.5, CPT(p) = p). Prompt length: "
        "tokens of the last user turn. Intervals: 300 bootstrap resamples of the prompts.",
        "",
        *table,
        "",
        "![PGR curves](routing_pgr.png)",
        "",
        "## Own prompts (not from the dev data)",
        "",
        *own_lines,
        "",
        "## Shipped thresholds",
        "",
        "From the out-of-fold scores of the dev prompts at training time (in the head's metadata). "
        f"Head file: {(args.head or DEFAULT_HEAD_PATH).stat().st_size / 1024:.0f} KiB.",
        "",
        "| strong share | threshold |",
        "| --- | --- |",
        *[f"| {share:g} | {t:.4f} |" for share, t in sorted(shipped.items())],
        "",
        "## Scoring latency",
        "",
        *latency_section(head, data),
        "",
    ]
    (args.out / "routing_benchmark.md").write_text("\n".join(report))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
