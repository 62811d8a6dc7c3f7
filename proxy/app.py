"""``create_app(settings)``: the only place that wires the proxy together.

State lives on the application under ``web.AppKey``s; every resource with a lifetime (the HTTP
client session, the health poller, version discovery) is an async generator in ``cleanup_ctx``,
so a test builds a fresh, independent app and tears it down completely.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web

from proxy import handlers
from proxy.engines.client import AiohttpTransport, EngineCaller, Transport
from proxy.engines.health import poll_forever
from proxy.engines.pool import Engine, Replica
from proxy.engines.version import resolve_version
from proxy.errors import FrugalError, InvalidRequest, NotFound, PayloadTooLarge
from proxy.observability.dashboard import dashboard_routes
from proxy.observability.metrics import Metrics
from proxy.services import Services
from proxy.settings import Settings

SERVICES = web.AppKey("services", Services)
TRANSPORT = web.AppKey("transport", AiohttpTransport)

log = structlog.get_logger("frugal.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: Settings,
    *,
    transport: Transport | None = None,
    metrics: Metrics | None = None,
    access_log: bool = True,
) -> web.Application:
    """Build the proxy. ``transport`` replaces the HTTP client (tests pass a function)."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.server.max_body_bytes + 1,
    )
    metrics = metrics or Metrics()
    engines = [Engine.from_settings(e) for e in settings.engines]
    http_transport = AiohttpTransport()
    caller = EngineCaller(
        transport or http_transport,
        on_retry=lambda engine, reason: metrics.upstream_retry(engine=engine.name, reason=reason),
    )
    services = Services(
        settings=settings, engines=engines, metrics=metrics, caller=caller, access_log=access_log
    )
    app[SERVICES] = services
    app[TRANSPORT] = http_transport

    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_engine_versions)
    app.cleanup_ctx.append(_health_poller)
    handlers.add_routes(app, services)
    app.add_routes(dashboard_routes(metrics.snapshot))
    return app


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    # Unlimited pool: the engines' own batching is the limit, and admission control (policy) caps
    # what reaches them; a small client pool would queue requests invisibly here.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    app[TRANSPORT].session = session
    yield
    await session.close()


async def _engine_versions(app: web.Application) -> AsyncIterator[None]:
    """Resolve ``version: auto`` from the engines; keep trying in the background until each
    answers (an engine may still be loading its weights when the proxy starts)."""
    services = app[SERVICES]
    session = app[TRANSPORT].session
    pending = [e for e in services.engines if e.version is None]
    task = None
    if pending and session is not None:
        task = asyncio.create_task(_resolve_versions(session, pending))
        # Give a running engine a moment so the first requests already carry a version.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=2.0)
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _resolve_versions(session: aiohttp.ClientSession, engines: list[Engine]) -> None:
    delay = 0.5
    while engines:
        for engine in list(engines):
            for replica in engine.replicas:
                try:
                    engine.version = await resolve_version(
                        session,
                        replica.url,
                        engine.model,
                        model_dir=engine.settings.model_dir,
                        headers=_auth(engine),
                    )
                except (aiohttp.ClientError, OSError, TimeoutError, LookupError, ValueError):
                    continue
                log.info("engine version", engine=engine.name, version=engine.version)
                engines.remove(engine)
                break
        if engines:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _auth(engine: Engine) -> dict[str, str] | None:
    return (
        {"Authorization": f"Bearer {engine.settings.api_key}"} if engine.settings.api_key else None
    )


async def _health_poller(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    session = app[TRANSPORT].session
    assert session is not None
    metrics = services.metrics

    def observe(engine: Engine, replica: Replica) -> None:
        metrics.engine_replica(
            engine=engine.name,
            replica=replica.url,
            healthy=bool(replica.healthy),
            running=replica.load.running,
            waiting=replica.load.waiting,
            kv_usage=replica.load.kv_usage,
        )
        state = replica.breaker.state
        if state == "open" and replica.breaker.available(time.monotonic()):
            state = "half_open"
        metrics.breaker_state(engine=engine.name, replica=replica.url, state=state)

    health = services.settings.health
    task = asyncio.create_task(
        poll_forever(
            session,
            services.engines,
            interval_s=health.interval_s,
            timeout_s=health.timeout_s,
            observe=observe,
        )
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses: OpenAI-shaped JSON with the right status."""
    try:
        return await handler(request)
    except FrugalError as err:
        return _error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(_from_http_exception(exc))


def _error_response(err: FrugalError) -> web.Response:
    return web.Response(
        body=err.to_json(), status=err.status, content_type="application/json", headers=err.headers
    )


def _from_http_exception(exc: web.HTTPException) -> FrugalError:
    if exc.status == 404:
        return NotFound(f"Unknown path. {exc.reason}.", code="not_found")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    error = InvalidRequest(f"{exc.reason}.", code=exc.reason.lower().replace(" ", "_"))
    error.status = exc.status
    return error
