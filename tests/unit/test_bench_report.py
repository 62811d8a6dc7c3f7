"""The comparison report: table rows, self-contained HTML, escaping."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.bench.compare import fill_command, strategy_names
from proxy.bench.report import comparison_rows, render_html
from proxy.bench.summary import EngineCost, RequestResult, summarize

PRICES = {"small": EngineCost(0.1, 0.2), "large": EngineCost(1.0, 3.0)}


def sample_summary(hit: bool) -> dict[str, object]:
    results = [
        RequestResult(0, 200, 0.2, cache="miss", engine="large", route="large", group="A",
                      answer_digest="d", prompt_tokens=100, completion_tokens=50,
                      ref={"weak": 0.0, "strong": 1.0}),
        RequestResult(1, 200, 0.01, cache="hit-semantic" if hit else "miss", engine="large",
                      route="large", group="B", answer_digest="d" if hit else "e",
                      prompt_tokens=100, completion_tokens=50),
        RequestResult(2, 503, 0.05),
    ]  # fmt: skip
    return summarize(results, 1.0, PRICES)


def test_rows_show_each_strategy() -> None:
    rows = comparison_rows(["plain", "cached"], [sample_summary(False), sample_summary(True)])
    assert [row[0] for row in rows] == ["plain", "cached"]
    assert rows[0][1] == "2/3"
    assert rows[1][6] == "50"  # hit % of successful requests
    assert rows[1][8] == "100"  # the one semantic hit returned another group's answer
    assert rows[0][8] == "-"
    assert rows[0][10] == "503=1"


def test_html_is_self_contained_and_escaped() -> None:
    html = render_html(
        "t<1>", ["a<b>", "c"], [sample_summary(False), sample_summary(True)], ["note & more"]
    )
    assert "<b>" not in html.replace("<body>", "")
    assert "a&lt;b&gt;" in html
    assert "note &amp; more" in html
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)) == 5
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere


def test_strategy_names_are_unique() -> None:
    names = strategy_names([Path("a/x.yaml"), Path("b/x.yaml"), Path("y.yaml"), Path("x.yaml")])
    assert names == ["x", "x-2", "y", "x-3"]


def test_fill_command_places_config_port_and_dir() -> None:
    command = fill_command(
        ["frugal", "serve", "--config", "{config}", "--port", "{port}", "--x={data_dir}"],
        Path("/t/c.yaml"),
        8123,
        Path("/t"),
    )
    assert command == ["frugal", "serve", "--config", "/t/c.yaml", "--port", "8123", "--x=/t"]


def test_a_strategy_cut_short_says_so() -> None:
    whole, cut = sample_summary(False), sample_summary(False)
    cut["not_sent"], cut["cancelled"] = 40, 2
    whole["not_sent"], whole["cancelled"] = 0, 0
    rows = comparison_rows(["whole", "cut"], [whole, cut])
    assert rows[0][1] == "2/3"
    assert rows[1][1] == "2/3 (42 not finished)"
