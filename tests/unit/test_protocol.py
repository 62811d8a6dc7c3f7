"""ProxyRunner's connection handler, and what it does on an aiohttp whose internals differ."""

from __future__ import annotations

import pytest
import structlog
from aiohttp import web

from proxy import protocol


async def test_the_runner_serves_through_the_proxys_handler() -> None:
    runner = protocol.ProxyRunner(web.Application())
    await runner.setup()
    try:
        assert runner.server is not None
        assert isinstance(runner.server(), protocol.ProxyRequestHandler)
    finally:
        await runner.cleanup()


async def test_another_aiohttps_internals_leave_its_own_server_and_say_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def moved(made: web.Server) -> web.Server:
        raise AttributeError("'Server' object has no attribute '_kwargs'")

    monkeypatch.setattr(protocol, "_Server", moved)
    runner = protocol.ProxyRunner(web.Application())
    with structlog.testing.capture_logs() as logs:
        await runner.setup()
    try:
        assert runner.server is not None  # it serves (before the fallback: setup raised)
        assert not isinstance(runner.server(), protocol.ProxyRequestHandler)
        assert [e["log_level"] for e in logs] == ["warning"]
    finally:
        await runner.cleanup()
