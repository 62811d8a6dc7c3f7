"""Load a folder of tier policy files into a :class:`PolicySet`, or say precisely what is wrong.

Every problem is a :class:`PolicyIssue` naming the file, the line and the field::

    policies/free.yaml:7 limits.requests_per_minute: Input should be greater than or equal to 1

Checks: YAML syntax, duplicate mapping keys, the schema (strict), the tier name matching the file
name, and across files: a tier defined twice, one key hash in two places, two open_access tiers;
given the models the engines serve, also a model no engine serves (a typo would leave the tier
without the model meant).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy import yaml_keys
from proxy.policy.policyset import PolicyIssue, PolicySet
from proxy.policy.schema import TierPolicy

POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class LoadResult:
    policies: PolicySet | None  # None when there is any issue
    issues: tuple[PolicyIssue, ...]

    @property
    def ok(self) -> bool:
        return self.policies is not None


@dataclass(frozen=True, slots=True)
class ParsedFile:
    path: Path
    policy: TierPolicy
    root: yaml.Node


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a folder, sorted; hidden files (editor swap files) are skipped."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def load_policy_dir(
    directory: Path,
    overrides: dict[Path, str] | None = None,
    *,
    served_models: Collection[str] | None = None,
) -> LoadResult:
    """Parse and cross-check every policy file in ``directory``.

    ``overrides`` maps a file path to replacement text, so an edit can be validated together with
    the other files before it is written. ``served_models`` (``auto`` included): the models a
    policy may name; None: not checked.
    """
    if not directory.is_dir():
        return LoadResult(None, (PolicyIssue(str(directory), None, None, "not a folder"),))
    paths = policy_files(directory)
    if not paths:
        message = "no tier policy files (*.yaml) in this folder"
        return LoadResult(None, (PolicyIssue(str(directory), None, None, message),))
    issues: list[PolicyIssue] = []
    parsed: list[ParsedFile] = []
    for path in paths:
        try:
            text = (overrides or {}).get(path)
            if text is None:
                text = path.read_text(encoding="utf-8")
        except OSError as exc:
            issues.append(PolicyIssue(str(path), None, None, f"cannot read: {exc.strerror or exc}"))
            continue
        except UnicodeDecodeError as exc:
            # (as the config file says it: the line, not the codec's byte position)
            line = exc.object[: exc.start].count(b"\n") + 1
            issues.append(PolicyIssue(str(path), line, None, f"not UTF-8 text (byte {exc.start})"))
            continue
        result, file_issues = parse_policy_text(text, path)
        issues.extend(file_issues)
        if result is not None:
            parsed.append(result)
    issues.extend(cross_check(parsed))
    if served_models is not None:
        issues.extend(unserved_models(parsed, served_models))
    if issues:
        return LoadResult(None, tuple(issues))
    policies = {p.policy.tier: p.policy for p in parsed}
    sources = {p.policy.tier: p.path for p in parsed}
    return LoadResult(PolicySet.build(policies, sources), ())


def parse_policy_text(text: str, path: Path) -> tuple[ParsedFile | None, list[PolicyIssue]]:
    """One file: YAML, duplicate keys, schema, tier name == file name."""
    source = str(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line, problem = yaml_keys.yaml_problem(exc)
        return None, [PolicyIssue(source, line, None, f"not valid YAML: {problem}")]
    if root is None or not isinstance(data, dict):
        return None, [PolicyIssue(source, 1, None, "the file must be a mapping (tier: ..., ...)")]
    issues = list(duplicate_keys(root, source))
    if issues:
        return None, issues
    try:
        policy = TierPolicy.model_validate(data)
    except ValidationError as exc:
        return None, [validation_issue(err, source, root) for err in exc.errors()]
    if policy.tier != path.stem:
        line, _ = locate(root, ("tier",))
        message = f"tier {policy.tier!r} must match the file name ({policy.tier}.yaml)"
        return None, [PolicyIssue(source, line, "tier", message)]
    return ParsedFile(path, policy, root), []


def validation_issue(err: Any, source: str, root: yaml.Node) -> PolicyIssue:
    loc = tuple(err["loc"])
    line, _ = locate(root, loc)
    field = ".".join(str(part) for part in loc) or None
    if err["type"] == "extra_forbidden":
        message = "unknown field (unknown keys are rejected; check the spelling)"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "string_pattern_mismatch" and loc[-1:] == ("hash",):
        message = "must be 'sha256:<64 lowercase hex digits>': store the key's hash, never the key"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
    return PolicyIssue(source, line, field, message)


def locate(root: yaml.Node, loc: Sequence[int | str]) -> tuple[int, yaml.Node]:
    """1-based line of the YAML node at ``loc`` (a pydantic error location), or of the deepest
    existing parent when the field is missing. Mapping keys point at the key's own line."""
    node = root
    line = root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if pair is None:
                break
            node = pair[1]
            line = pair[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line, node


def duplicate_keys(node: yaml.Node, source: str) -> Iterable[PolicyIssue]:
    """YAML keeps the last of two equal keys silently; a policy file should not."""
    for line, field in yaml_keys.duplicate_keys(node):
        yield PolicyIssue(source, line, field, "duplicate key")


def cross_check(parsed: Sequence[ParsedFile]) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    tiers: dict[str, ParsedFile] = {}
    key_sites: dict[str, str] = {}
    open_tiers: list[ParsedFile] = []
    for item in parsed:
        source = str(item.path)
        tier = item.policy.tier
        if tier in tiers:
            line, _ = locate(item.root, ("tier",))
            message = f"tier {tier!r} is already defined in {tiers[tier].path}"
            issues.append(PolicyIssue(source, line, "tier", message))
            continue
        tiers[tier] = item
        for i, entry in enumerate(item.policy.keys):
            line, _ = locate(item.root, ("keys", i))
            site = f"{source}:{line}"
            if entry.hash in key_sites:
                message = f"this key hash is also listed at {key_sites[entry.hash]}"
                issues.append(PolicyIssue(source, line, f"keys.{i}", message))
            else:
                key_sites[entry.hash] = site
        if item.policy.open_access:
            open_tiers.append(item)
    for extra in open_tiers[1:]:
        line, _ = locate(extra.root, ("open_access",))
        message = f"only one tier may set open_access; {open_tiers[0].path} already does"
        issues.append(PolicyIssue(str(extra.path), line, "open_access", message))
    return issues


def unserved_models(parsed: Sequence[ParsedFile], served: Collection[str]) -> list[PolicyIssue]:
    """Each model a policy names that no engine serves, at its place in the file."""
    known = ", ".join(sorted(served))
    issues = []
    for item in parsed:
        for i, model in enumerate(item.policy.models):
            if model not in served:
                line, _ = locate(item.root, ("models", i))
                message = f"{model!r} is not served by any engine (served: {known})"
                issues.append(PolicyIssue(str(item.path), line, f"models.{i}", message))
    return issues
