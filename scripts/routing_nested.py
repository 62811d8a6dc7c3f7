"""Multi-seed and nested cross-validation of the difficulty head's recipe (bench_routing.py).

One fold split (seed 0) is too few to call a target met when the head's settings were chosen on
that split. This module scores the recipe on folds dealt with several seeds, and checks the
settings (the shallow-view vote's, the residual vote's, the linear part's C) by nested
cross-validation: for each outer fold the setting is chosen by inner cross-validation on the
outer training rows only, then that fold is scored.

A head trained with each candidate setting shares the first vote and the stacker's folds, so
`head_scores_by_setting` fits the parts once per training set (the linear part once per value of
its C) and only redoes the votes' weighting and the 3- to 5-weight stacker per setting. It
reproduces `train_router.train_head` + `DifficultyClassifier.score_arrays` (checked by
tests/unit/test_routing_nested.py), at a fraction of the cost of one training per setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression

from proxy.routing.classifier import TOKENS_FEATURE, DifficultyClassifier, neighbour_logit
from proxy.routing.evaluation import apgr, cpt, pgr_curve
from scripts.routing_data import RoutingDevData
from scripts.train_router import (
    DEFAULT_BANDWIDTH,
    DEFAULT_C,
    DEFAULT_DIMS,
    INNER_FOLDS,
    RESIDUAL,
    SHALLOW_BANDWIDTH,
    SHALLOW_PRIOR_WEIGHT,
    fit_linear,
    fit_neighbours,
    fit_residual_vote,
    fit_shallow_neighbours,
    fit_soft_logistic,
    fold_strata,
    grouped_folds,
    labels,
    win_target,
)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]
# Targets of issue 4 (routing quality on held-out dev prompts).
TARGET_APGR = 0.68
TARGET_APGR_PER_BENCHMARK = 0.60
TARGET_CPT50 = 0.30
# Offset of the inner (selection) folds' seed from the outer folds' seed, so the two splits differ.
INNER_SEED_OFFSET = 1000


@dataclass(frozen=True, order=True)
class ShallowSetting:
    """The settings a head's recipe is checked over: the shallow-view vote's (bandwidth None = a
    head without that vote), the residual vote's (residual_bandwidth None = none; it needs the
    shallow vote) and the linear part's C."""

    bandwidth: float | None
    prior_weight: float = 0.0
    min_similarity: float | None = None  # keys less similar than this get no weight
    residual_bandwidth: float | None = None
    residual_prior_weight: float = 1.0
    linear_c: float = DEFAULT_C

    @property
    def label(self) -> str:
        c = "" if self.linear_c == DEFAULT_C else f", C={self.linear_c:g}"
        if self.bandwidth is None:
            return "no shallow vote" + c
        cutoff = "" if self.min_similarity is None else f", s>={self.min_similarity:g}"
        residual = (
            ""
            if self.residual_bandwidth is None
            else f", residual {self.residual_bandwidth:g}:{self.residual_prior_weight:g}"
        )
        return f"b={self.bandwidth:g}, a={self.prior_weight:g}{cutoff}{residual}{c}"

    @property
    def residual(self) -> tuple[float, float] | None:
        if self.bandwidth is None or self.residual_bandwidth is None:
            return None
        return (self.residual_bandwidth, self.residual_prior_weight)


SHIPPED = ShallowSetting(
    SHALLOW_BANDWIDTH,
    SHALLOW_PRIOR_WEIGHT,
    residual_bandwidth=None if RESIDUAL is None else RESIDUAL[0],
    residual_prior_weight=1.0 if RESIDUAL is None else RESIDUAL[1],
)


