"""Tier policy files: strict schema, and every error located by file, line and field."""

from __future__ import annotations

import io
import shutil
import textwrap
from pathlib import Path

import pytest

from proxy.policy.commands import policy_check_command
from proxy.policy.keys import hash_key
from proxy.policy.loader import load_policy_dir
from proxy.policy.policyset import PolicyIssue
from proxy.policy.schema import default_tenant

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"

VALID = """\
tier: {tier}
keys: {keys}
models: [auto, smollm2-135m]
limits: {{requests_per_minute: 60, tokens_per_minute: 20000, concurrent: 4, max_tokens: 512}}
budget: {{usd_per_day: 1.00}}
routing: {{strong_share: 0.10}}
latency: {{ttft_p95_ms: 3000}}
cache: {{scope: tenant, ttl_seconds: 86400, semantic: true, allow_no_cache: false}}
priority: {priority}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def tier_text(tier: str, keys: str = "[]", priority: int = 1) -> str:
    return VALID.format(tier=tier, keys=keys, priority=priority)


def only_issue(folder: Path, served_models: set[str] | None = None) -> PolicyIssue:
    result = load_policy_dir(folder, served_models=served_models)
    assert result.policies is None
    assert len(result.issues) == 1, result.issues
    return result.issues[0]


def test_the_repository_policies_are_valid_and_open() -> None:
    result = load_policy_dir(REPO_POLICIES)
    assert result.issues == ()
    assert result.policies is not None
    assert set(result.policies.tiers) == {"free", "pro", "enterprise"}
    assert result.policies.is_open
    assert result.policies.open_tier == "free"
    served = {"auto", "smollm2-135m", "qwen2.5-coder-0.5b"}
    assert load_policy_dir(REPO_POLICIES, served_models=served).ok


def test_a_valid_folder_loads_with_key_owners(tmp_path: Path) -> None:
    acme, solo = hash_key("sk-acme"), hash_key("sk-solo")
    write(tmp_path, "free.yaml", tier_text("free", f'[{{hash: "{acme}", tenant: acme}}, "{solo}"]'))
    write(tmp_path, "pro.yaml", tier_text("pro", priority=5))
    result = load_policy_dir(tmp_path)
    assert result.policies is not None
    policies = result.policies
    assert not policies.is_open
    assert policies.authenticate("sk-acme").tenant == "acme"
    assert policies.authenticate("sk-solo").tenant == default_tenant(solo)
    assert policies.sources["pro"] == tmp_path / "pro.yaml"


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        (tier_text("free").replace("concurrent:", "concurent:"), 4, "limits.concurent", "unknown"),
        (tier_text("free").replace("priority: 1", "priority: high"), 9, "priority", "integer"),
        (tier_text("free").replace(", max_tokens: 512", ""), 4, "limits.max_tokens", "missing"),
        (tier_text("free", '["sha256:abc"]'), 2, "keys.0.hash", "sha256:<64"),
        (tier_text("free").replace("0.10}", "0.10, score_threshold: 0.5}"), 6, "routing", "one of"),
        (tier_text("free").replace("[auto, smollm2-135m]", "[auto, auto]"), 3, "models", "twice"),
        (tier_text("free").replace("day: 1.00", "day: -1"), 5, "budget.usd_per_day", "greater"),
        (tier_text("free") + "surprise: 1\n", 10, "surprise", "unknown"),
    ],
)  # fmt: skip
def test_schema_errors_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, words: str
) -> None:
    path = write(tmp_path, "free.yaml", text)
    issue = only_issue(tmp_path)
    assert (issue.file, issue.line, issue.field) == (str(path), line, field)
    assert words in issue.message
    assert str(issue).startswith(f"{path}:{line} {field}: ")


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    write(tmp_path, "free.yaml", tier_text("free").replace("priority: 1", "priority: [1"))
    issue = only_issue(tmp_path)
    assert issue.line is not None and issue.line >= 9
    assert "YAML" in issue.message


def test_duplicate_mapping_keys_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "free.yaml", tier_text("free") + "priority: 2\n")
    issue = only_issue(tmp_path)
    assert (issue.line, issue.field, issue.message) == (10, "priority", "duplicate key")


def test_tier_must_match_the_file_name(tmp_path: Path) -> None:
    write(tmp_path, "free.yaml", tier_text("gratis"))
    issue = only_issue(tmp_path)
    assert (issue.line, issue.field) == (1, "tier")


def test_one_key_in_two_tiers_names_both_places(tmp_path: Path) -> None:
    digest = hash_key("sk-shared")
    write(tmp_path, "free.yaml", tier_text("free", f'["{digest}"]'))
    pro = write(tmp_path, "pro.yaml", tier_text("pro", f'\n  - "{digest}"', priority=5))
    issue = only_issue(tmp_path)
    assert (issue.file, issue.line, issue.field) == (str(pro), 3, "keys.0")
    assert "free.yaml:2" in issue.message


def test_same_tier_in_two_files(tmp_path: Path) -> None:
    write(tmp_path, "free.yaml", tier_text("free"))
    write(tmp_path, "free.yml", tier_text("free"))
    issue = only_issue(tmp_path)
    assert issue.field == "tier"
    assert "already defined" in issue.message


def test_only_one_open_access_tier(tmp_path: Path) -> None:
    write(tmp_path, "free.yaml", tier_text("free") + "open_access: true\n")
    write(tmp_path, "pro.yaml", tier_text("pro") + "open_access: true\n")
    issue = only_issue(tmp_path)
    assert (issue.file, issue.line, issue.field) == (str(tmp_path / "pro.yaml"), 10, "open_access")


def test_open_tier_defaults_to_least_privileged(tmp_path: Path) -> None:
    write(tmp_path, "pro.yaml", tier_text("pro", priority=5))
    write(tmp_path, "free.yaml", tier_text("free", priority=1))
    result = load_policy_dir(tmp_path)
    assert result.policies is not None
    assert result.policies.open_tier == "free"


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    assert "no tier policy files" in only_issue(tmp_path).message
    assert only_issue(tmp_path / "nope").message == "not a folder"


def test_hidden_and_other_files_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "free.yaml", tier_text("free"))
    write(tmp_path, ".free.yaml.swp", "garbage: [")
    write(tmp_path, "README.md", "# notes")
    assert load_policy_dir(tmp_path).ok


def test_models_no_engine_serves_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "free.yaml", tier_text("free"))
    assert load_policy_dir(tmp_path, served_models={"auto", "smollm2-135m"}).ok
    issue = only_issue(tmp_path, served_models={"auto"})
    # the file, the line and the list item (before: the field "models" and no line)
    assert (issue.file, issue.line, issue.field) == (str(path), 3, "models.1")
    assert issue.message.startswith("'smollm2-135m' is not served by any engine")


def test_policy_check_command_exit_codes_and_output(tmp_path: Path) -> None:
    shutil.copytree(REPO_POLICIES, tmp_path / "ok")
    out, err = io.StringIO(), io.StringIO()
    assert policy_check_command(tmp_path / "ok", out=out, err=err) == 0
    assert "runs open" in out.getvalue()
    bad = tmp_path / "ok" / "pro.yaml"
    bad.write_text(bad.read_text().replace("concurrent: 16", "concurrent: many"))
    out, err = io.StringIO(), io.StringIO()
    assert policy_check_command(tmp_path / "ok", out=out, err=err) == 1
    assert f"{bad}:" in err.getvalue()
    assert "limits.concurrent:" in err.getvalue()


def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    # (before: "cannot read: 'utf-8' codec can't decode byte 0xe9 in position 161: ...", the
    # codec's words and no line; the config file says it as below)
    path = write(tmp_path, "free.yaml", tier_text("free"))
    path.write_bytes(path.read_bytes() + b"description: caf\xe9\n")
    issue = only_issue(tmp_path)
    lines = len(tier_text("free").splitlines())
    assert (issue.file, issue.line) == (str(path), lines + 1)
    assert issue.message.startswith("not UTF-8 text (byte ")
