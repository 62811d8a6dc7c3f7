"""Operator commands: ``frugal policy check`` and ``frugal keys add|generate``.

``keys add`` edits the tier's file as text, appending to its ``keys`` list, so the operator's
comments and layout survive; the edited folder is validated as a whole before anything is written,
and the file is replaced atomically (a running proxy reloads it within about a second). Runs on one
folder take turns (a lock on the folder), so two at once cannot drop each other's key.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import yaml

from proxy.policy.keys import generate_key, hash_key
from proxy.policy.loader import load_policy_dir, locate
from proxy.policy.schema import NAME_PATTERN

DEFAULT_DIR = Path("policies")


def policy_check_command(
    directory: Path,
    *,
    served_models: set[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Validate a policy folder; print each issue as ``file:line field: message``. 0 if valid."""
    out = out or sys.stdout
    err = err or sys.stderr
    result = load_policy_dir(directory, served_models=served_models)
    issues = list(result.issues)
    for issue in issues:
        print(issue, file=err)
    if issues:
        print(f"{len(issues)} problem(s) in {directory}", file=err)
        return 1
    assert result.policies is not None
    policies = result.policies
    for tier in sorted(policies.tiers, key=lambda t: -policies.tiers[t].priority):
        policy = policies.tiers[tier]
        print(
            f"{policies.sources[tier]}: tier {tier!r} priority {policy.priority}, "
            f"{len(policy.keys)} key(s), models {', '.join(policy.models)}",
            file=out,
        )
    if policies.is_open:
        print(
            f"no keys defined: the proxy runs open (keyless, tier {policies.open_tier!r})",
            file=out,
        )
    return 0


def key_entry_yaml(key_hash: str, tenant: str | None, note: str | None) -> str:
    """One keys-list item as flow YAML (JSON strings are valid YAML double-quoted scalars)."""
    if tenant is None and note is None:
        return json.dumps(key_hash)
    parts = [f"hash: {json.dumps(key_hash)}"]
    if tenant is not None:
        parts.append(f"tenant: {json.dumps(tenant)}")
    if note is not None:
        parts.append(f"note: {json.dumps(note)}")
    return "{" + ", ".join(parts) + "}"


def append_key(text: str, entry: str) -> str:
    """``text`` with ``entry`` appended to its top-level ``keys`` list, nothing else touched."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        raise ValueError("the policy file is not a mapping")
    pair = next(((k, v) for k, v in root.value if k.value == "keys"), None)
    if pair is None:
        sep = "" if text.endswith("\n") or not text else "\n"
        return f"{text}{sep}keys: [{entry}]\n"
    key, node = pair
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        start, end = node.start_mark.index, node.end_mark.index
        lead = " " if start > 0 and text[start - 1] == ":" else ""
        return f"{text[:start]}{lead}[{entry}]{text[end:]}"
    if not isinstance(node, yaml.SequenceNode):
        raise ValueError("keys is not a list")
    if node.flow_style:
        if not node.value:
            # "keys: []" becomes a block list: one key per line reads and diffs better.
            start, end = node.start_mark.index, node.end_mark.index
            indent = " " * (key.start_mark.column + 2)
            return f"{text[:start].rstrip(' ')}\n{indent}- {entry}{text[end:]}"
        pos = node.value[-1].end_mark.index
        return f"{text[:pos]}, {entry}{text[pos:]}"
    indent = " " * node.start_mark.column
    pos = node.value[-1].end_mark.index
    if pos == 0 or text[pos - 1] != "\n":
        newline = text.find("\n", pos)
        if newline == -1:
            return f"{text}\n{indent}- {entry}\n"
        pos = newline + 1
    return f"{text[:pos]}{indent}- {entry}\n{text[pos:]}"


def keys_add_command(
    tier: str,
    *,
    tenant: str | None = None,
    directory: Path = DEFAULT_DIR,
    note: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Generate a key for ``tier``, store its hash in the tier's file, print the key once."""
    out = out or sys.stdout
    err = err or sys.stderr
    with _one_editor_at_a_time(directory):
        return _add_key(tier, tenant, directory, note, out, err)


