"""RouteLLM's router metrics: performance gap recovered (PGR), its area (APGR) and CPT.

A router with a score per prompt and a threshold sends the prompts scoring at least the threshold
to the strong model. Sweeping the threshold traces quality against the share of strong calls; PGR
rescales quality so that all-weak is 0 and all-strong is 1. APGR is the area under PGR over the
strong share from 0 to 1 (a random router scores 0.5); CPT(p) is the smallest strong share at
which PGR reaches p.

Tied scores cannot be split by any threshold, so the curve only has points at tie boundaries and
the straight segment between two of them is the expected value under a random tie break.

`pgr_curve` cuts at every score, so its area is the exact integral. RouteLLM's own evaluation
(routellm/evals: benchmarks.py and evaluate.py, `--num-results 10`) samples the curve at 11
thresholds only, the deciles of the scores, and takes trapezoids between them; `routellm_curve`
reproduces that sampling. On a concave curve the coarse trapezoids lie a little below the exact
area, so RouteLLM's figure is usually a few thousandths lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class GapCurve:
    """PGR against strong share, from (0, 0) to (1, 1)."""

    strong_share: npt.NDArray[np.float64]
    pgr: npt.NDArray[np.float64]


F64 = npt.NDArray[np.float64]


def _checked(
    scores: npt.ArrayLike, weak_scores: npt.ArrayLike, strong_scores: npt.ArrayLike
) -> tuple[F64, F64, F64, float]:
    s = np.asarray(scores, dtype=np.float64)
    weak = np.asarray(weak_scores, dtype=np.float64)
    strong = np.asarray(strong_scores, dtype=np.float64)
    if not (s.shape == weak.shape == strong.shape) or s.ndim != 1 or s.size == 0:
        raise ValueError("scores, weak_scores and strong_scores must be equal-length 1-d arrays")
    gap = float(strong.sum() - weak.sum())
    if gap <= 0:
        raise ValueError("the strong model is not better than the weak one: no gap to recover")
    return s, weak, strong, gap


def pgr_curve(
    scores: npt.ArrayLike, weak_scores: npt.ArrayLike, strong_scores: npt.ArrayLike
) -> GapCurve:
    """The PGR curve of a router; needs a positive gap (strong better than weak on average)."""
    s, weak, strong, gap = _checked(scores, weak_scores, strong_scores)
    order = np.argsort(-s, kind="stable")
    gain = np.concatenate(([0.0], np.cumsum((strong - weak)[order])))
    sorted_scores = s[order]
    # Points where a threshold can cut: before the first prompt, after each tie group.
    boundaries = np.flatnonzero(np.diff(sorted_scores) != 0) + 1
    cuts = np.concatenate(([0], boundaries, [s.size]))
    pgr = gain[cuts] / gap
    pgr[-1] = 1.0  # exact by definition; the cumulative sum may round a hair off
    return GapCurve(strong_share=cuts / s.size, pgr=pgr)


def routellm_curve(
    scores: npt.ArrayLike, weak_scores: npt.ArrayLike, strong_scores: npt.ArrayLike, bins: int = 10
) -> GapCurve:
    """The PGR curve at RouteLLM's thresholds: the score quantiles 0, 1/bins, ..., 1.

    As in RouteLLM, a prompt goes strong when its score is >= the threshold, except at the top
    threshold, where it must be > (so that point is all-weak).
    """
    s, weak, strong, gap = _checked(scores, weak_scores, strong_scores)
    thresholds = np.quantile(s, np.linspace(0.0, 1.0, bins + 1))
    shares, pgrs = [], []
    for i, threshold in enumerate(thresholds):
        strong_call = s > threshold if i == bins else s >= threshold
        shares.append(float(strong_call.mean()))
        pgrs.append(float((strong - weak)[strong_call].sum()) / gap)
    order = np.argsort(shares, kind="stable")
    return GapCurve(strong_share=np.asarray(shares)[order], pgr=np.asarray(pgrs)[order])


def apgr(curve: GapCurve) -> float:
    """Area under the PGR curve (trapezoids)."""
    x, y = curve.strong_share, curve.pgr
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def cpt(curve: GapCurve, target_pgr: float) -> float:
    """Smallest strong share at which PGR reaches `target_pgr` (linear between curve points)."""
    if not 0.0 < target_pgr <= 1.0:
        raise ValueError(f"target_pgr must be in (0, 1], got {target_pgr}")
    x, y = curve.strong_share, curve.pgr
    first = int(np.flatnonzero(y >= target_pgr)[0])  # the curve ends at PGR 1: always reached
    if first == 0:
        return 0.0
    x0, x1, y0, y1 = x[first - 1], x[first], y[first - 1], y[first]
    return float(x0 + (target_pgr - y0) * (x1 - x0) / (y1 - y0))
