"""The example alert rules and the Grafana dashboard only name series the proxy really exposes."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.observability.metrics import Metrics, metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
GRAFANA = DEPLOY / "grafana" / "frugal.json"
GRAFANA_GENERATOR = DEPLOY / "grafana" / "generate.py"

RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"info", "warning", "critical"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
METRIC_NAME = re.compile(r"\bfrugal_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(frugal_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
PROMTOOL = shutil.which("promtool")


def load_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return loaded


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def grafana() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(GRAFANA.read_text())
    return loaded


def grafana_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in grafana()["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def exercised_metrics() -> Metrics:
    """A Metrics object with one child behind every series, so samples show their labels."""
    m = Metrics()
    m.request_done(
        tier="t",
        model="m",
        engine="e",
        status=200,
        cache="miss",
        latency_s=0.1,
        ttft_s=0.05,
        overhead_s=0.0001,
        tokens_in=1,
        tokens_out=1,
        cost_usd=0.1,
        saved_cache_usd=0.1,
        saved_routing_usd=0.1,
        stream=True,
    )
    m.in_flight(tier="t", delta=1)
    m.cache_lookup(kind="semantic", scope="s", hit=True, similarity=0.9)
    m.cache_error(backend="redis", op="get")
    m.route_decision(tier="t", engine="e", reason="r")
    m.queue_length(engine="e", length=1)
    m.queue_wait(engine="e", tier="t", seconds=0.1)
    m.admission_rejected(engine="e", tier="t", reason="r")
    m.embedding_batch(size=2, wait_s=0.001)
    m.engine_replica(engine="e", replica="r", healthy=True, running=1, waiting=1, kv_usage=0.1)
    m.upstream_retry(engine="e", reason="r")
    m.breaker_state(engine="e", replica="r", state="open")
    m.policy_rejected(tier="t", reason="r")
    m.budget_spent(tier="t", usd=1.0)
    m.budget_limit(tier="t", usd=2.0)
    return m


def labels_by_sample_name() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for family in exercised_metrics().registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


# ---- alerts.yml shape ----------------------------------------------------------------------


def test_alert_rules_have_prometheus_rule_group_shape() -> None:
    loaded = load_rules()
    assert set(loaded) == {"groups"}
    group_names = [group["name"] for group in loaded["groups"]]
    assert len(group_names) == len(set(group_names)), "duplicate group name"
    alert_names: list[str] = []
    for group in loaded["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS, f"unknown keys in {rule.get('alert')}"
            assert re.fullmatch(r"Frugal[A-Z][A-Za-z0-9]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert DURATION.match(rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in SEVERITIES
            assert {"summary", "description"} <= set(rule["annotations"])
            alert_names.append(rule["alert"])
    assert len(alert_names) == len(set(alert_names)), "duplicate alert name"


def test_alerts_cover_the_required_failure_modes() -> None:
    names = {rule["alert"] for rule in rules()}
    for needed in (
        "FrugalLatencySpike",
        "FrugalErrorRateHigh",
        "FrugalCacheStoreErrors",
        "FrugalBudgetBurnFast",
        "FrugalEngineDown",
        "FrugalQueueWaitHigh",
    ):
        assert needed in names


# ---- every metric named exists -------------------------------------------------------------


def test_metric_name_check_is_not_vacuous() -> None:
    exposed = metric_names(Metrics().registry)
    assert "frugal_requests_total" in exposed
    assert "frugal_request_latency_seconds_bucket" in exposed
    assert "frugal_requests" not in exposed  # counters are only exposed with _total
    assert "frugal_request_latency_seconds" not in exposed  # histograms only with suffixes


@pytest.mark.parametrize(
    "source",
    [ALERTS, ALERT_TESTS, GRAFANA],
    ids=["alerts", "alert-tests", "grafana"],
)
def test_every_named_metric_exists_in_a_fresh_registry(source: Path) -> None:
    text = source.read_text()
    named = set(METRIC_NAME.findall(text))
    assert named, f"{source.name} names no frugal_* metric"
    missing = named - metric_names(Metrics().registry)
    assert not missing, f"{source.name} names series the proxy does not expose: {missing}"
    assert "vllm:" not in text


@pytest.mark.parametrize(
    "source", [ALERTS, ALERT_TESTS, GRAFANA], ids=["alerts", "alert-tests", "grafana"]
)
def test_every_label_matcher_names_a_real_label(source: Path) -> None:
    labels = labels_by_sample_name()
    text = source.read_text().replace('\\"', '"')
    selectors = SELECTOR.findall(text)
    assert selectors
    for name, matchers in selectors:
        used = set(MATCHER_LABEL.findall(matchers))
        assert used <= labels[name], f"{source.name}: {name} has no label(s) {used - labels[name]}"


# ---- Grafana dashboard ---------------------------------------------------------------------


def test_grafana_dashboard_is_well_formed() -> None:
    board = grafana()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "tier", "engine"} <= variables
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        assert all(t["expr"].strip() for t in panel["targets"])


def test_grafana_json_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("frugal_grafana_generate", GRAFANA_GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so register it while loading.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.dashboard() == grafana(), "run: python deploy/grafana/generate.py"
    finally:
        del sys.modules[spec.name]


# ---- promtool, when installed (Debian: apt-get install prometheus) ---------------------------


needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_example_scrape_config() -> None:
    result = promtool("check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_grafana_queries_are_valid_promql(tmp_path: Path) -> None:
    # Grafana's variables are not PromQL; substitute what Grafana would before parsing.
    def concrete(expr: str) -> str:
        return (
            expr.replace("$__rate_interval", "5m")
            .replace("$tier", ".*")
            .replace("$engine", ".*")
            .replace("${datasource}", "")
        )

    records = [
        {"record": f"frugal:grafana_check_{i}", "expr": concrete(expr)}
        for i, expr in enumerate(grafana_exprs())
    ]
    rules_file = tmp_path / "grafana_exprs.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": records}]}))
    result = promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr


def documented_series() -> set[str]:
    """Names in deploy/README.md's Series section; ``a_b|c`` stands for ``a_b`` and ``a_c``."""
    text = (DEPLOY / "README.md").read_text()
    section = text[text.index("## Series") :]
    names: set[str] = set()
    for written in re.findall(r"`(frugal_[a-z0-9_|]+)", section):
        first, *others = written.split("|")
        names.add(first)
        stem = first.rsplit("_", 1)[0]
        names.update(f"{stem}_{other}" for other in others)  # each replaces the last word
    return names


def served_families() -> set[str]:
    """Every family /metrics serves: the proxy's own, the rollouts' and the cache audits'."""
    from proxy.rollout.metrics import RolloutMetrics
    from proxy.shadow.metrics import ShadowMetrics

    metrics = Metrics()
    RolloutMetrics(metrics.registry)
    ShadowMetrics(metrics.registry)
    return {family.name for family in metrics.registry.collect()}


def test_every_served_series_is_documented() -> None:
    served = served_families()
    assert len(served) > 40  # all three sources were read
    assert sorted(served - documented_series()) == []
    assert sorted(documented_series() - served) == []  # and none that is not served