@contextlib.contextmanager
def _one_editor_at_a_time(directory: Path) -> Iterator[None]:
    """Each run reads a file, appends and replaces it: a second run in between would replace
    it with a text that lacks the first one's key (whose owner was shown a key that never
    worked). ``flock`` on the folder itself, so no lock file is left in it; the kernel lets go
    however the holder exits."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield  # not a folder: the load says so
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _add_key(
    tier: str, tenant: str | None, directory: Path, note: str | None, out: TextIO, err: TextIO
) -> int:
    current = load_policy_dir(directory)
    if current.policies is None:
        for issue in current.issues:
            print(issue, file=err)
        print("fix the policy files first; no key was added", file=err)
        return 1
    path = current.policies.sources.get(tier)
    if path is None:
        known = ", ".join(sorted(current.policies.tiers))
        print(f"no tier {tier!r} in {directory} (tiers: {known})", file=err)
        return 1
    key = generate_key()
    digest = hash_key(key)
    text = path.read_text(encoding="utf-8")
    try:
        new_text = append_key(text, key_entry_yaml(digest, tenant, note))
    except (ValueError, yaml.YAMLError) as exc:
        print(f"{path}: cannot add a key: {exc}", file=err)
        return 1
    checked = load_policy_dir(directory, overrides={path: new_text})
    if checked.policies is None or not any(
        entry.hash == digest for entry in checked.policies.tiers[tier].keys
    ):
        for issue in checked.issues:
            print(issue, file=err)
        print(f"{path}: the edited file would not be valid; nothing was written", file=err)
        return 1
    try:
        _write_atomically(path, new_text)
    except OSError as exc:
        # (before: a traceback) no key is shown: it was never stored
        print(f"{path}: cannot write: {exc.strerror or exc}; no key was added", file=err)
        return 1
    root = yaml.compose(new_text, Loader=yaml.SafeLoader)
    assert root is not None  # it was just validated
    line, _ = locate(root, ("keys", len(checked.policies.tiers[tier].keys) - 1))
    owner = next(e for e in checked.policies.tiers[tier].keys if e.hash == digest).tenant_id
    print(f"added a key for tenant {owner!r} to tier {tier!r} at {path}:{line}", file=err)
    if current.policies.is_open:
        print(
            "note: this is the first key, so the proxy stops running open; after the reload "
            "every request needs a key",
            file=err,
        )
    print("the key is shown only this once; the file keeps only its hash:", file=err)
    print(key, file=out)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    # A hidden temp name: the reload watcher ignores it until the rename makes it the file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keys_generate_command(out: TextIO | None = None) -> int:
    """A new key and its hash, e.g. for ``admin.keys`` in the main config."""
    out = out or sys.stdout
    key = generate_key()
    print(f"key:  {key}", file=out)
    print(f"hash: {hash_key(key)}", file=out)
    return 0


# --- argparse wiring (registered by proxy.cli) ---------------------------------------------


def add_policy_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser("policy", help="tier policy files")
    policy_sub = policy.add_subparsers(metavar="ACTION", required=True)
    check = policy_sub.add_parser("check", help="validate a policy folder (exit 1 on errors)")
    check.add_argument("dir", type=Path, nargs="?", default=DEFAULT_DIR)
    check.add_argument("--config", type=Path, help="also check models against its engines")
    check.set_defaults(run=_run_check)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(metavar="ACTION", required=True)
    add = keys_sub.add_parser("add", help="create a key for a tier; prints it once")
    add.add_argument("--tier", required=True)
    add.add_argument("--tenant", type=_tenant_name, help="the key's owner (default: per key)")
    add.add_argument("--note", help="a remark stored next to the hash")
    add.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="policy folder")
    add.set_defaults(run=_run_keys_add)
    generate = keys_sub.add_parser("generate", help="print a new key and its hash (admin keys)")
    generate.set_defaults(run=lambda _args: keys_generate_command())


def _tenant_name(value: str) -> str:
    if not re.match(NAME_PATTERN, value):
        raise argparse.ArgumentTypeError("letters, digits, '_', '.', '-' (at most 64)")
    return value


def _run_check(args: argparse.Namespace) -> int:
    served: set[str] | None = None
    if args.config is not None:
        from proxy.settings import VIRTUAL_MODEL, ConfigError, load_settings

        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        served = {engine.model for engine in settings.engines} | {VIRTUAL_MODEL}
    directory: Path = args.dir
    return policy_check_command(directory, served_models=served)


def _run_keys_add(args: argparse.Namespace) -> int:
    return keys_add_command(args.tier, tenant=args.tenant, directory=args.dir, note=args.note)
