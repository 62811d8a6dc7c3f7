"""Hot reload: a valid edit replaces the policy set, an invalid one is reported and ignored."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest

from proxy.policy.keys import hash_key
from proxy.policy.policyset import PolicyIssue, PolicySet
from proxy.policy.store import PolicyLoadError, PolicyStore

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    # Some file systems keep mtimes coarse; move it on so the change is always visible.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


async def wait_for(condition: object, store: PolicyStore, attr: str, value: int) -> None:
    for _ in range(500):
        if getattr(store, attr) >= value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{attr} never reached {value} ({condition})")


def test_open_refuses_an_invalid_folder(folder: Path) -> None:
    edit(folder / "pro.yaml", "priority: 5", "priority: -5")
    with pytest.raises(PolicyLoadError) as refused:
        PolicyStore.open(folder)
    line = line_of(folder / "pro.yaml", "priority: -5")
    assert any(i.field == "priority" and i.line == line for i in refused.value.issues)
    assert f"pro.yaml:{line} priority" in str(refused.value)


def test_reload_applies_valid_and_keeps_old_on_invalid(folder: Path) -> None:
    seen: list[PolicySet] = []
    store = PolicyStore.open(folder, on_change=seen.append)
    first = store.current
    assert first.tiers["free"].limits.requests_per_minute == 60

    edit(folder / "free.yaml", "requests_per_minute: 60", "requests_per_minute: 30")
    assert store.reload() == []
    assert store.current.tiers["free"].limits.requests_per_minute == 30
    assert seen == [store.current]

    valid = store.current
    edit(folder / "free.yaml", "requests_per_minute: 30", "requests_per_minute: lots")
    errors = store.reload()
    line = line_of(folder / "free.yaml", "requests_per_minute: lots")
    assert len(errors) == 1 and f"free.yaml:{line} limits.requests_per_minute:" in errors[0]
    assert store.current is valid
    assert (store.reloads, store.failed_reloads) == (1, 1)


async def test_watch_picks_up_file_changes(folder: Path) -> None:
    store = PolicyStore.open(folder)
    assert store.current.key_count == 0
    task = asyncio.create_task(store.watch(interval_s=0.02, handle_sighup=False))
    try:
        await asyncio.sleep(0.05)
        digest = hash_key("sk-new")
        edit(folder / "pro.yaml", "keys: []", f'keys: ["{digest}"]')
        await wait_for("edit", store, "reloads", 1)
        assert store.current.key_count == 1
        assert store.current.authenticate("sk-new").tier == "pro"
        edit(folder / "pro.yaml", "priority: 5", "priority: five")
        await wait_for("bad edit", store, "failed_reloads", 1)
        assert store.current.authenticate("sk-new").tier == "pro"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sighup_reloads(folder: Path) -> None:
    store = PolicyStore.open(folder)
    task = asyncio.create_task(store.watch(interval_s=30))
    try:
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for("SIGHUP", store, "reloads", 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_reload_naming_a_model_no_engine_serves_is_refused(folder: Path) -> None:
    # (before: accepted without a word; at start-up only a warning)
    served = {"auto", "smollm2-135m", "qwen2.5-coder-0.5b"}
    store = PolicyStore.open(folder, served_models=served)
    valid = store.current
    edit(folder / "free.yaml", "models: [auto, smollm2-135m]", "models: [auto, smolm2-135m]")
    [error] = store.reload()
    line = line_of(folder / "free.yaml", "smolm2-135m")
    assert f"free.yaml:{line} models.1: 'smolm2-135m' is not served by any engine" in error
    assert store.current is valid
    with pytest.raises(PolicyLoadError) as refused:
        PolicyStore.open(folder, served_models=served)
    assert [i.field for i in refused.value.issues] == ["models.1"]


def test_a_reload_the_store_check_refuses_keeps_the_previous_set(folder: Path) -> None:
    """The proxy's own checks of a whole set (an open set on a public address) apply to a
    reload as they did at start-up."""
    digest = hash_key("sk-only")
    edit(folder / "pro.yaml", "keys: []", f'keys: ["{digest}"]')

    def keyed(policies: PolicySet) -> list[PolicyIssue]:
        return [] if not policies.is_open else [PolicyIssue(str(folder), None, None, "no keys")]

    store = PolicyStore.open(folder, check=keyed)
    valid = store.current
    edit(folder / "pro.yaml", f'keys: ["{digest}"]', "keys: []")
    assert store.reload() == [f"{folder}: no keys"]
    assert store.current is valid and store.failed_reloads == 1
    assert store.current.authenticate("sk-only").tier == "pro"
