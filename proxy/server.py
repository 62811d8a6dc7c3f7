"""Running the proxy: event loop, logging, and the aiohttp server with client-disconnect
cancellation (so a client that leaves makes the engine stop generating)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from proxy import compiled_modules
from proxy.app import SERVICES, create_app
from proxy.cache.store import StoreInUse
from proxy.cli import DataDirError, ListenError
from proxy.observability.logging import configure_logging
from proxy.protocol import ProxyRunner
from proxy.services import Services
from proxy.settings import ServerSettings, Settings
from proxy.stopping import WAITS

log = structlog.get_logger("frugal.server")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def tune_gc() -> None:
    """Fewer, later garbage collections: the request path allocates many short-lived objects,
    and CPython's default (a young-generation pass every 700 allocations) cost about a fifth of
    the proxy's CPU per request in the overhead benchmark. Start-up objects (modules, config,
    models) are frozen out of every later pass."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def run_proxy(settings: Settings, *, port: int | None = None) -> None:
    configure_logging(json=settings.logging.format == "json", level=settings.logging.level)
    host, port = settings.server.host, settings.server.port if port is None else port
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(settings, host=host, port=port))


def check_data_dirs(settings: Settings) -> None:
    """Create the folders the proxy writes to, or raise :class:`DataDirError` saying which and
    why (before: a traceback from the cache's start-up, after the app had started)."""
    folders = [("data_dir", settings.resolved_data_dir())]
    if settings.cache.enabled and settings.cache.backend == "disk":
        if settings.cache.data_dir is not None:
            folders.append(("cache.data_dir", settings.cache.data_dir))
        else:
            folders.append(("data_dir", settings.resolved_data_dir() / "cache"))
    for field, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise DataDirError(field, folder, NotADirectoryError(errno.ENOTDIR, "")) from None
        except OSError as exc:
            raise DataDirError(field, folder, exc) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DataDirError(field, folder, PermissionError(errno.EACCES, "not writable"))


async def serve(settings: Settings, *, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM (after its drain, see :func:`drain`) or cancelled, then
    shut down cleanly."""
    check_data_dirs(settings)
    app = create_app(settings)
    # aiohttp waits its shutdown_timeout twice for a request in flight (for it to end, then
    # again after it is told to stop, which one waiting on an engine does not notice) before it
    # cancels it: with its 60 s default a stop took 2 minutes, past docker's and Kubernetes'
    # grace periods, and the SIGKILL then lost the cache's queued writes. Half each way keeps
    # the whole drain within server.shutdown_timeout_s. What aiohttp refuses below the app (a
    # malformed request line or header) is answered as OpenAI error JSON (proxy/protocol.py).
    runner = ProxyRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_s / WAITS,
        # Also how long a connection may take to send its first request's head: without it a
        # client that opens connections and never finishes a request holds each for an hour.
        keepalive_timeout=settings.server.keepalive_timeout_s,
    )
    try:
        await runner.setup()
    except StoreInUse as exc:
        await runner.cleanup()  # what started before the cache (health polling) stops
        field = "data_dir" if settings.cache.data_dir is None else "cache.data_dir"
        raise DataDirError(field, exc.directory, exc) from None
    tune_gc()
    # A backlog of 4096: benchmarks open 1,000 connections at once.
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()  # the app has started (health polling, cache writer): stop it
        raise ListenError(host, port, exc) from None
    port = runner.addresses[0][1]  # the one the system chose for port 0
    log.info(
        "frugal listening",
        url=f"http://{host}:{port}",
        engines=[e.name for e in settings.engines],
        compiled_modules=len(compiled_modules()),  # 0: plain Python (setup.py: FRUGAL_COMPILE)
    )
    # Each stop signal, in order: the first starts the stop, a second one cuts its drain short.
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Explicit handlers: a process started in the background ignores SIGINT by default, and
        # SIGTERM (docker stop, systemd) must drain and clean up too, not kill mid-write.
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        first = await signals.get()
        # SIGTERM is a supervisor's stop (Kubernetes, docker, systemd), which a load balancer
        # must see coming; SIGINT is a person at a terminal (Ctrl-C), who wants the stop now.
        if first == signal.SIGTERM:
            await drain(app[SERVICES], settings.server, signals)
        log.info("frugal stopping", signal=first.name)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


async def drain(
    services: Services, server: ServerSettings, signals: asyncio.Queue[signal.Signals]
) -> None:
    """The stop's first phase, for ``server.drain_delay_s``: the proxy still takes and serves
    requests while /readyz answers 503 ``draining``, so its load balancer takes it out of
    rotation before the listener closes (clients it sent here meanwhile were refused). Another
    signal ends it at once: whoever sent it wants the stop now."""
    if server.drain_delay_s <= 0:
        return
    services.draining = True
    log.info(
        "frugal draining: /readyz answers 503, requests are still served",
        delay_s=server.drain_delay_s,
        # the stop that follows, for whoever sizes the grace period of what sent the signal
        then_shutdown_timeout_s=server.shutdown_timeout_s,
    )
    try:
        async with asyncio.timeout(server.drain_delay_s):
            again = await signals.get()
    except TimeoutError:
        return
    log.info("frugal drain cut short", signal=again.name)
