"""``create_app(settings)``: the only place that wires the proxy together.

State lives on the application under ``web.AppKey``s; every resource with a lifetime (the HTTP
client session, the cache, the embedding worker, the health poller, policy hot reload, version
discovery) is an async generator in ``cleanup_ctx``, so a test builds a fresh, independent app and
tears it down completely.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import numpy as np
import structlog
from aiohttp import web

from proxy import admin, cors, handlers
from proxy.cache.index import SemanticIndex
from proxy.cache.keys import Scope
from proxy.cache.service import CacheConfig, CosineVerifier, ResponseCache, SemanticVerifier
from proxy.cache.store import CacheBackendError, CacheStore, DirectoryLock, DiskStore
from proxy.cache.verifier import CacheVerifier
from proxy.embeddings.worker import AsyncEncode, EmbeddingWorker, Encode
from proxy.engines.autoversion import RESOLVE_ERRORS, VersionWatch, replica_version
from proxy.engines.client import AiohttpTransport, EngineCaller, Transport
from proxy.engines.health import poll_forever
from proxy.engines.pool import Engine, Replica
from proxy.errors import FrugalError, InternalError, InvalidRequest, NotFound, PayloadTooLarge
from proxy.observability.access import AccessLog
from proxy.observability.dashboard import dashboard_routes
from proxy.observability.metrics import Metrics
from proxy.policy.admission import EngineAdmission, Outcome
from proxy.policy.default import StaticPolicies, open_policies
from proxy.policy.limits import CounterBackendError, Limiter, LocalCounters
from proxy.policy.policyset import PolicyIssue, PolicySet, Principal
from proxy.policy.store import PolicyStore
from proxy.rollout.manager import Rollouts
from proxy.routing.classifier import DifficultyClassifier
from proxy.routing.router import Router
from proxy.services import PolicySource, Services
from proxy.settings import (
    VIRTUAL_MODEL,
    ConfigError,
    EmbeddingSettings,
    ServerSettings,
    Settings,
)
from proxy.stopping import WAITS
from proxy.tasks import cancelling, stop

SERVICES = web.AppKey("services", Services)
TRANSPORT = web.AppKey("transport", AiohttpTransport)
ENCODE = web.AppKey("encode", object)

if TYPE_CHECKING:
    from proxy.cache.verifier import EncodedBatch
    from proxy.embeddings.process import EncoderProcess
    from proxy.policy.redis_limits import RedisCounters
    from proxy.routing.views import ShallowViews

log = structlog.get_logger("frugal.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: Settings,
    *,
    transport: Transport | None = None,
    metrics: Metrics | None = None,
    encode: Encode | None = None,
    access_log: bool = True,
) -> web.Application:
    """Build the proxy.

    ``transport`` replaces the HTTP client to the engines and ``encode`` the embedding model
    (tests pass plain functions); by default the MiniLM model loads when the app starts.
    """
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.server.max_body_bytes + 1,
    )
    metrics = metrics or Metrics()
    engines = [Engine.from_settings(e) for e in settings.engines]
    http_transport = AiohttpTransport(lean=settings.server.lean_engine_client)
    caller = EngineCaller(
        transport or http_transport,
        on_retry=lambda engine, reason: metrics.upstream_retry(engine=engine.name, reason=reason),
    )
    policies = _policy_source(settings)
    services = Services(
        settings=settings,
        engines=engines,
        metrics=metrics,
        caller=caller,
        router=_router(settings, engines),
        policies=policies,
        limiter=Limiter(LocalCounters(), on_backend_error=settings.limits.on_backend_error),
        admissions={
            e.name: EngineAdmission(
                e.name, e.settings.max_concurrency, observer=_AdmissionMetrics(metrics)
            )
            for e in engines
        },
        rollouts=Rollouts.build(settings, engines, metrics, caller),
        access_log=_access_log(settings) if access_log else None,
    )
    app[SERVICES] = services
    app[TRANSPORT] = http_transport
    if encode is not None:
        app[ENCODE] = encode

    streams, grace_s = services.streams, settings.server.shutdown_timeout_s / WAITS

    async def end_streams_before_the_deadline(_: web.Application) -> None:
        streams.arm(grace_s)  # (the shutdown signal runs before aiohttp's first wait)

    async def stop_the_timer(_: web.Application) -> None:
        streams.disarm()

    async def close_when_draining(_: web.Request, response: web.StreamResponse) -> None:
        # A kept-alive client is told to reconnect: its next request goes to the load balancer,
        # which has taken this proxy out of rotation, not down a connection to it.
        if services.draining:
            response.force_close()
            # (aiohttp has made the head by the time this hook runs: the header is set here)
            response.headers["Connection"] = "close"

    app.on_response_prepare.append(close_when_draining)
    app.on_shutdown.append(end_streams_before_the_deadline)
    app.on_cleanup.append(stop_the_timer)
    access = services.access_log
    if access is not None:
        app.cleanup_ctx.append(lambda _: access.flushing())
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_redis_limits)
    app.cleanup_ctx.append(_embedder)
    app.cleanup_ctx.append(_response_cache)
    app.cleanup_ctx.append(_shadow_checks)
    app.cleanup_ctx.append(_rollouts)
    app.cleanup_ctx.append(_engine_versions)
    app.cleanup_ctx.append(_health_poller)
    app.cleanup_ctx.append(_overdue_streams)
    app.cleanup_ctx.append(_policy_watcher)
    app.cleanup_ctx.append(_budget_gauges)
    cors.install(app, settings.server.cors)
    handlers.add_routes(app, services)
    admin.add_routes(app, services)
    rollouts = services.rollouts
    app.add_routes(
        dashboard_routes(lambda: {**metrics.snapshot(), "rollout": rollouts.dashboard()})
    )
    return app


# -- built at once ----------------------------------------------------------------------------


def _policy_source(settings: Settings) -> PolicySource:
    served = [VIRTUAL_MODEL, *(e.model for e in settings.engines)]
    folder = settings.policies
    source: PolicySource
    if folder is not None and not folder.is_dir() and "policies" in settings.model_fields_set:
        # Named in the config but absent (a typo, a volume not mounted): running open would
        # serve without keys to whatever reaches the loopback address (a local reverse proxy).
        raise ConfigError(
            f"policies: {folder} is not a folder; create it, fix the path, or set policies: null "
            "to run open (keyless, loopback only)"
        )
    if folder is None or not folder.is_dir():
        if folder is not None:
            log.warning("policy folder not found; running open", folder=str(folder))
        source = StaticPolicies(
            open_policies(
                models=served,
                scope=settings.cache.scope,
                ttl_seconds=settings.cache.ttl_seconds,
                semantic=settings.cache.semantic,
                cache_sampled=settings.cache.cache_sampled,
                threshold=settings.routing.threshold,
            )
        )
    else:
        from proxy.policy.store import PolicyLoadError

        def refuse_open(policies: PolicySet) -> list[PolicyIssue]:
            # (as at start-up, so a reload that removes the last key cannot open the proxy)
            if not policies.is_open or _may_run_open(settings.server):
                return []
            message = (
                f"no policy file defines an API key, and server.host {settings.server.host} is "
                "not a loopback address, so the proxy would serve anyone: refused. Add keys "
                "(frugal keys add --tier T) or set server.allow_open: true"
            )
            return [PolicyIssue(str(folder), None, None, message)]

        try:
            # (a model no engine serves is refused as `frugal policy check --config` refuses
            # it: a typo leaves the tier without the model it meant)
            source = PolicyStore.open(folder, served_models=served, check=refuse_open)
        except PolicyLoadError as exc:
            issues = "\n".join(f"  {issue}" for issue in exc.issues)
            raise ConfigError(f"policies: {folder}: invalid tier policies\n{issues}") from exc
    current = source.current
    if current.is_open:
        if not _may_run_open(settings.server):
            raise ConfigError(
                f"server.host: {settings.server.host} is not a loopback address and no policy "
                "file defines an API key, so the proxy would serve anyone: refused. Add keys "
                "(frugal keys add --tier T) or set server.allow_open: true"
            )
        log.warning("running open: no API key is required", tier=current.open_tier)
    return source


def _may_run_open(server: ServerSettings) -> bool:
    return _loopback(server.host) or server.allow_open


def _access_log(settings: Settings) -> AccessLog | None:
    level = settings.logging.level
    if level not in ("debug", "info"):
        return None  # the access line is an INFO event
    return AccessLog(json=settings.logging.format == "json")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _router(settings: Settings, engines: list[Engine]) -> Router:
    classifier = None
    if settings.routing.enabled and settings.embeddings.enabled:
        try:
            classifier = DifficultyClassifier.load(settings.routing.classifier)
        except (OSError, ValueError) as exc:
            log.warning("difficulty classifier unavailable; auto goes to the cheapest engine",
                        error=str(exc))  # fmt: skip
    return Router(
        engines=engines,
        classifier=classifier,
        count_tokens=_approximate_tokens,
        default_threshold=settings.routing.threshold,
        sticky_margin=settings.routing.sticky_margin,
    )


def _approximate_tokens(text: str) -> int:
    # Until the tokenizer loads: byte-level BPE averages about four characters a token.
    return max(1, len(text) // 4)


class _AdmissionMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def queue_length(self, engine: str, length: int) -> None:
        self._metrics.queue_length(engine=engine, length=length)

    def waited(self, engine: str, tier: str, seconds: float, outcome: Outcome) -> None:
        if outcome == "admitted":
            self._metrics.queue_wait(engine=engine, tier=tier, seconds=seconds)
        elif outcome != "cancelled":
            self._metrics.admission_rejected(engine=engine, tier=tier, reason=outcome)


class _CacheMetrics:
    def __init__(self, metrics: Metrics, backend: str) -> None:
        self._metrics = metrics
        self._backend = backend

    def on_lookup(self, outcome: str, seconds: float) -> None:
        pass  # the pipeline counts lookups with their scope

    def on_store(self, outcome: str) -> None:
        if outcome == "failed":
            self._metrics.cache_error(backend=self._backend, op="put")

    def on_backend_error(self, operation: str, error: BaseException) -> None:
        self._metrics.cache_error(backend=self._backend, op=operation)

    def on_semantic_refusal(self, reason: str) -> None:
        self._metrics.cache_refusal(reason)


# -- lifetimes --------------------------------------------------------------------------------


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    # Unlimited pool: the engines' own batching is the limit, and admission control caps what
    # reaches them; a small client pool would queue requests invisibly here.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    # The engines' bytes are relayed as they come (no decompression, for speed), so ask for
    # them uncompressed: aiohttp would otherwise offer gzip, and an engine or a gateway in front
    # of it that takes the offer would reach the client as unreadable bytes.
    session = aiohttp.ClientSession(
        connector=connector, auto_decompress=False, headers={"Accept-Encoding": "identity"}
    )
    app[TRANSPORT].session = session
    yield
    await app[TRANSPORT].aclose()  # the session and the lean client's connections


async def _redis_limits(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    settings = services.settings
    if settings.limits.backend != "redis" or settings.redis is None:
        yield
        return
    from proxy.policy.redis_limits import HOLDING_TTL_S, RedisCounters

    counters = RedisCounters.from_url(settings.redis.url)
    checking = asyncio.create_task(_check_durability(counters, services))
    limiter = services.limiter = Limiter(
        counters,
        lease_ttl_s=HOLDING_TTL_S,
        reservation_ttl_s=HOLDING_TTL_S,
        on_backend_error=settings.limits.on_backend_error,
        on_outage=services.metrics.limits_error,
    )
    renewing = asyncio.create_task(limiter.keep_holdings())
    yield
    await stop(renewing)
    await stop(checking)
    await limiter.drain()
    await counters.aclose()


DURABILITY_RETRY_S = 30.0


async def _check_durability(counters: RedisCounters, services: Services) -> None:
    """Once Redis answers: say so if the budgets' spend would not survive its restart (checked
    at start-up, against the tiers then loaded)."""
    from redis.exceptions import RedisError

    from proxy.policy.redis_limits import durability_warning

    while True:
        try:
            persistence = await counters.persistence()
            break
        except RedisError:  # down at start-up: the limiter reports that; ask again later
            await asyncio.sleep(DURABILITY_RETRY_S)
    budgeted = [
        tier
        for tier, policy in services.policies.current.tiers.items()
        if policy.budget.usd_per_day is not None or policy.budget.usd_per_day_per_tenant is not None
    ]
    warning = durability_warning(persistence, budgeted)
    if warning is not None:
        log.warning("limits.redis_not_durable", detail=warning)


async def _embedder(app: web.Application) -> AsyncIterator[None]:
    """The embedding model on its own thread, batching concurrent requests.

    With the semantic cache on, one fused MiniLM pass yields both the base embedding (router,
    ANN index) and the verifier's vector (its tuned top layers), which the cache's verifier keeps
    for the candidates it will compare."""
    services = app[SERVICES]
    settings = services.settings.embeddings
    encode = app.get(ENCODE)
    loaded: _LoadedEncoder | None = None
    if encode is None and settings.enabled:
        try:
            loaded = await asyncio.to_thread(_load_encoder, services)
            if loaded.child is not None:
                try:
                    await loaded.child.start()
                except BaseException:
                    await asyncio.to_thread(loaded.close)
                    raise
            encode = loaded.encode
        except (ImportError, OSError, RuntimeError, ValueError, KeyError) as exc:
            log.warning("embedding model unavailable: no semantic cache, no difficulty scores",
                        error=str(exc))  # fmt: skip
    if encode is None:
        services.router.classifier = None
        yield
        return
    _one_blas_thread()
    metrics = services.metrics
    worker = EmbeddingWorker(
        encode,  # type: ignore[arg-type]
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        on_batch=lambda size, seconds, waited: metrics.embedding_batch(
            size=size, encode_s=seconds, wait_s=waited
        ),
        threads=settings.threads,
        remembered=settings.remembered,
        encode_background=None if loaded is None else loaded.background,
        max_queue_ms=settings.max_queue_ms,
        aencode=None if loaded is None else loaded.aencode,
        aencode_background=None if loaded is None else loaded.abackground,
    )
    async with worker:
        services.embedder, services.encode = worker, encode  # type: ignore[assignment]
        yield
        services.embedder = services.encode = None
    if loaded is not None:
        if loaded.child is not None:
            await loaded.child.close()
        await asyncio.to_thread(loaded.close)


async def _response_cache(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    settings = services.settings
    if not settings.cache.enabled:
        yield
        return
    with contextlib.ExitStack() as stack:  # the disk store's folder lock, released last
        store: CacheStore
        metrics = _CacheMetrics(services.metrics, settings.cache.backend)
        if settings.cache.backend == "redis" and settings.redis is not None:
            from proxy.cache.redis_store import RedisStore

            store = RedisStore(settings.redis.url, on_error=metrics.on_backend_error)
        else:
            directory = settings.cache.data_dir or settings.resolved_data_dir() / "cache"
            lock = DirectoryLock(directory)  # raises StoreInUse: a second proxy on the folder
            stack.callback(lock.release)
            disk = await asyncio.to_thread(
                DiskStore,
                directory,
                size_limit=int(settings.cache.size_limit_gb * 2**30),
                writer=settings.cache.disk_writer,
                on_error=metrics.on_backend_error,
            )
            await disk.start_writer()
            store = disk
        ttl = {scope: settings.cache.ttl_seconds for scope in Scope}
        verifier, floor = _verifier(services)
        cache = ResponseCache(
            store,
            config=CacheConfig(ttl_seconds=ttl, semantic_floor=floor),
            index=SemanticIndex(),
            verifier=verifier,
            observer=metrics,
            # The ANN graph is saved at shutdown and reloaded at start, so a restart does not
            # rebuild it from every stored embedding (minutes at a million entries).
            snapshot_dir=settings.resolved_data_dir() / "cache-index",
        )
        async with cache:
            services.cache = cache
            yield
            services.cache = None


async def _shadow_checks(app: web.Application) -> AsyncIterator[None]:
    """Per-tier cut-offs (fixed or self-tuned), background audits of semantic hits, and the
    metrics of every automatic threshold (the routing budget follower's too)."""
    from proxy.shadow.audit import CacheAuditor
    from proxy.shadow.metrics import ShadowMetrics
    from proxy.shadow.tuner import CacheTuner

    services = app[SERVICES]
    metrics = ShadowMetrics(services.metrics.registry)
    services.router.budget.observer = metrics  # strong-share moves show beside cut-off moves
    cache = services.cache
    if cache is None:
        yield
        for collector in metrics.collectors():
            services.metrics.registry.unregister(collector)
        return
    audit = services.settings.cache.audit
    base = cache.verifier
    tuner = CacheTuner(
        base_cutoff=base.cutoff if isinstance(base, CacheVerifier) else _cosine_threshold(base),
        observer=metrics,
        window=audit.window,
    )
    auditor = CacheAuditor(
        audit,
        caller=services.caller,
        tuner=tuner,
        metrics=metrics,
        admissions=services.admissions,
        # audits embed off the batching queue: a user's text never waits behind an audit's
        embedder=lambda: (
            services.embedder.embed_background if services.embedder is not None else None
        ),
    )
    services.tuner, services.auditor = tuner, auditor
    yield
    services.tuner = services.auditor = None
    await auditor.aclose()
    for collector in metrics.collectors():
        services.metrics.registry.unregister(collector)


def _cosine_threshold(verifier: SemanticVerifier) -> float:
    return verifier.threshold if isinstance(verifier, CosineVerifier) else 0.92


def _one_blas_thread() -> None:
    """numpy's BLAS on one thread. The proxy spreads its work over its own threads, and
    OpenBLAS's helper threads spin between products (the semantic index's flat search over a few
    thousand rows, on the event loop): on two cores that spinning took a core from the encoder
    (c=64 lookups 238-265/s against 329-356/s with 1,000 stored questions,
    ``scripts/bench_cache_speed.py --pairs 1000``). Called on the event loop's thread, after the
    models load (they bring their own BLAS copies): OpenBLAS did not take a limit set from the
    loader's thread."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


@dataclass
class _LoadedEncoder:
    encode: Encode  # on a thread (never the event loop's): cache imports, the verifier
    background: Encode | None = None  # for background texts, when it differs
    close: Callable[[], None] = lambda: None  # the encoder's threads
    # An encoder in a child process: started on the event loop, and awaited there.
    child: EncoderProcess | None = None
    aencode: AsyncEncode | None = None
    abackground: AsyncEncode | None = None


def _load_encoder(services: Services) -> _LoadedEncoder:
    """The embedding function: fused with the verifier when the semantic cache needs it; else,
    for a difficulty head that reads the shallow view, the base encoder that also computes it.
    With ``embeddings.isolation: process`` (the default) either runs in a child process
    (proxy/embeddings/process.py); the remembering below stays in the proxy."""
    embeddings = services.settings.embeddings
    if services.router.classifier is not None:
        from proxy.routing.commands import load_count_tokens
        from proxy.routing.views import DEFAULT_CAPACITY, ShallowViews

        # The head was trained with MiniLM's tokenizer counts: score with the same ones.
        services.router.count_tokens = load_count_tokens()
        # Views must outlive the worker's remembered vectors (a repeated text skips the encoder).
        services.router.views = ShallowViews(
            max(DEFAULT_CAPACITY, embeddings.remembered + embeddings.max_batch)
        )
    classifier = services.router.classifier
    # Only a head with the second vote reads the views: otherwise keeping them is wasted work.
    views = (
        services.router.views
        if classifier is not None and classifier.shallow_neighbours is not None
        else None
    )
    isolated = embeddings.isolation == "process"
    cache = services.settings.cache
    if not (cache.enabled and cache.semantic):
        if views is None:
            from proxy.embeddings.minilm import load_minilm

            return _LoadedEncoder(load_minilm())
        # The head's second vote reads the encoder's shallow view: the fused one is off.
        return _views_encoder(views, embeddings, isolated)
    import torch

    from proxy.cache.packed_encoder import SPLIT_IDLE_S, pack_verifier
    from proxy.cache.verifier import CacheVerifier, Verifier

    # One torch thread per call: the worker splits large batches across its threads itself.
    torch.set_num_threads(1)
    verifier = Verifier.load(cross=cache.cross_encoder)
    options = {
        "precision": embeddings.precision,
        # a lone text's two top stacks on two threads: only with a second core for the model
        "split_single": embeddings.threads > 1,
        "split_idle_s": SPLIT_IDLE_S,
    }
    packed = None
    child: EncoderProcess | None = None
    if not isolated or verifier.cross is not None:
        # (The cross-encoder reads the packed encoder's lower layers: it runs in this process.)
        packed = pack_verifier(verifier, **options)  # type: ignore[arg-type]
        try:
            packed.warm_up()  # here at start-up, not in the first requests
        except BaseException:
            packed.close()
            raise
    if isolated:
        from proxy.embeddings.process import EncoderProcess, PooledEncoder

        child = EncoderProcess("fused", options, threads=embeddings.threads)
        if verifier.cross is None:
            # The verifier's own passes (vectors of texts not seen encoded) go there too.
            tokenizer = verifier.encoder.tokenizer
            verifier.encoder = PooledEncoder(child, tokenizer)  # type: ignore[assignment]
    cache_verifier = CacheVerifier(
        verifier, threshold=cache.similarity_threshold, cutoff=cache.verifier_cutoff
    )
    services.verifier = cache_verifier

    def seen(texts: list[str], batch: EncodedBatch) -> np.ndarray:
        """What the pass saw, kept for the cache's verifier and the router's views."""
        for i, text in enumerate(texts):
            # the cache's window check on this text then needs no tokenizing
            whole = None if batch.whole is None else bool(batch.whole[i])
            cache_verifier.remember(text, batch.verifier[i], whole=whole)
        if views is not None:
            views.remember(batch.base, batch.shallow)
        return batch.base

    if child is not None:
        return _child_encoder(child, seen, close=packed.close if packed is not None else None)
    assert packed is not None

    def encode(texts: list[str], background: bool = False) -> np.ndarray:
        # Background texts (audits) leave the encoder's helper thread, and so the second core,
        # to the user's text encoded meanwhile.
        return seen(texts, packed.encode(texts, use_helper=not background))

    return _LoadedEncoder(encode, functools.partial(encode, background=True), packed.close)


def _views_encoder(
    views: ShallowViews, embeddings: EmbeddingSettings, isolated: bool
) -> _LoadedEncoder:
    """The base encoder, which also computes the shallow view a router head reads."""
    if not isolated:
        from proxy.routing.views import load_encoder_with_views

        return _LoadedEncoder(load_encoder_with_views(views, embeddings.precision))
    from proxy.embeddings.process import EncoderProcess

    child = EncoderProcess("base", {"precision": embeddings.precision}, threads=embeddings.threads)

    def seen(texts: list[str], batch: EncodedBatch) -> np.ndarray:
        views.remember(batch.base, batch.shallow)
        return batch.base

    return _child_encoder(child, seen)


def _child_encoder(
    child: EncoderProcess,
    seen: Callable[[list[str], EncodedBatch], np.ndarray],
    close: Callable[[], None] | None = None,
) -> _LoadedEncoder:
    """The functions of an encoder in a child process: awaited by the embedding worker on the
    event loop, blocking for threads."""

    async def aencode(texts: list[str], background: bool = False) -> np.ndarray:
        return seen(texts, await child.encode(texts, background=background))

    def encode(texts: list[str], background: bool = False) -> np.ndarray:
        return seen(texts, child.encode_blocking(texts, background=background))

    return _LoadedEncoder(
        encode,
        functools.partial(encode, background=True),
        close=close or (lambda: None),
        child=child,
        aencode=aencode,
        abackground=functools.partial(aencode, background=True),
    )


def _verifier(services: Services) -> tuple[SemanticVerifier, float]:
    """The cache's verifier and the cosine below which no candidate is shown to it."""
    if services.verifier is not None:
        return services.verifier, services.verifier.threshold
    # No trained verifier (no ML extra, or a test's stand-in embedder): a strict cosine.
    threshold = services.settings.cache.similarity_threshold
    threshold = threshold if threshold is not None else 0.92
    return CosineVerifier(threshold=threshold), threshold


async def _rollouts(app: web.Application) -> AsyncIterator[None]:
    """Canary rollouts: persisted state applied before versions resolve; judge and sync loops."""
    services = app[SERVICES]
    rollouts = services.rollouts
    rollouts.busy = lambda name: services.admissions[name].waiting > 0
    await rollouts.start(services.cache)
    yield
    await rollouts.stop()


async def _engine_versions(app: web.Application) -> AsyncIterator[None]:
    """Resolve ``version: auto`` from the engines; keep trying in the background until each
    answers (an engine may still be loading its weights when the proxy starts). Cache entries
    of versions no engine serves any more are purged once every version is known. From then on
    the health poller keeps the versions current (``proxy/engines/autoversion.py``)."""
    services = app[SERVICES]
    session = app[TRANSPORT].session
    pending = [e for e in services.engines if e.version is None]
    task = None
    if session is not None:
        task = asyncio.create_task(_resolve_versions(services, session, pending))
        # Give a running engine a moment so the first requests already carry a version.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=2.0)
    yield
    await stop(task)


async def _resolve_versions(
    services: Services, session: aiohttp.ClientSession, engines: list[Engine]
) -> None:
    delay = 0.5
    engines = list(engines)
    reported: set[str] = set()  # each reason a replica gave, logged once
    while engines:
        for engine in list(engines):
            if engine.version is None:
                # Every replica is asked (one that reports another version stays out of
                # rotation); the first in the config's order that answers sets the version.
                versions = await asyncio.gather(*(_ask_version(engine, r, session, reported)
                                                  for r in engine.replicas))  # fmt: skip
                known = [v for v in versions if v is not None]
                if engine.version is None and known:  # (the health poller may have set it)
                    engine.version = known[0]
                    log.info("engine version", engine=engine.name, version=engine.version)
            if engine.version is not None:
                engines.remove(engine)
        if engines:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    await _purge_unserved(services, at_start=True)


async def _ask_version(
    engine: Engine,
    replica: Replica,
    session: aiohttp.ClientSession,
    reported: set[str] | None = None,
) -> str | None:
    now = time.monotonic()
    try:
        version = await replica_version(session, engine, replica)
    except RESOLVE_ERRORS as exc:
        if cancelling():
            raise asyncio.CancelledError from exc
        reason = f"{type(exc).__name__}: {exc}"
        if reported is not None and reason not in reported:
            # Until it has a version the engine serves nothing and /readyz says 503: say why
            # (once per reason: the resolution is retried every few seconds).
            reported.add(reason)
            log.warning("engine version unknown yet", engine=engine.name, replica=replica.url,
                        reason=reason)  # fmt: skip
        return None
    replica.version, replica.version_at = version, now
    return version


async def _purge_unserved(services: Services, *, at_start: bool = False) -> None:
    """Delete the cache entries of versions no engine (stable or canary) serves.

    A store shared by a fleet (Redis) also holds what other replicas serve: a replica starting
    during a rolling deploy, or one configured with fewer engines, must not delete those. There
    only a switch this replica watched its engines make (every replica of them moved on) purges,
    and only its own engines' entries; the rest expire with their TTL."""
    if services.cache is None:
        return
    shared = services.cache.shared
    if shared and at_start:
        return
    keep = services.rollouts.served()
    engines = {engine.name for engine in services.engines} if shared else None
    try:
        purged = await services.cache.purge_versions(keep, engines=engines)
    except (CacheBackendError, OSError) as exc:  # cleanup only: the next purge retries
        log.warning("could not purge versions no engine serves", error=str(exc))
        return
    if purged:
        log.info("purged cache entries of versions no engine serves", entries=purged)


async def publish_budgets(services: Services, published: set[str]) -> None:
    """Set ``frugal_budget_spent_usd``/``frugal_budget_limit_usd`` for every tier with a daily
    budget, from the limiter's counters (with Redis: the whole fleet's spend today).

    ``published`` holds the tiers shown last time; a tier whose budget went away with a policy
    reload is dropped from both gauges rather than left at its last value.
    """
    budgeted: set[str] = set()
    for tier, policy in services.policies.current.tiers.items():
        ceiling = policy.budget.usd_per_day
        if ceiling is None:
            continue
        budgeted.add(tier)
        services.metrics.budget_limit(tier=tier, usd=ceiling)
        try:
            spent, _ = await services.limiter.budget_status(Principal(tier, "-", policy))
        except CounterBackendError:
            continue  # counted and logged where requests meet it; the gauge keeps its last value
        services.metrics.budget_spent(tier=tier, usd=spent.spent_usd)
    for tier in published - budgeted:
        services.metrics.budget_dropped(tier=tier)
    published.clear()
    published.update(budgeted)


async def _budget_gauges(app: web.Application) -> AsyncIterator[None]:
    """Publish the tiers' budgets as often as the engines are polled: the budget alerts in
    deploy/prometheus/alerts.yml and the dashboard's tier table read these gauges."""
    services = app[SERVICES]
    interval_s = services.settings.health.interval_s

    async def loop() -> None:
        published: set[str] = set()
        while True:
            try:
                await publish_budgets(services, published)
            except Exception:
                log.warning("budget gauges not updated", exc_info=True)
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    yield
    await stop(task)


async def _overdue_streams(app: web.Application) -> AsyncIterator[None]:
    """Once a second, end the streams stuck writing to a client past their deadline."""
    streams = app[SERVICES].streams

    async def sweep() -> None:
        while True:
            await asyncio.sleep(1.0)
            streams.cut_overdue(time.monotonic())

    task = asyncio.create_task(sweep())
    yield
    await stop(task)


async def _health_poller(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    session = app[TRANSPORT].session
    assert session is not None
    metrics = services.metrics

    def observe(engine: Engine, replica: Replica) -> None:
        # A replica that is down has no batch or KV cache we can see: its last figures, kept
        # for ever, would hold the backlog and KV-cache alerts firing on a dead replica.
        up = bool(replica.healthy)
        load = replica.load
        metrics.engine_replica(
            engine=engine.name,
            replica=replica.url,
            healthy=up,
            running=load.running if up else 0.0,
            waiting=load.waiting if up else 0.0,
            kv_usage=load.kv_usage if up else 0.0,
        )
        state = replica.breaker.state
        if state == "open" and replica.breaker.available(time.monotonic()):
            state = "half_open"
        metrics.breaker_state(engine=engine.name, replica=replica.url, state=state)

    purges: set[asyncio.Task[None]] = set()

    def switched(engine: Engine, old: str | None, new: str) -> None:
        if old is None:
            return  # first resolution: the start-up resolution purges once all are known
        metrics.engine_version_changed(engine=engine.name)
        if all(e.version is not None for e in services.engines):
            # In the background: a purge scans the whole store, and polling must go on.
            purge = asyncio.create_task(_purge_unserved(services))
            purges.add(purge)
            purge.add_done_callback(purges.discard)

    health = services.settings.health
    watch = VersionWatch(
        session,
        services.engines,
        interval_s=health.version_interval_s,
        timeout_s=health.timeout_s,
        frozen=lambda engine: services.rollouts.rolling_out(engine.name),
        on_switch=switched,
        on_held_out=lambda engine, _: metrics.replica_held_out(engine=engine.name),
    )
    task = asyncio.create_task(
        poll_forever(
            session,
            services.rollouts.polled,  # stable and canary replica sets, kept current
            interval_s=health.interval_s,
            timeout_s=health.timeout_s,
            unhealthy_after=health.unhealthy_after,
            observe=observe,
            after=watch.check,
        )
    )
    yield
    await stop(task)
    for purge in list(purges):
        await stop(purge)


async def _policy_watcher(app: web.Application) -> AsyncIterator[None]:
    source = app[SERVICES].policies
    if not isinstance(source, PolicyStore):
        yield
        return
    task = asyncio.create_task(source.watch())
    yield
    await stop(task)


# -- errors -----------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses: OpenAI-shaped JSON with the right status."""
    try:
        return await handler(request)
    except InternalError as err:
        # The pipeline's own bugs arrive wrapped (carrying the request's id and headers).
        return _internal_error(request, err, err.__cause__ or err)
    except FrugalError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc))
    except Exception as exc:
        return _internal_error(request, InternalError(), exc)


def _internal_error(request: web.Request, err: InternalError, bug: BaseException) -> web.Response:
    if request.writer.output_size > 0:
        # Part of a response is out: no error response can follow it. The connection's handler
        # (proxy/protocol.py) logs the exception and aiohttp closes the connection.
        raise bug from None
    log.error(
        "unexpected error",
        method=request.method,
        path=request.path,
        request_id=err.headers.get("x-request-id"),
        exc_info=bug,
    )
    return error_response(err)


def error_response(err: FrugalError) -> web.Response:
    """``err`` as a response (also what aiohttp refuses below the app: proxy/protocol.py)."""
    response = web.Response(
        body=err.to_json(), status=err.status, content_type="application/json", headers=err.headers
    )
    if err.closes_connection:
        response.force_close()
    return response


def _from_http_exception(exc: web.HTTPException) -> FrugalError:
    if exc.status == 404:
        return NotFound(f"Unknown path. {exc.reason}.", code="not_found")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    error = InvalidRequest(f"{exc.reason}.", code=exc.reason.lower().replace(" ", "_"))
    error.status = exc.status
    if "Allow" in exc.headers:
        error.headers["Allow"] = exc.headers["Allow"]  # a 405 must name the allowed methods
    return error
