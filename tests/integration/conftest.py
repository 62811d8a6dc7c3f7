"""Fixtures: fake engines as real in-process HTTP servers, and a proxy in front of them."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from proxy.app import SERVICES, create_app
from proxy.engines.fake import (
    FAKE_STATE,
    FakeEngineOptions,
    FakeEngineState,
    create_fake_engine_app,
)
from proxy.protocol import ProxyRunner
from proxy.services import Services
from proxy.settings import Settings


@dataclass
class FakeEngine:
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def state(self) -> FakeEngineState:
        return self.server.app[FAKE_STATE]

    def configure(self, **overrides: Any) -> None:
        from proxy.engines.fake import apply_overrides

        self.state.reconfigure(apply_overrides(self.state.options, overrides))

    def redeploy(self, **identity: Any) -> None:
        """Change what it reports serving (``root``, ``max_model_len``): a redeploy in place."""
        self.state.reconfigure(dataclasses.replace(self.state.options, **identity))


StartFake = Callable[..., Awaitable[FakeEngine]]


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 5.0, step_s: float = 0.05
) -> None:
    """Poll ``check`` (sync or async) until it holds or the time is up; the caller asserts."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(step_s)


@pytest.fixture
async def start_fake(aiohttp_server: Any) -> StartFake:
    async def start(model: str = "small-model", **options: Any) -> FakeEngine:
        app = create_fake_engine_app(FakeEngineOptions(model=model, **options))
        return FakeEngine(await aiohttp_server(app))

    return start


def engine_config(name: str, model: str, urls: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": model,
        "urls": urls,
        "cost": {"input_per_mtok": 0.1, "output_per_mtok": 0.2},
        **extra,
    }


class ProxyServer(TestServer):
    """The app served through the proxy's own runner, as ``frugal serve`` serves it: what
    aiohttp refuses below the app is answered as OpenAI error JSON (proxy/protocol.py)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ProxyRunner(self.app, **kwargs)


@dataclass
class Proxy:
    client: TestClient[web.Request, web.Application]

    @property
    def services(self) -> Services:
        app = self.client.server.app
        assert app is not None
        return app[SERVICES]


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(aiohttp_client: Any, tmp_path: Any) -> StartProxy:
    async def start(engines: list[dict[str, Any]], **sections: Any) -> Proxy:
        raw: dict[str, Any] = {
            "engines": engines,
            "health": {"interval_s": 0.1, "timeout_s": 1.0},
            "policies": None,
            "data_dir": str(tmp_path / "data"),
            "logging": {"format": "console", "level": "warning"},
        }
        raw["cache"] = {"enabled": False}
        raw["embeddings"] = {"enabled": False}
        raw.update(sections)
        settings = Settings.model_validate(raw)
        client = await aiohttp_client(ProxyServer(create_app(settings, access_log=False)))
        return Proxy(client)

    return start