def parse_grid(text: str) -> tuple[ShallowSetting, ...]:
    """'none,20:1,15:0.5,20:0.5+r25:1@0.001' -> settings: bandwidth:prior weight[:min similarity]
    of the shallow vote ('none' = no shallow vote), then optionally '+r' and the residual vote's
    bandwidth:prior weight, then optionally '@' and the linear part's C."""
    settings = []
    for item in text.split(","):
        item = item.strip()
        votes, _, c = item.partition("@")
        shallow, _, residual = votes.partition("+r")
        try:
            linear_c = float(c) if c else DEFAULT_C
            if shallow == "none" and not residual:
                settings.append(ShallowSetting(None, linear_c=linear_c))
                continue
            bandwidth, _, rest = shallow.partition(":")
            prior, _, cutoff = rest.partition(":")
            residual_bandwidth, _, residual_prior = residual.partition(":")
            settings.append(
                ShallowSetting(
                    float(bandwidth),
                    float(prior or SHALLOW_PRIOR_WEIGHT),
                    float(cutoff) if cutoff else None,
                    float(residual_bandwidth) if residual else None,
                    float(residual_prior or 1.0),
                    linear_c,
                )
            )
        except ValueError as exc:
            raise ValueError(
                f"grid item {item!r}: expected 'none' or BANDWIDTH:PRIOR[:MIN_SIMILARITY], "
                "optionally +rBANDWIDTH:PRIOR (residual vote) and @C (linear part)"
            ) from exc
    if not settings:
        raise ValueError("empty grid")
    return tuple(dict.fromkeys(settings))


# Candidates for the nested check (run with --nested-floor 0.6): the head shipped before the
# residual vote (C 0.003, b 20, a 1) and settings with the residual vote whose heads trained on
# all dev prompts keep the own-prompt AUC at least that head's (0.741).
DEFAULT_GRID = parse_grid(
    "20:1@0.003,20:1+r30:0.5@0.001,20:0.5+r30:0.5@0.001,20:0.5+r25:1@0.001,"
    "17.5:1+r30:0.5@0.001,17.5:1+r25:1@0.001,15:2+r25:1@0.001,15:2+r30:0.5@0.001,"
    "15:4+r30:1@0.001"
)


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds = tuple(int(s) for s in text.split(",") if s.strip())
    if not seeds:
        raise ValueError("no fold seeds")
    return seeds


def absolute_vote(
    similarity: F32,
    labels_: F32,
    bandwidth: float,
    prior_weight: float,
    min_similarity: float | None = None,
) -> F64:
    """NeighbourVote.share with absolute weights, from a precomputed similarity matrix."""
    weights = np.exp(bandwidth * (similarity - 1.0))
    if min_similarity is not None:
        weights = np.where(similarity >= min_similarity, weights, 0.0)
    prior = float(labels_.mean())
    voted = (weights @ labels_ + prior_weight * prior) / (weights.sum(axis=1) + prior_weight)
    return np.asarray(voted, dtype=np.float64)


def residual_vote(similarity: F32, residuals: F32, bandwidth: float, prior_weight: float) -> F64:
    """ResidualVote.vote from a precomputed similarity matrix."""
    weights = np.exp(bandwidth * (similarity - 1.0))
    return np.asarray((weights @ residuals) / (weights.sum(axis=1) + prior_weight), np.float64)


@dataclass(frozen=True)
class PartOutputs:
    """The setting-free parts of a head trained on some rows, on other rows (the linear part
    and its training residuals once per C)."""

    linear: dict[float, F64]
    vote_logit: F64
    tokens: F64
    shallow_similarity: F32  # (scored rows, training rows), in the shallow vote's PCA space
    shallow_labels: F32
    residuals: dict[float, F32]  # per C: the training rows' target minus the linear probability

    def stack_inputs(self, setting: ShallowSetting) -> F64:
        columns = [self.linear[setting.linear_c], self.vote_logit, self.tokens]
        if setting.bandwidth is not None:
            share = absolute_vote(
                self.shallow_similarity,
                self.shallow_labels,
                setting.bandwidth,
                setting.prior_weight,
                setting.min_similarity,
            )
            columns.append(neighbour_logit(share))
        if setting.residual is not None:
            columns.append(
                residual_vote(
                    self.shallow_similarity, self.residuals[setting.linear_c], *setting.residual
                )
            )
        return np.stack(columns, axis=1)


