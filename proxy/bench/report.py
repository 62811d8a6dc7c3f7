"""One self-contained HTML report comparing strategies (plots embedded as base64 PNGs).

Plots are drawn on ``matplotlib.figure.Figure`` objects directly (no pyplot), so no global
figure state is touched and nothing needs a display.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CACHE_COLOURS = {
    "hit-exact": "#2b8a3e",
    "hit-semantic": "#74b816",
    "miss": "#adb5bd",
    "bypass": "#868e96",
}


def _png(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(title: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=(7.0, 3.6))
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return figure, axes


def cost_plot(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> str:
    figure, axes = _figure("Engine cost per 1,000 requests")
    values = [s["cost"]["per_1k_requests"] for s in summaries]
    bars = axes.bar(names, values, color="#1c7ed6")
    axes.bar_label(bars, fmt="%.4g")
    axes.set_ylabel("cost (config currency)")
    return _png(figure)


def latency_plot(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> str:
    figure, axes = _figure("Latency percentiles")
    width = 0.25
    for offset, (p, colour) in enumerate(
        (("p50", "#4dabf7"), ("p95", "#1c7ed6"), ("p99", "#0b4f8a"))
    ):
        values = [(s["latency_s"] or {}).get(p, 0.0) * 1000 for s in summaries]
        positions = [i + (offset - 1) * width for i in range(len(names))]
        axes.bar(positions, values, width, label=p, color=colour)
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("ms")
    axes.legend()
    return _png(figure)


def _stacked(
    title: str,
    names: Sequence[str],
    rows: Sequence[Mapping[str, float]],
    colours: Mapping[str, str],
) -> str:
    figure, axes = _figure(title)
    keys = [k for k in colours if any(k in row for row in rows)]
    keys += sorted({k for row in rows for k in row} - set(keys))
    bottoms = [0.0] * len(names)
    for key in keys:
        values = [row.get(key, 0.0) * 100 for row in rows]
        axes.bar(names, values, bottom=bottoms, label=key, color=colours.get(key))
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axes.set_ylabel("% of successful requests")
    axes.set_ylim(0, 100)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)


def hit_rate_plot(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> str:
    return _stacked(
        "Cache outcome", names, [s["cache"]["rates"] for s in summaries], _CACHE_COLOURS
    )


def engine_share_plot(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> str:
    return _stacked(
        "Share of each engine (route)", names, [s["routes"]["share"] for s in summaries], {}
    )


def quality_plot(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> str | None:
    """Semantic false-hit rate and routed answer quality, where the trace carries labels."""
    false_hits = [s["quality"]["cache"]["hit-semantic"]["false_hit_rate"] for s in summaries]
    routing = [s["quality"]["routing"] or {} for s in summaries]
    quality = [r.get("mean_quality") for r in routing]
    if all(v is None for v in false_hits) and all(v is None for v in quality):
        return None
    figure = Figure(figsize=(9.0, 3.6))
    left, right = figure.subplots(1, 2)
    left.set_title("Semantic false-hit rate")
    _bars_or_na(left, names, [None if v is None else 100 * v for v in false_hits], "#e03131")
    left.set_ylabel("% of judged semantic hits")
    right.set_title("Expected answer quality (routing refs)")
    _bars_or_na(right, names, quality, "#7048e8")
    weak = [r.get("all_weak_quality") for r in routing if r.get("all_weak_quality") is not None]
    strong = [
        r.get("all_strong_quality") for r in routing if r.get("all_strong_quality") is not None
    ]
    if weak and strong:
        right.axhline(weak[0], color="#adb5bd", linestyle="--", label="all weak")
        right.axhline(strong[0], color="#343a40", linestyle="--", label="all strong")
        right.legend()
    for axes in (left, right):
        axes.grid(axis="y", alpha=0.3)
        axes.tick_params(axis="x", labelrotation=20)
    return _png(figure)


def _bars_or_na(
    axes: Any, names: Sequence[str], values: Sequence[float | None], colour: str
) -> None:
    """Bars with their values; a strategy without a value gets an "n/a" label, not a zero bar."""
    bars = axes.bar(names, [v or 0.0 for v in values], color=colour)
    axes.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in values])
    axes.set_ylim(bottom=0)
    if all(v is None for v in values):
        axes.set_ylim(0, 1)


def _number(value: Any, scale: float = 1.0, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}g}"


def comparison_rows(
    names: Sequence[str], summaries: Sequence[Mapping[str, Any]]
) -> list[list[str]]:
    """The table at the top of the report: one row per strategy."""
    rows = []
    for name, s in zip(names, summaries, strict=True):
        latency = s["latency_s"] or {}
        semantic = s["quality"]["cache"]["hit-semantic"]
        routing = s["quality"]["routing"] or {}
        rows.append(
            [
                name,
                _ok_of_sent(s),
                _number(s["requests_per_s"]),
                _number(latency.get("p50"), 1000),
                _number(latency.get("p95"), 1000),
                _number(latency.get("p99"), 1000),
                _number(s["cache"]["hit_rate"], 100, 3),
                _number(s["cost"]["per_1k_requests"]),
                _number(semantic["false_hit_rate"], 100, 3),
                _number(routing.get("mean_quality"), 1, 3),
                ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none",
            ]
        )
    return rows


def _ok_of_sent(summary: Mapping[str, Any]) -> str:
    cell = f"{summary['ok']}/{summary['requests']}"
    # Stopped at --max-duration or by Ctrl-C: its figures are of the trace's first part only,
    # which the table must say, or it reads as the whole workload beside the other strategies.
    unfinished = summary.get("not_sent", 0) + summary.get("cancelled", 0)
    return f"{cell} ({unfinished} not finished)" if unfinished else cell


_HEADERS = [
    "strategy",
    "ok/sent",
    "req/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "hit %",
    "cost / 1k req",
    "semantic false-hit %",
    "routing quality",
    "errors",
]


def render_html(
    title: str,
    names: Sequence[str],
    summaries: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
) -> str:
    esc = html.escape
    table = "".join(
        "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
        for row in comparison_rows(names, summaries)
    )
    plots = [
        cost_plot(names, summaries),
        latency_plot(names, summaries),
        hit_rate_plot(names, summaries),
        engine_share_plot(names, summaries),
    ]
    quality = quality_plot(names, summaries)
    if quality is not None:
        plots.append(quality)
    images = "".join(f'<img alt="plot" src="data:image/png;base64,{png}">' for png in plots)
    details = "".join(
        f"<details><summary>{esc(name)}: full summary</summary><pre>"
        f"{esc(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())}</pre></details>"
        for name, summary in zip(names, summaries, strict=True)
    )
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #212529; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
td, th {{ border: 1px solid #dee2e6; padding: 0.3rem 0.6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ display: block; margin: 1rem 0; max-width: 100%; }}
pre {{ background: #f8f9fa; padding: 0.8rem; overflow-x: auto; }}
</style></head><body>
<h1>{esc(title)}</h1>
<ul>{note_items}</ul>
<table><tr>{"".join(f"<th>{esc(h)}</th>" for h in _HEADERS)}</tr>{table}</table>
{images}
{details}
</body></html>
"""
