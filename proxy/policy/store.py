"""The current policy set, replaced whole on SIGHUP or when the policy files change.

A new set is loaded and cross-checked first, with the same checks as at start-up (the models the
engines serve, and ``check``: the proxy's own rules for a whole set, such as no open set on a
public address); only a valid one replaces the current one (new requests see it, requests in
flight keep the one they started with). An invalid set is logged issue by issue and the old one
stays::

    store = PolicyStore.open(settings.policies, served_models=served, check=check)
    # raises PolicyLoadError at start-up

    async def policy_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(store.watch())         # mtime poll every second + SIGHUP
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    principal = store.current.authenticate(key)          # per request
    errors = store.reload()                               # admin endpoint: [] when applied
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import structlog

from proxy.policy.loader import POLICY_SUFFIXES, LoadResult, load_policy_dir
from proxy.policy.policyset import PolicyIssue, PolicySet
from proxy.tasks import cancelling

log = structlog.get_logger("frugal.policy")

Fingerprint = frozenset[tuple[str, int, int]]
SetCheck = Callable[[PolicySet], Sequence[PolicyIssue]]


class PolicyLoadError(Exception):
    """The policy folder cannot be used; ``issues`` say where and why."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("invalid tier policies:\n" + "\n".join(f"  {i}" for i in self.issues))


def fingerprint(directory: Path) -> Fingerprint:
    """What changes when a policy file is edited, added, removed or replaced."""
    entries = []
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if path.suffix not in POLICY_SUFFIXES or path.name.startswith("."):
                continue
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((path.name, stat.st_mtime_ns, stat.st_size))
    return frozenset(entries)


def _load(
    directory: Path, served_models: Collection[str] | None, check: SetCheck | None
) -> LoadResult:
    result = load_policy_dir(directory, served_models=served_models)
    if result.policies is None or check is None:
        return result
    issues = tuple(check(result.policies))
    return LoadResult(None, issues) if issues else result


class PolicyStore:
    def __init__(
        self,
        directory: Path,
        initial: PolicySet,
        *,
        on_change: Callable[[PolicySet], None] | None = None,
        served_models: Collection[str] | None = None,
        check: SetCheck | None = None,
    ) -> None:
        self.directory = directory
        self._current = initial
        self._on_change = on_change
        self._served_models = served_models
        self._check = check
        self._seen = fingerprint(directory)
        self.reloads = 0
        self.failed_reloads = 0

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        on_change: Callable[[PolicySet], None] | None = None,
        served_models: Collection[str] | None = None,
        check: SetCheck | None = None,
    ) -> PolicyStore:
        """Load the folder at start-up; raise :class:`PolicyLoadError` if it is not valid.
        ``served_models`` (``auto`` included): the models a policy may name (None: any);
        ``check``: the issues of a whole set, applied at start-up and to every reload."""
        seen = fingerprint(directory)
        result = _load(directory, served_models, check)
        if result.policies is None:
            raise PolicyLoadError(result.issues)
        store = cls(
            directory,
            result.policies,
            on_change=on_change,
            served_models=served_models,
            check=check,
        )
        store._seen = seen
        return store

    @property
    def current(self) -> PolicySet:
        return self._current

    def reload(self) -> list[str]:
        """Load the folder again: apply it if valid and return [], else keep the current set and
        return the issues as ``file:line field: message`` strings."""
        self._seen = fingerprint(self.directory)
        result = _load(self.directory, self._served_models, self._check)
        if result.policies is None:
            self.failed_reloads += 1
            errors = [str(issue) for issue in result.issues]
            for error in errors:
                log.error("policy_reload_rejected", issue=error)
            log.warning("policy_reload_kept_previous", tiers=sorted(self._current.tiers))
            return errors
        self._current = result.policies
        self.reloads += 1
        log.info(
            "policy_reloaded",
            tiers=sorted(result.policies.tiers),
            keys=result.policies.key_count,
            open=result.policies.is_open,
        )
        if self._on_change is not None:
            self._on_change(result.policies)
        return []

    def changed_on_disk(self) -> bool:
        return fingerprint(self.directory) != self._seen

    async def watch(self, interval_s: float = 1.0, *, handle_sighup: bool = True) -> None:
        """Reload on SIGHUP or when the files change (mtime poll); runs until cancelled."""
        hangup = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = False
        if handle_sighup and hasattr(signal, "SIGHUP"):
            try:
                loop.add_signal_handler(signal.SIGHUP, hangup.set)
                installed = True
            except (RuntimeError, ValueError, NotImplementedError):
                log.info("policy_sighup_unavailable", note="not the main thread; polling only")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await hangup.wait()
                if cancelling():  # a stop that landed as the wait timed out
                    raise asyncio.CancelledError
                if hangup.is_set():
                    hangup.clear()
                    log.info("policy_reload_requested", by="SIGHUP")
                    self.reload()
                elif self.changed_on_disk():
                    # Let an editor finish writing (several writes, or write-then-rename).
                    await asyncio.sleep(min(0.2, interval_s))
                    self.reload()
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGHUP)