def part_outputs(
    data: RoutingDevData,
    train: npt.NDArray[np.int64],
    scored: npt.NDArray[np.int64],
    seed: int,
    linear_cs: Sequence[float] = (DEFAULT_C,),
) -> PartOutputs:
    target = win_target(data)
    strong_better = (target == 1.0).astype(np.int64)
    arrays = (
        fit_neighbours(
            data.embeddings[train], target[train], dims=DEFAULT_DIMS, bandwidth=DEFAULT_BANDWIDTH
        )
        | fit_shallow_neighbours(data.shallow[train], dims=DEFAULT_DIMS)
        | {"stack_w": np.zeros(4, dtype=np.float32), "stack_b": np.array(0.0)}
    )
    linear: dict[float, F64] = {}
    residuals: dict[float, F32] = {}
    for c in dict.fromkeys(linear_cs):
        linear_arrays = fit_linear(
            data.embeddings[train], data.cheap[train], strong_better[train], c=c, seed=seed
        )
        part = DifficultyClassifier.from_arrays(linear_arrays | arrays)
        linear[c] = part.linear_logits(data.embeddings[scored], data.cheap[scored])
        # The prior weight is not used here; the labels are those the head file would hold.
        residual = fit_residual_vote(
            linear_arrays,
            data.embeddings[train],
            data.cheap[train],
            target[train],
            bandwidth=1.0,
            prior_weight=1.0,
        )
        residuals[c] = residual["residual_labels"].astype(np.float32)
    assert part.neighbours is not None and part.shallow_neighbours is not None
    vote = part.shallow_neighbours
    return PartOutputs(
        linear=linear,
        vote_logit=neighbour_logit(part.neighbours.share(data.embeddings[scored])),
        tokens=data.cheap[scored, TOKENS_FEATURE].astype(np.float64),
        shallow_similarity=np.asarray(
            vote.project(data.shallow[scored]) @ vote.keys.T, dtype=np.float32
        ),
        shallow_labels=vote.labels,
        residuals=residuals,
    )


def head_scores_by_setting(
    data: RoutingDevData,
    train: Mask,
    scored: Mask,
    settings: Sequence[ShallowSetting],
    seed: int,
) -> dict[ShallowSetting, F64]:
    """Scores of the rows `scored` by a head trained on the rows `train`, per setting: as
    train_router.train_on(data, train, seed) with that setting, then score_arrays."""
    rows = np.flatnonzero(train)
    scored_rows = np.flatnonzero(scored)
    target = win_target(data)[rows]
    strong_better = (target == 1.0).astype(np.int64)
    strata = fold_strata(data.benchmark, labels(data))[rows]
    stack_fold = grouped_folds(strata, data.groups[rows], INNER_FOLDS, seed + 1)
    cs = tuple(dict.fromkeys(s.linear_c for s in settings))
    oof_parts = [
        (fold, part_outputs(data, rows[stack_fold != fold], rows[stack_fold == fold], seed, cs))
        for fold in range(INNER_FOLDS)
    ]
    final_parts = part_outputs(data, rows, scored_rows, seed, cs)
    scores: dict[ShallowSetting, F64] = {}
    for setting in settings:
        width = 3 + (setting.bandwidth is not None) + (setting.residual is not None)
        stack_x = np.zeros((rows.size, width))
        for fold, parts in oof_parts:
            stack_x[stack_fold == fold] = parts.stack_inputs(setting)
        stacker = fit_soft_logistic(stack_x, target, seed=seed)
        calibration = LogisticRegression(C=1e6, max_iter=1000, random_state=seed)
        calibration.fit(stacker.decision_function(stack_x)[:, None], strong_better)
        slope, offset = float(calibration.coef_[0, 0]), float(calibration.intercept_[0])
        weights = (slope * stacker.coef_[0]).astype(np.float32).astype(np.float64)
        bias = float(np.float32(slope * stacker.intercept_[0] + offset))
        logits = final_parts.stack_inputs(setting) @ weights + bias
        scores[setting] = 1.0 / (1.0 + np.exp(-np.clip(logits, -40.0, 40.0)))
    return scores


