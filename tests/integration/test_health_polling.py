"""Health polling: one missed poll does not take a serving replica out; a dead one goes; the
version watch that runs after each round."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from proxy.engines.autoversion import VersionWatch
from proxy.engines.breaker import CircuitBreaker
from proxy.engines.health import poll_replica
from proxy.engines.pool import Engine, Replica
from proxy.settings import EngineSettings
from tests.integration.conftest import StartFake, engine_config, wait_until


def _state(replica: Replica) -> bool | None:
    return replica.healthy  # read through a call: each poll changes it


async def _ok(_: web.Request) -> web.Response:
    return web.Response()


def _engine_app(state: dict[str, Any]) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        if state.get("slow"):
            await state["slow"].wait()  # busier than any poll's deadline, until released
        return web.Response(status=state["status"])

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 3\nvllm:num_requests_waiting 1\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def test_one_slow_poll_keeps_a_healthy_replica_in(aiohttp_server: Any) -> None:
    # A deadline a loaded machine's event-loop stalls cannot reach: only the slow polls miss it.
    timeout_s = 1.0
    state: dict[str, Any] = {"slow": None, "status": 200}
    server = await aiohttp_server(_engine_app(state))
    replica = Replica(url=str(server.make_url("")).rstrip("/"), breaker=CircuitBreaker(3, 5.0))
    async with aiohttp.ClientSession() as session:
        await poll_replica(session, replica, timeout_s, unhealthy_after=2)
        assert _state(replica) is True and replica.load.running == 3
        state["slow"] = asyncio.Event()  # busier than the poll's deadline, once
        try:
            await poll_replica(session, replica, timeout_s, unhealthy_after=2)
            assert _state(replica) is True
            await poll_replica(session, replica, timeout_s, unhealthy_after=2)  # twice: down
            assert _state(replica) is False
        finally:
            state["slow"].set()
        state["slow"] = None
        await poll_replica(session, replica, timeout_s, unhealthy_after=2)  # one good poll: back
        assert _state(replica) is True and replica.failed_polls == 0


async def test_a_replica_never_seen_healthy_is_down_at_once(aiohttp_server: Any) -> None:
    state: dict[str, Any] = {"slow": None, "status": 503}
    server = await aiohttp_server(_engine_app(state))
    replica = Replica(url=str(server.make_url("")).rstrip("/"), breaker=CircuitBreaker(3, 5.0))
    async with aiohttp.ClientSession() as session:
        await poll_replica(session, replica, 0.2, unhealthy_after=3)
    assert _state(replica) is False


async def test_the_version_watch_holds_an_odd_replica_out_and_switches_outside_rollouts(
    start_fake: StartFake,
) -> None:
    # The watch the proxy runs after each poll round, on its own; ``frozen``: a rollout is under
    # way for the engine, whose version is then the rollout's to change.
    fake = await start_fake("m")
    engine = Engine.from_settings(EngineSettings(name="e", model="m", urls=[fake.url]))
    replica = engine.replicas[0]
    replica.healthy = True
    frozen = False
    switches: list[tuple[str | None, str]] = []
    async with aiohttp.ClientSession() as session:
        watch = VersionWatch(
            session, [engine], interval_s=0.0, timeout_s=1.0, frozen=lambda _: frozen,
            on_switch=lambda _, old, new: switches.append((old, new)),
        )  # fmt: skip
        await watch.check()
        first = engine.version
        assert first is not None and replica.version == first and engine.ready
        assert switches == [(None, first)]
        fake.redeploy(root="/models/m-v2")
        frozen = True
        await watch.check()
        assert engine.version == first and replica.version != first
        assert not engine.ready  # held out: nothing serves the engine's version now
        frozen = False
        await watch.check()
        assert engine.version == replica.version != first and engine.ready
        assert switches[-1] == (first, engine.version)


async def test_the_proxy_reads_the_load_of_an_engine_whose_metrics_compress(
    aiohttp_server: Any, start_proxy: Any
) -> None:
    """vLLM's /metrics (prometheus_client) gzips its text when the request accepts gzip; the
    proxy's session does not decompress, so it must not accept it (a gzip body read as text
    raised out of the poll and ended the poller)."""
    text = b"vllm:num_requests_running 3\nvllm:num_requests_waiting 1\n"

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=text, content_type="text/plain", charset="utf-8")
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression(web.ContentCoding.gzip)
        return resp

    app = web.Application()
    app.router.add_get("/health", _ok)
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    p = await start_proxy([engine_config("e", "m", [url], version="v1")])
    replica = p.services.engines[0].replicas[0]
    await wait_until(lambda: replica.load.running == 3)
    assert replica.load.running == 3 and replica.load.waiting == 1


async def test_a_metrics_body_that_is_not_text_keeps_the_replica_healthy(
    aiohttp_server: Any,
) -> None:
    """/metrics says nothing about health: a body that does not decode (bytes from a broken
    exporter, or a gateway's compression) keeps the last load and does not end the poll."""

    async def metrics(_: web.Request) -> web.Response:
        body = b"\x1f\x8b\x08\x00 not text \xff"
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/health", _ok)
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    replica = Replica(url=str(server.make_url("")).rstrip("/"), breaker=CircuitBreaker(3, 5.0))
    async with aiohttp.ClientSession() as session:
        await poll_replica(session, replica, 5.0)
    assert _state(replica) is True and replica.failed_polls == 0


async def test_a_models_answer_that_is_not_an_object_does_not_end_the_poller(
    aiohttp_server: Any, start_proxy: Any
) -> None:
    """A version: auto replica whose /v1/models is some other JSON (a URL that reaches another
    service) has no version; health polling goes on for it and every other replica."""
    state = {"status": 200}

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=state["status"])

    async def models(_: web.Request) -> web.Response:
        return web.json_response(["not", "a", "models", "list"])

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", _ok)
    app.router.add_get("/v1/models", models)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    p = await start_proxy([engine_config("e", "m", [url], version="auto")])
    replica = p.services.engines[0].replicas[0]
    await wait_until(lambda: replica.version_at is not None)  # asked, at least once
    state["status"] = 503
    await wait_until(lambda: replica.healthy is False)
    assert replica.healthy is False and replica.version is None
