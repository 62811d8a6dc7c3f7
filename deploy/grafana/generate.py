"""Write deploy/grafana/frugal.json, the Grafana dashboard over Frugal's ``frugal_*`` metrics.

    python deploy/grafana/generate.py            # rewrites frugal.json next to this file

The JSON is generated so panel ids and grid positions stay consistent when panels change;
tests/unit/test_alerts.py checks that every metric it names exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
TIER = 'tier=~"$tier"'
ENGINE = 'engine=~"$engine"'
RATE = "$__rate_interval"


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    targets: list[Target]
    kind: str = "timeseries"  # timeseries | stat | bargauge
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    stack: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def quantiles(metric: str, by: str, selector: str, qs: tuple[float, ...]) -> list[Target]:
    return [
        Target(
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in qs
    ]


ROWS = [
    Row(
        "Overview",
        [
            Panel(
                "Requests / s",
                [Target(f"sum(rate(frugal_requests_total{{{TIER}}}[{RATE}]))", "req/s")],
                kind="stat",
                unit="reqps",
                width=4,
                height=4,
            ),
            Panel(
                "Errors (5xx)",
                [
                    Target(
                        f'sum(rate(frugal_requests_total{{{TIER}, status=~"5.."}}[{RATE}])) / '
                        f"sum(rate(frugal_requests_total{{{TIER}}}[{RATE}]))",
                        "errors",
                    )
                ],
                kind="stat",
                unit="percentunit",
                width=4,
                height=4,
            ),
            Panel(
                "Served from cache",
                [
                    Target(
                        f'sum(rate(frugal_requests_total{{{TIER}, cache=~"hit.*"}}[{RATE}])) / '
                        f"sum(rate(frugal_requests_total{{{TIER}}}[{RATE}]))",
                        "from cache",
                    )
                ],
                kind="stat",
                unit="percentunit",
                width=4,
                height=4,
            ),
            Panel(
                "Latency p95 (engine-served)",
                quantiles(
                    "frugal_request_latency_seconds", "tier", f'{TIER}, cache="miss"', (0.95,)
                )[:1],
                kind="stat",
                unit="s",
                width=4,
                height=4,
            ),
            Panel(
                "Cost / hour",
                [Target(f"sum(rate(frugal_cost_usd_total{{{TIER}}}[{RATE}])) * 3600", "USD/h")],
                kind="stat",
                unit="currencyUSD",
                width=4,
                height=4,
            ),
            Panel(
                "Saved / hour",
                [Target(f"sum(rate(frugal_saved_usd_total{{{TIER}}}[{RATE}])) * 3600", "USD/h")],
                kind="stat",
                unit="currencyUSD",
                width=4,
                height=4,
            ),
        ],
    ),
    Row(
        "Traffic",
        [
            Panel(
                "Requests / s by tier",
                [
                    Target(
                        f"sum by (tier) (rate(frugal_requests_total{{{TIER}}}[{RATE}]))", "{{tier}}"
                    )
                ],
                unit="reqps",
                width=8,
                stack=True,
            ),
            Panel(
                "Requests / s by cache outcome",
                [
                    Target(
                        f"sum by (cache) (rate(frugal_requests_total{{{TIER}}}[{RATE}]))",
                        "{{cache}}",
                    )
                ],
                unit="reqps",
                width=8,
                stack=True,
            ),
            Panel(
                "Requests / s by status",
                [
                    Target(
                        f"sum by (status) (rate(frugal_requests_total{{{TIER}}}[{RATE}]))",
                        "{{status}}",
                    )
                ],
                unit="reqps",
                width=8,
            ),
            Panel(
                "Tokens / s",
                [
                    Target(
                        f"sum by (engine) (rate(frugal_tokens_in_total{{{TIER}}}[{RATE}]))",
                        "in {{engine}}",
                    ),
                    Target(
                        f"sum by (engine) (rate(frugal_tokens_out_total{{{TIER}}}[{RATE}]))",
                        "out {{engine}}",
                    ),
                ],
                width=12,
            ),
            Panel(
                "In flight",
                [Target(f"sum by (tier) (frugal_requests_in_flight{{{TIER}}})", "{{tier}}")],
                width=12,
            ),
        ],
    ),
    Row(
        "Latency",
        [
            Panel(
                "Request latency by engine (cache misses)",
                quantiles(
                    "frugal_request_latency_seconds",
                    "engine",
                    f'{TIER}, {ENGINE}, cache="miss"',
                    (0.5, 0.95, 0.99),
                ),
                unit="s",
            ),
            Panel(
                "Latency of cache hits",
                quantiles(
                    "frugal_request_latency_seconds",
                    "cache",
                    f'{TIER}, cache=~"hit.*"',
                    (0.5, 0.99),
                ),
                unit="s",
            ),
            Panel(
                "Time to first token",
                quantiles(
                    "frugal_time_to_first_token_seconds",
                    "engine",
                    f"{TIER}, {ENGINE}",
                    (0.5, 0.95),
                ),
                unit="s",
            ),
            Panel(
                "Proxy's own added time",
                quantiles("frugal_proxy_overhead_seconds", "tier", TIER, (0.5, 0.99)),
                unit="s",
                description="Parse, policy, routing, embedding wait and cache, without upstream.",
            ),
        ],
    ),
    Row(
        "Cache",
        [
            Panel(
                "Hit rate by kind",
                [
                    Target(
                        f"sum by (kind) (rate(frugal_cache_hits_total[{RATE}])) / "
                        f"sum by (kind) (rate(frugal_cache_lookups_total[{RATE}]))",
                        "{{kind}}",
                    )
                ],
                unit="percentunit",
                width=8,
            ),
            Panel(
                "Semantic hit similarity",
                [
                    Target(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(frugal_cache_hit_similarity_bucket[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.05, 0.5)
                ],
                width=8,
            ),
            Panel(
                "Cache store errors / s",
                [
                    Target(
                        f"sum by (backend, op) (rate(frugal_cache_errors_total[{RATE}]))",
                        "{{backend}} {{op}}",
                    )
                ],
                unit="ops",
                width=8,
            ),
        ],
    ),
    Row(
        "Routing and admission",
        [
            Panel(
                "Route decisions / s by engine",
                [
                    Target(
                        f"sum by (engine) (rate(frugal_route_decisions_total{{{TIER}}}[{RATE}]))",
                        "{{engine}}",
                    )
                ],
                unit="reqps",
                width=8,
                stack=True,
            ),
            Panel(
                "Route decisions / s by reason",
                [
                    Target(
                        f"sum by (reason) (rate(frugal_route_decisions_total{{{TIER}}}[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                unit="reqps",
                width=8,
            ),
            Panel(
                "Queue length",
                [Target(f"max by (engine) (frugal_queue_length{{{ENGINE}}})", "{{engine}}")],
                width=8,
            ),
            Panel(
                "Queue wait p95",
                quantiles("frugal_queue_wait_seconds", "engine", f"{ENGINE}", (0.95,)),
                unit="s",
                width=8,
            ),
            Panel(
                "Refused requests / s",
                [
                    Target(
                        f"sum by (engine, reason) "
                        f"(rate(frugal_admission_rejected_total{{{TIER}}}[{RATE}]))",
                        "admission {{engine}} {{reason}}",
                    ),
                    Target(
                        f"sum by (tier, reason) "
                        f"(rate(frugal_policy_rejected_total{{{TIER}}}[{RATE}]))",
                        "policy {{tier}} {{reason}}",
                    ),
                ],
                unit="reqps",
                width=8,
            ),
            Panel(
                "Embedding batches",
                [
                    Target(
                        f"sum(rate(frugal_embedding_batch_size_sum[{RATE}])) / "
                        f"sum(rate(frugal_embedding_batch_size_count[{RATE}]))",
                        "mean batch size",
                    ),
                    Target(
                        f"histogram_quantile(0.95, sum by (le) "
                        f"(rate(frugal_embedding_batch_wait_seconds_bucket[{RATE}]))) * 1000",
                        "p95 wait (ms)",
                    ),
                ],
                width=8,
            ),
        ],
    ),
    Row(
        "Engines",
        [
            Panel(
                "vLLM batch: running and waiting",
                [
                    Target(
                        f"sum by (engine) (frugal_engine_requests_running{{{ENGINE}}})",
                        "running {{engine}}",
                    ),
                    Target(
                        f"sum by (engine) (frugal_engine_requests_waiting{{{ENGINE}}})",
                        "waiting {{engine}}",
                    ),
                ],
                width=8,
            ),
            Panel(
                "KV cache use by replica",
                [
                    Target(
                        f"frugal_engine_kv_cache_usage_ratio{{{ENGINE}}}",
                        "{{engine}} {{replica}}",
                    )
                ],
                unit="percentunit",
                width=8,
            ),
            Panel(
                "Healthy replicas",
                [Target(f"sum by (engine) (frugal_engine_up{{{ENGINE}}})", "{{engine}}")],
                width=8,
            ),
            Panel(
                "Breakers not closed",
                [
                    Target(
                        f'frugal_breaker_state{{{ENGINE}, state!="closed"}} == 1',
                        "{{engine}} {{replica}} {{state}}",
                    )
                ],
                width=12,
            ),
            Panel(
                "Upstream retries / s",
                [
                    Target(
                        f"sum by (engine, reason) "
                        f"(rate(frugal_upstream_retries_total{{{ENGINE}}}[{RATE}]))",
                        "{{engine}} {{reason}}",
                    )
                ],
                unit="ops",
                width=12,
            ),
        ],
    ),
    Row(
        "Cost and budget",
        [
            Panel(
                "Cost USD / hour by tier",
                [
                    Target(
                        f"sum by (tier) (rate(frugal_cost_usd_total{{{TIER}}}[{RATE}])) * 3600",
                        "{{tier}}",
                    )
                ],
                unit="currencyUSD",
                width=8,
                stack=True,
            ),
            Panel(
                "Saved USD / hour by source",
                [
                    Target(
                        f"sum by (source) (rate(frugal_saved_usd_total{{{TIER}}}[{RATE}])) * 3600",
                        "{{source}}",
                    )
                ],
                unit="currencyUSD",
                width=8,
                stack=True,
            ),
            Panel(
                "Budget spent today",
                [
                    Target(f"frugal_budget_spent_usd{{{TIER}}}", "spent {{tier}}"),
                    Target(f"frugal_budget_limit_usd{{{TIER}}}", "limit {{tier}}"),
                ],
                unit="currencyUSD",
                width=8,
            ),
        ],
    ),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": [
            {
                "datasource": DS,
                "expr": t.expr,
                "legendFormat": t.legend or "__auto",
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, t in enumerate(panel.targets)
        ],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {},
    }
    if panel.description:
        body["description"] = panel.description
    if panel.kind == "timeseries":
        body["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 0,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "spanNulls": False,
        }
        body["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value",
        }
    return body


def variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "title": "Frugal proxy",
        "uid": "frugal-proxy",
        "description": "Frugal: requests, latency, cache, routing, engines, cost and budgets.",
        "tags": ["frugal", "llm", "vllm"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("tier", "label_values(frugal_requests_total, tier)"),
                variable("engine", "label_values(frugal_route_decisions_total, engine)"),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def main() -> None:
    out = Path(__file__).with_name("frugal.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