def scores_of_other_prompts(
    data: RoutingDevData,
    embeddings: F32,
    cheap: F32,
    shallow: F32,
    settings: Sequence[ShallowSetting],
    seed: int,
) -> dict[ShallowSetting, F64]:
    """Scores of prompts outside the dev file by heads trained on all dev prompts, per setting."""
    n, extra = len(data.prompts), len(embeddings)
    combined = RoutingDevData(
        benchmark=np.concatenate([data.benchmark, np.full(extra, "other")]),
        subset=np.concatenate([data.subset, np.full(extra, "other")]),
        prompts=[*data.prompts, *[""] * extra],
        weak=np.concatenate([data.weak, np.zeros(extra)]),
        strong=np.concatenate([data.strong, np.zeros(extra)]),
        embeddings=np.concatenate([data.embeddings, embeddings]),
        cheap=np.concatenate([data.cheap, cheap]),
        groups=np.concatenate([data.groups, data.groups.max() + 1 + np.arange(extra)]),
        shallow=np.concatenate([data.shallow, shallow]),
    )
    dev = np.arange(n + extra) < n
    return head_scores_by_setting(combined, dev, ~dev, settings, seed)


def metrics(data: RoutingDevData, scores: F64, rows: Mask | None = None) -> dict[str, float]:
    """APGR overall and per benchmark, CPT(50%) and CPT(80%) overall, on `rows` (default all)."""
    rows = np.ones(len(scores), dtype=bool) if rows is None else rows
    curve = pgr_curve(scores[rows], data.weak[rows], data.strong[rows])
    out = {"overall": apgr(curve), "cpt50": cpt(curve, 0.5), "cpt80": cpt(curve, 0.8)}
    for benchmark in sorted(set(data.benchmark[rows].tolist())):
        mask = rows & (data.benchmark == benchmark)
        out[benchmark] = apgr(pgr_curve(scores[mask], data.weak[mask], data.strong[mask]))
    return out


def select_setting(
    data: RoutingDevData,
    scores: dict[ShallowSetting, F64],
    rows: Mask,
    per_benchmark_floor: float | None = None,
) -> ShallowSetting:
    """The setting with the best overall APGR of out-of-fold `scores` over `rows` (the first of
    the grid on a tie); with `per_benchmark_floor`, among the settings whose APGR on every
    benchmark reaches it (all settings if none does)."""
    by_setting = {setting: metrics(data, s, rows) for setting, s in scores.items()}
    candidates = list(by_setting)
    if per_benchmark_floor is not None:
        benchmarks = sorted(set(data.benchmark[rows].tolist()))
        meeting = [
            setting
            for setting in candidates
            if all(by_setting[setting][b] >= per_benchmark_floor for b in benchmarks)
        ]
        candidates = meeting or candidates
    return max(candidates, key=lambda setting: by_setting[setting]["overall"])


@dataclass
class SeedResult:
    fold_seed: int
    by_setting: dict[ShallowSetting, dict[str, float]]
    nested: dict[str, float] | None = None
    picks: list[ShallowSetting] = field(default_factory=list)


def evaluate_fold_seed(
    data: RoutingDevData,
    fold_of: npt.NDArray[np.int64],
    fold_seed: int,
    settings: Sequence[ShallowSetting],
    *,
    seed: int,
    nested: bool,
    per_benchmark_floor: float | None = None,
    log: Callable[[str], None] = print,
) -> SeedResult:
    """Out-of-fold scores of every setting on the outer folds `fold_of`; with `nested`, also of
    the setting that inner cross-validation on each outer training part picks (select_setting,
    with `per_benchmark_floor`)."""
    n = len(data.prompts)
    scores = {s: np.zeros(n) for s in settings}
    nested_scores = np.zeros(n)
    picks: list[ShallowSetting] = []
    strata = fold_strata(data.benchmark, labels(data))
    for fold in range(int(fold_of.max()) + 1):
        test = fold_of == fold
        outer = head_scores_by_setting(data, ~test, test, settings, seed)
        for setting, s in outer.items():
            scores[setting][test] = s
        if nested:
            rows = np.flatnonzero(~test)
            inner_of = grouped_folds(
                strata[rows],
                data.groups[rows],
                int(fold_of.max()) + 1,
                fold_seed + INNER_SEED_OFFSET,
            )
            inner_scores = {s: np.zeros(n) for s in settings}
            for inner in range(int(inner_of.max()) + 1):
                inner_test = np.zeros(n, dtype=bool)
                inner_test[rows[inner_of == inner]] = True
                inner_train = ~test & ~inner_test
                got = head_scores_by_setting(data, inner_train, inner_test, settings, seed)
                for setting, s in got.items():
                    inner_scores[setting][inner_test] = s
            pick = select_setting(data, inner_scores, ~test, per_benchmark_floor)
            picks.append(pick)
            nested_scores[test] = outer[pick]
            log(f"  fold seed {fold_seed}, outer fold {fold + 1}: inner CV picks {pick.label}")
        else:
            log(f"  fold seed {fold_seed}, outer fold {fold + 1} done")
    return SeedResult(
        fold_seed=fold_seed,
        by_setting={s: metrics(data, v) for s, v in scores.items()},
        nested=metrics(data, nested_scores) if nested else None,
        picks=picks,
    )


