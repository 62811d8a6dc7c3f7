"""Health polling: one missed poll does not take a serving replica out; a dead one goes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from proxy.engines.breaker import CircuitBreaker
from proxy.engines.health import poll_replica
from proxy.engines.pool import Replica


def _state(replica: Replica) -> bool | None:
    return replica.healthy  # read through a call: each poll changes it


def _engine_app(state: dict[str, Any]) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        await asyncio.sleep(state["delay_s"])
        return web.Response(status=state["status"])

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 3\nvllm:num_requests_waiting 1\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def test_one_slow_poll_keeps_a_healthy_replica_in(aiohttp_server: Any) -> None:
    state: dict[str, Any] = {"delay_s": 0.0, "status": 200}
    server = await aiohttp_server(_engine_app(state))
    replica = Replica(url=str(server.make_url("")).rstrip("/"), breaker=CircuitBreaker(3, 5.0))
    async with aiohttp.ClientSession() as session:
        await poll_replica(session, replica, 0.2, unhealthy_after=2)
        assert _state(replica) is True and replica.load.running == 3
        state["delay_s"] = 0.5  # busier than the poll's deadline, once
        await poll_replica(session, replica, 0.2, unhealthy_after=2)
        assert _state(replica) is True
        await poll_replica(session, replica, 0.2, unhealthy_after=2)  # twice in a row: down
        assert _state(replica) is False
        state["delay_s"] = 0.0
        await poll_replica(session, replica, 0.2, unhealthy_after=2)  # one good poll: back
        assert _state(replica) is True and replica.failed_polls == 0


async def test_a_replica_never_seen_healthy_is_down_at_once(aiohttp_server: Any) -> None:
    state: dict[str, Any] = {"delay_s": 0.0, "status": 503}
    server = await aiohttp_server(_engine_app(state))
    replica = Replica(url=str(server.make_url("")).rstrip("/"), breaker=CircuitBreaker(3, 5.0))
    async with aiohttp.ClientSession() as session:
        await poll_replica(session, replica, 0.2, unhealthy_after=3)
    assert _state(replica) is False
