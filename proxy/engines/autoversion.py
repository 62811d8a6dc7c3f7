"""``version: auto`` kept current while the proxy runs.

An engine redeployed in place (same URL, other weights or ``max_model_len``) reports another
version. The cache keys every entry on the engine's version, so the proxy must notice: each
replica of an engine with ``version: auto`` is asked what it serves whenever it comes back from
down (a redeploy is a restart) and every ``health.version_interval_s``. A replica that reports
another version than its engine's is out of rotation (``Engine.in_rotation``); when no healthy
replica serves the engine's version any more and the healthy ones agree on a new one, the engine
switches to it (``next_version``), so its old cache entries are misses from then on.

Runs after each health-poll round, in the poller's task: a replica back from down is asked
before the next round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import structlog

from proxy.engines.pool import Engine, Replica
from proxy.engines.version import next_version, resolve_version
from proxy.tasks import cancelling

log = structlog.get_logger("frugal.version")

# What asking a replica can fail with: it is down, slow, or does not (yet) serve the model.
RESOLVE_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, LookupError, ValueError)

Switched = Callable[[Engine, str | None, str], None]
HeldOut = Callable[[Engine, Replica], None]


def auth_headers(engine: Engine) -> dict[str, str] | None:
    key = engine.settings.api_key
    return {"Authorization": f"Bearer {key}"} if key else None


async def replica_version(
    session: aiohttp.ClientSession, engine: Engine, replica: Replica, *, timeout_s: float = 5.0
) -> str:
    """What ``replica`` serves, as ``engine``'s version: the one question both the start-up
    resolution and the periodic check ask, so the two can never derive different versions for
    the same weights (which would read as a redeploy and purge the engine's cache entries)."""
    return await resolve_version(
        session,
        replica.url,
        engine.wire_model,
        model_dir=engine.settings.model_dir,
        timeout_s=timeout_s,
        headers=auth_headers(engine),
        extra=engine.settings.version_extra,
    )


def version_due(replica: Replica, now: float, interval_s: float) -> bool:
    """Whether to ask a healthy replica what it serves: at once when unknown, else periodically."""
    return (
        replica.version is None
        or replica.version_at is None
        or now - replica.version_at >= interval_s
    )


@dataclass(eq=False)
class VersionWatch:
    session: aiohttp.ClientSession
    engines: Sequence[Engine]  # the stable replica sets; canaries have fixed versions
    interval_s: float
    timeout_s: float
    # A canary rollout is under way for the engine: its version is the rollout's to change.
    frozen: Callable[[Engine], bool] = lambda engine: False
    on_switch: Switched = lambda engine, old, new: None
    on_held_out: HeldOut = lambda engine, replica: None
    clock: Callable[[], float] = field(default=time.monotonic)

    async def check(self) -> None:
        now = self.clock()
        engines = [e for e in self.engines if e.auto]
        due = [
            (e, r)
            for e in engines
            for r in e.replicas
            if r.healthy and version_due(r, now, self.interval_s)
        ]
        if due:
            await asyncio.gather(*(self._ask(e, r, now) for e, r in due))
        for engine in engines:
            if not self.frozen(engine):
                self._follow(engine)
            self._report_held_out(engine)

    async def _ask(self, engine: Engine, replica: Replica, now: float) -> None:
        try:
            version = await replica_version(self.session, engine, replica, timeout_s=self.timeout_s)
        except RESOLVE_ERRORS as exc:
            if cancelling():
                raise asyncio.CancelledError from exc
            # A known version stands until the replica says otherwise (or goes down); an unknown
            # one is asked again next round.
            replica.version_at = now
            return
        replica.version, replica.version_at = version, now

    def _follow(self, engine: Engine) -> None:
        new = next_version(engine.version, [r.version for r in engine.replicas if r.healthy])
        if new is None or new == engine.version:
            return
        old, engine.version = engine.version, new
        if old is None:
            log.info("engine version", engine=engine.name, version=new)
        else:
            log.warning("engine redeployed: its version changed", engine=engine.name,
                        old=old, new=new)  # fmt: skip
        self.on_switch(engine, old, new)

    def _report_held_out(self, engine: Engine) -> None:
        for replica in engine.replicas:
            odd = None if engine.in_rotation(replica) else replica.version
            if odd is not None and odd != replica.held_out_for:
                log.warning("replica serves another version than its engine: held out",
                            engine=engine.name, replica=replica.url, reports=odd,
                            engine_version=engine.version)  # fmt: skip
                self.on_held_out(engine, replica)
            replica.held_out_for = odd