METRIC_COLUMNS = ("overall", "gsm8k", "mmlu", "mt_bench", "cpt50", "cpt80")


def meets_targets(row: dict[str, float]) -> bool:
    per_benchmark = [v for k, v in row.items() if k not in ("overall", "cpt50", "cpt80")]
    return (
        row["overall"] >= TARGET_APGR
        and all(v >= TARGET_APGR_PER_BENCHMARK for v in per_benchmark)
        and row["cpt50"] <= TARGET_CPT50
    )


def summary_lines(
    results: Sequence[SeedResult],
    settings: Sequence[ShallowSetting],
    own_auc: dict[ShallowSetting, float] | None = None,
) -> list[str]:
    """Markdown: per seed, then mean ± sd and min over seeds, for each setting and nested; the
    own prompts' AUC of each setting's head trained on all dev prompts, if given."""
    seeds = ", ".join(str(r.fold_seed) for r in results)
    lines = [
        f"Fold seeds {seeds}; each row's figures are out-of-fold over all dev prompts for one fold "
        "split. APGR columns: overall and per benchmark; CPT columns: overall. Targets: APGR >= "
        f"{TARGET_APGR} overall, >= {TARGET_APGR_PER_BENCHMARK} per benchmark, CPT(50%) <= "
        f"{TARGET_CPT50}.",
        "",
        "| head | fold seed | " + " | ".join(METRIC_COLUMNS) + " | targets met |",
        "| --- | --- | " + " | ".join("---" for _ in METRIC_COLUMNS) + " | --- |",
    ]
    rows_by_head: dict[str, list[dict[str, float]]] = {}
    for r in results:
        if r.nested is not None:
            rows_by_head.setdefault("nested (inner CV picks the setting)", []).append(r.nested)
        for s in settings:
            name = s.label + (" (shipped)" if s == SHIPPED else "")
            rows_by_head.setdefault(name, []).append(r.by_setting[s])
    for name, rows in rows_by_head.items():
        for r, row in zip(results, rows, strict=True):
            cells = " | ".join(f"{row[c]:.3f}" for c in METRIC_COLUMNS)
            lines.append(
                f"| {name} | {r.fold_seed} | {cells} | {'yes' if meets_targets(row) else 'no'} |"
            )
        stats = {c: np.array([row[c] for row in rows]) for c in METRIC_COLUMNS}
        cells = " | ".join(
            f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0:.3f}" for v in stats.values()
        )
        lines.append(
            f"| **{name}** | mean ± sd | {cells} | {sum(map(meets_targets, rows))}/{len(rows)} |"
        )
        worst = " | ".join(
            f"{(v.max() if c.startswith('cpt') else v.min()):.3f}" for c, v in stats.items()
        )
        lines.append(f"| {name} | worst seed | {worst} | |")
    picks = [(r.fold_seed, p) for r in results for p in r.picks]
    if picks:
        counts: dict[str, int] = {}
        for _, p in picks:
            counts[p.label] = counts.get(p.label, 0) + 1
        lines += [
            "",
            "Settings picked by inner CV (outer folds, all seeds): "
            + ", ".join(f"{label} x{n}" for label, n in sorted(counts.items(), key=lambda x: -x[1]))
            + ".",
        ]
    if own_auc:
        lines += [
            "",
            "Own prompts (scripts/routing_own_prompts.jsonl), AUC hard vs easy of each setting's "
            "head trained on all dev prompts: "
            + ", ".join(f"{s.label} {auc:.3f}" for s, auc in own_auc.items())
            + ".",
        ]
    return lines
