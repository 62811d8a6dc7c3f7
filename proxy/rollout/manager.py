"""``Rollouts``: the stateful shell around the pure parts (split, state, judge).

It owns, per engine, the stable replica set (the ``Engine`` object the rest of the proxy knows),
the canary's replica set (a second ``Engine`` with the same name, its own replicas, breakers and
version), the rollout state, and per-version windows of figures. The request path asks it which
replica set answers a request (``select``) and tells it how each request went (``record``).

Promote and rollback swap replica lists and versions in place: a request already sent holds its
``Upstream`` (replica and all) and finishes there; requests that start afterwards see the new
version, and their cache keys carry it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError

from proxy.cache.service import InvalidationFilter, ResponseCache
from proxy.cache.store import CacheBackendError
from proxy.engines.client import EngineCaller
from proxy.engines.pool import Engine
from proxy.observability.metrics import Metrics
from proxy.rollout.judge import Bounds, judge
from proxy.rollout.metrics import RolloutMetrics
from proxy.rollout.shadow import Outcome, ShadowComparer
from proxy.rollout.split import goes_to_canary
from proxy.rollout.state import (
    ConfiguredRollout,
    ReplicaSet,
    RolloutConflict,
    RolloutState,
    from_config,
    resolve_at_startup,
)
from proxy.rollout.stats import VersionWindow
from proxy.rollout.store import FileStateStore, RedisStateStore
from proxy.settings import CanarySettings, EngineSettings, Settings
from proxy.tasks import cancelling
from proxy.tasks import stop as stop_task

log = structlog.get_logger("frugal.rollout")

FIGURES_WINDOW_S = 300.0
_REDIS_DOWN = (RedisError, OSError, ConnectionError, TimeoutError, ValueError)
REDIS_POLL_S = 1.0
# What an engine answers when it does not take the proxy's own key or model name: the client's
# request passed the proxy's checks, so these are the version's deployment failing, not a refusal.
DEPLOYMENT_ERRORS = frozenset({401, 403, 404})


def configured(settings: EngineSettings) -> ConfiguredRollout:
    canary = settings.canary
    return ConfiguredRollout(
        engine=settings.name,
        stable=ReplicaSet(settings.version, tuple(settings.urls), settings.model),
        canary=(
            ReplicaSet(canary.version, tuple(canary.urls), canary.model or settings.model)
            if canary is not None
            else None
        ),
        share=canary.share if canary is not None else 0.0,
    )


@dataclass(frozen=True, slots=True)
class Selection:
    """The replica set that answers a request, and the one the split chose for it when every
    replica of that one was down (None: the split's choice answers)."""

    engine: Engine
    instead_of: Engine | None = None


@dataclass(eq=False)
class EngineRollout:
    engine: Engine  # the stable replica set: the object routing, admission and metrics know
    config: ConfiguredRollout
    canary_settings: CanarySettings | None
    state: RolloutState
    canary: Engine | None = None
    applied_stable: ReplicaSet | None = None

    @property
    def active(self) -> bool:
        return self.canary is not None and self.state.status == "canary"


@dataclass(eq=False)
class Rollouts:
    settings: Settings
    engines: list[Engine]
    metrics: RolloutMetrics
    shadow: ShadowComparer
    wall_clock: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    by_name: dict[str, EngineRollout] = field(init=False)
    polled: list[Engine] = field(init=False)  # every replica set the health poller watches
    windows: dict[tuple[str, str], VersionWindow] = field(init=False, default_factory=dict)
    # (engine, version down) -> the version answering its share meanwhile
    _falling_back: dict[tuple[str, str], str] = field(init=False, default_factory=dict)
    cache: ResponseCache | None = None
    busy: Callable[[str], bool] = lambda name: False
    _file: FileStateStore | None = None
    _redis: RedisStateStore | None = None
    _started: float = field(init=False, default=0.0)  # clock(): since when figures are kept
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[Any]] = field(init=False, default_factory=set)
    _loops: list[asyncio.Task[Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._started = self.clock()
        now = self.wall_clock()
        self.by_name = {}
        self.polled = []
        for engine in self.engines:
            config = configured(engine.settings)
            rollout = EngineRollout(
                engine=engine,
                config=config,
                canary_settings=engine.settings.canary,
                state=from_config(config, now=now),
            )
            self.by_name[engine.name] = rollout
            self._apply(rollout, rollout.state)

    @classmethod
    def build(cls, settings: Settings, engines: list[Engine], metrics: Metrics,
              caller: EngineCaller) -> Rollouts:  # fmt: skip
        return cls(
            settings=settings,
            engines=engines,
            metrics=RolloutMetrics(metrics.registry),
            shadow=ShadowComparer(caller),
        )

    # -- request path ---------------------------------------------------------------------------

    def select(self, engine: Engine, conversation: Callable[[], bytes]) -> Engine:
        """The replica set that answers this request for ``engine``: its canary or itself."""
        return self.choose(engine, conversation).engine

    def choose(self, engine: Engine, conversation: Callable[[], bytes]) -> Selection:
        """:meth:`select`, saying whether the split's choice was down and the other answers."""
        rollout = self.by_name.get(engine.name)
        if rollout is None or rollout.canary is None or rollout.state.status != "canary":
            return Selection(engine)
        chosen, other = rollout.canary, rollout.engine
        if not goes_to_canary(engine.name, conversation(), rollout.state.share):
            chosen, other = other, chosen
        # Both versions serve real users already: when every replica of the split's choice is
        # down, the other version's answer beats a 503. Either way round: the stable's share
        # may go to the canary too (it is sized for less, but admission bounds what it takes).
        # Only a choice made now: a conversation goes back to its own version once it is up.
        now = time.monotonic()  # (the breakers' clock)
        if chosen.can_take(now) or not other.can_take(now):
            return Selection(chosen)
        return Selection(other, instead_of=chosen)

    def fallback(self, failed: Engine) -> Selection | None:
        """:meth:`choose`'s fallback decided late: every replica of ``failed``, the version
        chosen for a request, failed before the client had a byte (down before a health poll or
        its breaker said so). The other version, when it can take the request (None: there is
        no other, or it is down too, or a promote or rollback retired ``failed`` meanwhile)."""
        rollout = self.by_name.get(failed.name)
        if rollout is None or not rollout.active:
            return None
        if failed is rollout.canary:
            other = rollout.engine
        elif failed is rollout.engine and rollout.canary is not None:
            other = rollout.canary
        else:
            return None
        if not other.can_take(time.monotonic()):
            return None
        return Selection(other, instead_of=failed)

    def rolling_out(self, engine: str) -> bool:
        """Whether a canary of ``engine`` is in progress (its versions are the rollout's)."""
        rollout = self.by_name.get(engine)
        return rollout is not None and rollout.active

    def serving(self, engine: Engine) -> list[Engine]:
        """The replica sets that answer ``engine``'s requests now: its stable, and its canary
        while the canary is in progress (either answers for the other while that one is down)."""
        rollout = self.by_name.get(engine.name)
        if rollout is None or not rollout.active:
            return [engine]
        assert rollout.canary is not None
        return [rollout.engine, rollout.canary]

    def stable_of(self, engine: Engine) -> Engine:
        rollout = self.by_name.get(engine.name)
        return rollout.engine if rollout is not None else engine

    def serves(self, engine: str, version: str) -> bool:
        return self.replica_set(engine, version) is not None

    def replica_set(self, engine: str, version: str) -> Engine | None:
        """The replica set serving ``version`` of ``engine`` (stable or canary), if one does."""
        rollout = self.by_name.get(engine)
        if rollout is None:
            return None
        for candidate in (rollout.engine, rollout.canary):
            if candidate is not None and candidate.version == version:
                return candidate
        return None

    def served(self) -> set[tuple[str, str]]:
        """Every (engine, version) some replica set serves (versions not yet known left out)."""
        out = set()
        for rollout in self.by_name.values():
            for engine in (rollout.engine, rollout.canary):
                if engine is not None and engine.version is not None:
                    out.add((engine.name, engine.version))
        return out

    def record(
        self,
        *,
        engine: str,
        version: str,
        from_cache: bool,
        status: int,
        latency_s: float,
        tokens_out: int,
        cost_usd: float,
        upstream_status: int | None = None,
        instead_of: str | None = None,
    ) -> None:
        """One finished request. ``instead_of``: the version the split chose for it, which had
        no replica up (``version`` answered in its place)."""
        if not from_cache:
            self._fallback(engine, version, instead_of)
        # An engine error is a 5xx, or the engine refusing the proxy's own key or model name;
        # other 4xx are the client's (or the policy's) doing.
        error = status >= 500 or upstream_status in DEPLOYMENT_ERRORS
        self.metrics.request(
            engine=engine, version=version, from_cache=from_cache, status=status,
            latency_s=latency_s, tokens_out=tokens_out, cost_usd=cost_usd, error=error,
        )  # fmt: skip
        if 400 <= status < 500 and not error:
            return  # refused (policy, admission, bad request): says nothing about the version
        self._window(engine, version).record(
            at=self.clock(), from_cache=from_cache, error=error, latency_s=latency_s,
            tokens_out=tokens_out if not error else 0, cost_usd=cost_usd,
        )  # fmt: skip

    def _fallback(self, engine: str, version: str, instead_of: str | None) -> None:
        if instead_of is None:
            if self._falling_back.pop((engine, version), None) is not None:
                log.info("version answers its share again", engine=engine, version=version)
            return
        self.metrics.fallbacks.labels(engine, instead_of, version).inc()
        # The judge counts it as the down version's failure, as the 503 it would have been:
        # a canary that stays down is rolled back, not kept out of sight behind the stable
        # (each probe of its breaker would fail a user's request meanwhile).
        self._window(engine, instead_of).record_fallback(at=self.clock())
        if (engine, instead_of) not in self._falling_back:  # once per outage, not per request
            self._falling_back[(engine, instead_of)] = version
            log.warning("every replica of a version is down: the other version answers its share",
                        engine=engine, down=instead_of, answering=version)  # fmt: skip

    def _window(self, engine: str, version: str) -> VersionWindow:
        window = self.windows.get((engine, version))
        if window is None:
            rollout = self.by_name.get(engine)
            span = FIGURES_WINDOW_S
            if rollout is not None and rollout.canary_settings is not None:
                span = max(span, rollout.canary_settings.auto_rollback.window_s)
            window = self.windows[(engine, version)] = VersionWindow(span, started=self._started)
            # Keep the windows of the versions served now plus a few old ones, not every one ever.
            if len(self.windows) > 4 * len(self.by_name) + 8:
                served = self.served()
                for key in [k for k in self.windows if k not in served][:4]:
                    del self.windows[key]
        return window

    def shadow_hook(
        self, engine: Engine, path: str, body: dict[str, Any], affinity: Callable[[], bytes]
    ) -> Callable[[bytes], None] | None:
        """For a sampled request to an engine with a canary: a callback taking the user's answer
        that compares it, in the background, with the other version's. None when not sampled."""
        rollout = self.by_name.get(engine.name)
        if rollout is None or not rollout.active or rollout.canary_settings is None:
            return None
        quality = rollout.canary_settings.quality
        if not self.shadow.sampled(quality):
            return None
        canary = rollout.canary
        assert canary is not None
        other = rollout.engine if engine is canary else canary
        if not other.can_take(time.monotonic()):
            return None  # (answering for it while it is down: nothing to compare with)
        canary_version = canary.version or "unknown"
        stable_version = rollout.engine.version or "unknown"
        name = engine.name
        prefix = affinity()

        def report(outcome: Outcome) -> None:
            self.metrics.shadow.labels(name, canary_version, outcome).inc()
            if outcome in ("agree", "disagree"):
                for version in (canary_version, stable_version):
                    window = self._window(name, version)
                    window.compared += 1
                    window.agree += outcome == "agree"

        def on_answer(answer: bytes) -> None:
            if rollout.canary is not canary:
                # Promoted or rolled back while this answer streamed: the versions to compare
                # are no longer both served (after a promotion the stable's replicas are v2's).
                report("dropped")
                return
            self.shadow.start(
                other=other, path=path, body=body, affinity=prefix, primary_answer=answer,
                quality=quality, busy=self.busy(name), report=report,
            )  # fmt: skip

        return on_answer

    # -- transitions ----------------------------------------------------------------------------

    async def promote(self, engine: str, *, reason: str = "admin") -> RolloutState:
        async with self._lock:
            rollout = self._rollout(engine)
            state = rollout.state.promote(now=self.wall_clock(), reason=reason)
            if state.previous == "auto" and rollout.engine.version is not None:
                # A discovered stable version: the one retired is what its replicas served.
                state = dataclasses.replace(state, previous=rollout.engine.version)
            await self._commit(rollout, state, action="promote")
            return state

    async def rollback(
        self, engine: str, *, reason: str = "admin", judged: str | None = None
    ) -> RolloutState:
        """Remove the canary; ``judged`` is the judge's reason when the proxy decided it."""
        async with self._lock:
            rollout = self._rollout(engine)
            state = rollout.state.rollback(now=self.wall_clock(), reason=reason)
            if judged is not None:
                self.metrics.auto_rollbacks.labels(engine, judged).inc()
                log.warning("canary rolled back automatically", engine=engine, reason=reason)
            await self._commit(rollout, state, action="rollback")
            return state

    async def set_share(self, engine: str, share: float) -> RolloutState:
        async with self._lock:
            rollout = self._rollout(engine)
            state = rollout.state.with_share(share, now=self.wall_clock())
            await self._commit(rollout, state, action="share")
            return state

    def _rollout(self, engine: str) -> EngineRollout:
        rollout = self.by_name.get(engine)
        if rollout is None:
            raise KeyError(engine)
        return rollout

    async def _commit(self, rollout: EngineRollout, state: RolloutState, *, action: str) -> None:
        before = self.served()
        self._apply(rollout, state)
        self.metrics.transitions.labels(rollout.engine.name, action, _reason_label(state)).inc()
        log.warning("rollout changed", engine=rollout.engine.name, action=action,
                    status=state.status, reason=state.reason, stable=state.stable.version,
                    canary=state.canary.version if state.canary else None)  # fmt: skip
        await self._persist(state)
        self._purge(before - self.served())

    def _apply(self, rollout: EngineRollout, state: RolloutState) -> None:
        """Make the runtime replica sets match ``state`` (no I/O; in place)."""
        engine = rollout.engine
        if rollout.applied_stable != state.stable:
            canary = rollout.canary
            if canary is not None and _describes(state.stable, canary):
                # Promotion: the canary's replicas (breakers, in-flight counts) become stable.
                engine.settings, engine.replicas = canary.settings, canary.replicas
                engine.version, engine.upstream_model = canary.version, canary.upstream_model
            elif rollout.applied_stable is not None:
                fresh = self._engine_for(rollout, state.stable)
                engine.settings, engine.replicas = fresh.settings, fresh.replicas
                engine.version, engine.upstream_model = fresh.version, fresh.upstream_model
            rollout.applied_stable = state.stable
        if state.canary is None:
            rollout.canary = None
        elif rollout.canary is None or not _describes(state.canary, rollout.canary):
            rollout.canary = self._engine_for(rollout, state.canary)
        retired = rollout.state.canary
        if retired is not None and (state.canary is None or state.canary != retired):
            self.metrics.set_share(engine=engine.name, version=retired.version, share=0.0)
        rollout.state = state
        if state.canary is not None:
            share = state.share if state.status == "canary" else 0.0
            self.metrics.set_share(engine=engine.name, version=state.canary.version, share=share)
        self._refresh_polled()

    def _engine_for(self, rollout: EngineRollout, replicas: ReplicaSet) -> Engine:
        base = rollout.engine.settings
        cost = base.cost
        configured_canary = rollout.canary_settings
        if configured_canary is not None and configured_canary.version == replicas.version:
            cost = configured_canary.cost or cost
        settings = base.model_copy(
            update={
                "urls": list(replicas.urls), "version": replicas.version, "cost": cost,
                "canary": None,
            }
        )  # fmt: skip
        engine = Engine.from_settings(settings)
        if replicas.model != base.model:
            engine.upstream_model = replicas.model
        return engine

    def _refresh_polled(self) -> None:
        engines = [r.engine for r in self.by_name.values()]
        engines += [r.canary for r in self.by_name.values() if r.canary is not None]
        self.polled[:] = engines  # in place: the health poller holds this very list

    def _purge(self, removed: set[tuple[str, str]]) -> None:
        cache = self.cache
        if cache is None or not removed:
            return
        for name, version in removed:
            self._spawn(self._invalidate(cache, name, version))

    async def _invalidate(self, cache: ResponseCache, name: str, version: str) -> None:
        try:
            removed = await cache.invalidate(InvalidationFilter(engine=name, version=version))
        except (CacheBackendError, OSError) as exc:  # cleanup only: the next start-up purge retries
            log.warning("could not purge a retired version", engine=name, version=version,
                        error=str(exc))  # fmt: skip
            return
        log.info("purged cache entries of a retired version", engine=name, version=version,
                 entries=removed)  # fmt: skip

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for background purges (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- persistence and background loops ---------------------------------------------------------

    async def start(self, cache: ResponseCache | None) -> None:
        """Load persisted states (Redis first, then the data directory) and apply them."""
        self.cache = cache
        self._file = FileStateStore(self.settings.resolved_data_dir() / "rollout.json")
        persisted = await self._file.load()
        if self.settings.redis is not None:
            self._redis = RedisStateStore(self.settings.redis.url)
            try:
                persisted.update(await self._redis.load(list(self.by_name)))
            except _REDIS_DOWN as exc:  # the file is the next best
                log.warning("rollout state unavailable in Redis; using the local file",
                            error=str(exc))  # fmt: skip
        now = self.wall_clock()
        for name, rollout in self.by_name.items():
            state = resolve_at_startup(rollout.config, persisted.get(name), now=now)
            if self._redis is not None and persisted.get(name) not in (None, state):
                await self._persist_redis(state)  # this config changed it: tell the fleet
            if state != rollout.state:
                self._apply(rollout, state)
                if state.status != "canary" or state.rev:
                    log.info("rollout state restored", engine=name, status=state.status,
                             stable=state.stable.version, reason=state.reason)  # fmt: skip
        await self._file.save({n: r.state for n, r in self.by_name.items()})
        self._spawn_loop(self._judge_forever())
        if self._redis is not None:
            self._spawn_loop(self._follow_redis())

    def _spawn_loop(self, coro: Any) -> None:
        self._loops.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        for task in self._loops:
            await stop_task(task)
        await self.shadow.aclose()
        await self.drain()
        if self._redis is not None:
            await self._redis.aclose()

    async def _persist(self, state: RolloutState) -> None:
        await self._persist_file()
        await self._persist_redis(state)

    async def _persist_file(self) -> None:
        if self._file is None:
            return
        try:
            await self._file.save({n: r.state for n, r in self.by_name.items()})
        except OSError as exc:  # (disk full) the change is in effect already: say it is not kept
            log.error("rollout state not saved in the data directory; a restart may undo it",
                      path=str(self._file.path), error=str(exc))  # fmt: skip

    async def _persist_redis(self, state: RolloutState) -> None:
        if self._redis is not None:
            try:
                await self._redis.save(state)
            except _REDIS_DOWN as exc:  # the local change stands; say it is not shared
                log.error("rollout state not shared through Redis", engine=state.engine,
                          error=str(exc))  # fmt: skip

    async def _follow_redis(self) -> None:
        assert self._redis is not None
        while True:
            await asyncio.sleep(REDIS_POLL_S)
            try:
                remote = await self._redis.load(list(self.by_name))
            except _REDIS_DOWN as exc:  # try again next tick
                if cancelling():
                    raise asyncio.CancelledError from exc  # a stop that surfaced as a timeout
                continue
            for name, rollout in self.by_name.items():
                if name not in remote and rollout.state.rev > 0:
                    # Redis lost it (restarted empty) or never got it (a change made while it
                    # was down): publish ours, or the replicas would stay split. A state only
                    # the config made (rev 0) is each replica's own and stays unpublished.
                    async with self._lock:
                        await self._persist_redis(rollout.state)
            for name, state in remote.items():
                rollout = self.by_name[name]
                if state == rollout.state:
                    continue
                async with self._lock:  # (an admin's change in between is read, not overwritten)
                    mine = rollout.state
                    # Newer wins; two replicas changing it at once (same rev): the later change.
                    if _precedence(mine) > _precedence(state):
                        # Ours is the later change but another write landed last (or ours never
                        # landed): publish ours again, or each replica would keep its own.
                        await self._persist_redis(mine)
                    else:
                        before = self.served()
                        self._apply(rollout, state)
                        log.info("rollout state changed by another replica", engine=name,
                                 status=state.status)  # fmt: skip
                        await self._persist_file()
                        self._purge(before - self.served())

    async def _judge_forever(self) -> None:
        intervals = [
            r.canary_settings.auto_rollback.check_interval_s
            for r in self.by_name.values()
            if r.canary_settings is not None
        ]
        if not intervals:
            return
        while True:
            await asyncio.sleep(min(intervals))
            await self.check_now()

    async def check_now(self) -> list[tuple[str, str]]:
        """Judge every canary now; roll back those that trip. Returns (engine, reason) pairs."""
        tripped = []
        for name in list(self.by_name):
            verdict = self.verdict(name)
            if verdict is None:
                continue
            reason, detail = verdict
            try:
                await self.rollback(name, reason=f"auto: {reason}: {detail}", judged=reason)
            except RolloutConflict as exc:  # an admin acted first
                log.info("automatic rollback skipped", engine=name, error=str(exc))
                continue
            tripped.append((name, reason))
        return tripped

    def verdict(self, name: str) -> tuple[str, str] | None:
        rollout = self.by_name[name]
        settings = rollout.canary_settings
        if not rollout.active or settings is None or not settings.auto_rollback.enabled:
            return None
        canary = rollout.canary
        assert canary is not None
        auto = settings.auto_rollback
        now = self.clock()
        stable_window = self.windows.get((name, rollout.engine.version or "unknown"))
        canary_window = self.windows.get((name, canary.version or "unknown"))
        if stable_window is None or canary_window is None:
            return None
        result = judge(
            canary_window.judged(now, auto.window_s),
            stable_window.judged(now, auto.window_s),
            Bounds(
                min_requests=auto.min_requests,
                max_error_rate_delta=auto.max_error_rate_delta,
                max_latency_ratio=auto.max_latency_ratio,
                confidence=auto.confidence,
            ),
        )
        return (result.reason, result.detail) if result is not None else None

    # -- reading --------------------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        rollout = self._rollout(name)
        state = rollout.state
        now = self.clock()
        versions: dict[str, Any] = {}
        roles = [("stable", rollout.engine)]
        if rollout.canary is not None:
            roles.append(("canary", rollout.canary))
        for role, engine in roles:
            version = engine.version or "unknown"
            window = self.windows.get((name, version))
            figures = window.figures(now) if window is not None else None
            versions[version] = {"role": role, "replicas": [r.url for r in engine.replicas],
                                 "model": engine.wire_model, "figures": figures}  # fmt: skip
        # The version the last promote or rollback took out of service, while its window still
        # holds answers: what it did is why it was retired (an automatic rollback above all).
        retired = state.previous
        window = self.windows.get((name, retired)) if retired is not None else None
        if retired is not None and retired not in versions and window is not None:
            figures = window.figures(now)
            if figures["requests"] or figures["fallbacks"]:  # (down all along: fallbacks only)
                versions[retired] = {"role": "retired", "replicas": [], "model": None,
                                     "figures": figures}  # fmt: skip
        auto = rollout.canary_settings.auto_rollback if rollout.canary_settings else None
        return {
            "engine": name,
            "status": state.status,
            "reason": state.reason,
            "changed_at": state.changed_at,
            "share": state.share if state.status == "canary" else 0.0,
            "stable_version": rollout.engine.version,
            "canary_version": rollout.canary.version if rollout.canary else None,
            "previous": state.previous,
            "rev": state.rev,
            "auto_rollback": auto.model_dump() if auto is not None else None,
            "versions": versions,
        }

    def dashboard(self) -> dict[str, Any]:
        """Per-version rows of the engines that have (or had) a canary."""
        return {
            name: self.status(name)
            for name, rollout in self.by_name.items()
            if rollout.canary is not None or rollout.state.status != "none"
        }


def _precedence(state: RolloutState) -> tuple[int, float, bytes]:
    """Which of two states of an engine the fleet keeps: the higher rev, then the later change,
    then (a tie to the microsecond) a fixed order, so every replica picks the same one."""
    return state.rev, state.changed_at, orjson.dumps(state.to_json(), option=orjson.OPT_SORT_KEYS)


def _describes(replicas: ReplicaSet, engine: Engine) -> bool:
    return (
        engine.version == replicas.version
        and tuple(engine.settings.urls) == replicas.urls
        and engine.wire_model == replicas.model
    )


def _reason_label(state: RolloutState) -> str:
    # Bounded label: admin / auto:<judge reason> / configured / share.
    if state.reason.startswith("auto: "):
        return "auto_" + state.reason.split(":")[1].strip()
    if state.reason.startswith("share"):
        return "share"
    return state.reason if state.reason in ("admin", "configured") else "other"
