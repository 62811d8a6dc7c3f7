"""The dashboard in a real browser: headless Chromium over the DevTools protocol.

An aiohttp test server serves the dashboard routes over a ``Metrics`` object that a background
task feeds with synthetic traffic. The page must show that traffic: every number it draws is also
written into the DOM (text and ``data-*`` attributes), which the test reads back and compares with
the snapshot. Screenshots (1280 px and a 390 px phone) land in ``tests/_output/``.

``HeadlessChromium`` is reusable: ``async with HeadlessChromium() as browser: page = await
browser.open(url)``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from aiohttp.test_utils import TestServer

from proxy.observability.dashboard import dashboard_routes
from proxy.observability.metrics import Metrics

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parents[1] / "_output"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]


class CdpError(RuntimeError):
    pass


class Page:
    """One browser tab driven over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self._ws.receive_json(timeout=60)
            if message.get("id") != call_id:
                continue  # an event or an older reply
            if "error" in message:
                raise CdpError(f"{method}: {message['error']}")
            result: dict[str, Any] = message["result"]
            return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout_s: float = 60.0) -> Any:
        """Poll a JS expression until it is truthy (condition polling, not a timing check)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.2)

    async def set_viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )

    async def screenshot(self, path: Path, *, width: int, mobile: bool = False) -> None:
        """A full-page PNG at the given CSS width."""
        await self.set_viewport(width, 900, mobile=mobile)
        await asyncio.sleep(0.3)  # let the page's debounced resize handler redraw the canvases
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.set_viewport(width, height, mobile=mobile)
        await asyncio.sleep(0.3)
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_write_bytes, path, base64.b64decode(shot["data"]))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class HeadlessChromium:
    """Debian's chromium, headless, on a private profile, with the DevTools port on a free port."""

    def __init__(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="frugal-chromium-")
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0

    async def __aenter__(self) -> HeadlessChromium:
        self._process = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self._profile.name}",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._process.stderr is not None
        while True:
            line = await asyncio.wait_for(self._process.stderr.readline(), timeout=60)
            if not line:
                raise RuntimeError("chromium exited before opening its DevTools port")
            found = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                self._port = int(found.group(1))
                break
        # Keep draining stderr so chromium never blocks on a full pipe.
        self._drain = asyncio.create_task(self._drain_stderr())
        self._session = aiohttp.ClientSession()
        return self

    async def _drain_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        while await self._process.stderr.readline():
            pass

    async def open(self, url: str) -> Page:
        assert self._session is not None
        async with self._session.get(f"http://127.0.0.1:{self._port}/json/list") as response:
            targets = await response.json()
        target = next(t for t in targets if t.get("type") == "page")
        ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        await page.send("Page.enable")
        await page.set_viewport(1280, 900)
        await page.send("Page.navigate", url=url)
        return page

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), timeout=10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain
        self._profile.cleanup()


# ---- synthetic traffic ---------------------------------------------------------------------

TIERS = ("free", "pro")
CACHE_OUTCOMES = ("miss", "miss", "hit_exact", "hit_semantic")


def feed_one(metrics: Metrics, i: int) -> None:
    """One synthetic request with its cache lookups and routing decision."""
    tier = TIERS[i % 2]
    engine = "large" if i % 5 == 0 else "small"
    cache = CACHE_OUTCOMES[i % 4]
    # failures, and clients that leave or are refused: only the failures are errors
    status = 502 if i % 17 == 0 else 499 if i % 7 == 0 else 429 if i % 11 == 0 else 200
    metrics.route_decision(
        tier=tier, engine=engine, reason="score_above" if engine == "large" else "score_below"
    )
    metrics.cache_lookup(kind="exact", scope=tier, hit=cache == "hit_exact")
    if cache != "hit_exact":
        metrics.cache_lookup(
            kind="semantic", scope=tier, hit=cache == "hit_semantic", similarity=0.95
        )
    hit = cache.startswith("hit")
    metrics.request_done(
        tier=tier,
        model=f"{engine}-v1",
        engine=engine,
        status=status,
        cache=cache,
        latency_s=0.004 if hit else 0.2 + (i % 10) * 0.05,
        ttft_s=0.002 if hit else 0.05,
        overhead_s=0.0001,
        tokens_in=20,
        tokens_out=0 if status != 200 else 50,
        cost_usd=0.0 if hit or status != 200 else (0.002 if engine == "large" else 0.0002),
        saved_cache_usd=0.002 if hit else 0.0,
        saved_routing_usd=0.0018 if engine == "small" and not hit else 0.0,
        stream=i % 3 == 0,
    )


def feed_engines(metrics: Metrics, i: int) -> None:
    metrics.engine_replica(
        engine="small", replica="r0", healthy=True, running=3 + i % 4, waiting=i % 2, kv_usage=0.35
    )
    metrics.engine_replica(
        engine="small",
        replica="http://127.0.0.1:8001",
        healthy=True,
        running=2,
        waiting=0,
        kv_usage=0.2,
    )
    metrics.engine_replica(
        engine="large", replica="r0", healthy=False, running=0, waiting=0, kv_usage=0.0
    )
    metrics.breaker_state(engine="small", replica="r0", state="closed")
    metrics.breaker_state(engine="small", replica="http://127.0.0.1:8001", state="closed")
    metrics.breaker_state(engine="large", replica="r0", state="open")
    metrics.queue_length(engine="large", length=2)
    metrics.budget_spent(tier="free", usd=0.6)
    metrics.budget_limit(tier="free", usd=1.0)


async def feed_traffic(metrics: Metrics, stop: asyncio.Event) -> int:
    """About 40 requests a second until told to stop; returns how many were fed."""
    fed = 0
    while not stop.is_set():
        for _ in range(2):
            feed_one(metrics, fed)
            fed += 1
        feed_engines(metrics, fed)
        await asyncio.sleep(0.05)
    return fed


@pytest.fixture
async def dashboard_url(
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[tuple[str, Metrics]]:
    metrics = Metrics()
    app = web.Application()
    app.add_routes(dashboard_routes(metrics.snapshot))
    server: TestServer = await aiohttp_server(app)
    yield str(server.make_url("/dashboard")), metrics


READ_PAGE = """(() => {
  const metric = (name) => document.querySelector(`[data-metric="${name}"]`).dataset.value;
  const canvas = (id) => ({...document.getElementById(id).dataset});
  return {
    polls: Number(document.body.dataset.polls || 0),
    status: document.getElementById("status").dataset.state,
    throughput: Number(metric("throughput_rps")),
    requestsTotal: Number(metric("requests_total")),
    errorShare: Number(metric("error_rate")),
    cacheHitShare: Number(metric("cache_hit_rate")),
    saved: Number(metric("saved_usd")),
    cost: Number(metric("cost_usd")),
    p95: Number(metric("latency_p95_s")),
    throughputChart: canvas("chart-throughput"),
    latencyChart: canvas("chart-latency"),
    cache: Object.fromEntries([...document.querySelectorAll("#cache-bars [data-kind]")]
      .map((n) => [n.dataset.kind, Number(n.dataset.hitRate)])),
    routes: Object.fromEntries([...document.querySelectorAll("#route-legend [data-engine]")]
      .map((n) => [n.dataset.engine, Number(n.dataset.count)])),
    engines: Object.fromEntries([...document.querySelectorAll("#engines [data-engine]")]
      .map((n) => [n.dataset.engine, {running: Number(n.dataset.running),
        waiting: Number(n.dataset.waiting), healthy: Number(n.dataset.healthyReplicas),
        breakers: [...n.querySelectorAll("[data-replica]")].map((r) => r.dataset.breaker)}])),
    tiers: Object.fromEntries([...document.querySelectorAll("#tiers-table [data-tier]")]
      .map((n) => [n.dataset.tier, {requests: Number(n.dataset.requests),
        cost: Number(n.dataset.cost), savedCache: Number(n.dataset.savedCache),
        savedRouting: Number(n.dataset.savedRouting)}])),
    outcomes: Object.fromEntries([...document.querySelectorAll("#outcomes-table [data-outcome]")]
      .map((n) => [n.dataset.outcome, Number(n.dataset.count)])),
    latencyCells: [...document.querySelectorAll("#latency-table td")].map((c) => c.textContent),
    overflowX: document.documentElement.scrollWidth - window.innerWidth,
    // Content poking out of its panel (scrolling table wrappers excepted): a layout bug.
    spills: [...document.querySelectorAll(".panel, .kpi")].flatMap((panel) => {
      const edge = panel.getBoundingClientRect().right + 0.5;
      return [...panel.querySelectorAll("*")]
        .filter((n) => !n.closest(".table-wrap") && n.getBoundingClientRect().right > edge)
        .map((n) => `${n.tagName}.${n.className}`);
    }),
  };
})()"""


async def test_dashboard_shows_live_traffic(dashboard_url: tuple[str, Metrics]) -> None:
    url, metrics = dashboard_url
    stop = asyncio.Event()
    feeder = asyncio.create_task(feed_traffic(metrics, stop))
    try:
        async with HeadlessChromium() as browser:
            page = await browser.open(url)
            # Rates need two polls; wait for a third so the throughput chart has a line.
            await page.wait_for("document.body && Number(document.body.dataset.polls || 0) >= 3")
            live = await page.evaluate(READ_PAGE)
            assert live["status"] == "live"
            assert live["throughput"] > 0
            assert float(live["throughputChart"]["lastRps"]) > 0
            assert float(live["throughputChart"]["lastHitRps"]) > 0
            assert int(live["throughputChart"]["points"]) >= 3
            assert live["p95"] > 0
            assert float(live["latencyChart"]["lastP99"]) >= float(live["latencyChart"]["lastP50"])

            # Screenshots while traffic still flows, so the charts have lines worth looking at.
            await page.wait_for(f"Number(document.body.dataset.polls) >= {live['polls'] + 3}")
            await page.screenshot(OUTPUT / "dashboard_390.png", width=390, mobile=True)
            phone = await page.evaluate(READ_PAGE)
            assert phone["overflowX"] <= 0, "the page scrolls sideways at 390 px"
            assert phone["spills"] == [], "content spills out of its panel at 390 px"
            await page.screenshot(OUTPUT / "dashboard_1280.png", width=1280)

            stop.set()
            fed = await feeder
            polls = await page.evaluate("Number(document.body.dataset.polls)")
            await page.wait_for(f"Number(document.body.dataset.polls) >= {polls + 2}")
            settled = await page.evaluate(READ_PAGE)
            snap = metrics.snapshot()

            assert settled["requestsTotal"] == fed == snap["requests"]["total"]
            hits = sum(n for k, n in snap["requests"]["by_cache"].items() if k.startswith("hit"))
            assert settled["cacheHitShare"] == pytest.approx(hits / fed)
            assert settled["cache"] == pytest.approx(
                {kind: row["hit_rate"] for kind, row in snap["cache"].items()}
            )
            assert settled["routes"] == snap["routes"]["by_engine"]
            assert set(settled["routes"]) == {"small", "large"}
            for name, engine in snap["engines"].items():
                shown = settled["engines"][name]
                assert (shown["running"], shown["waiting"], shown["healthy"]) == (
                    engine["running"],
                    engine["waiting"],
                    engine["healthy_replicas"],
                )
            assert settled["engines"]["large"]["breakers"] == ["open"]
            for name, tier in snap["tiers"].items():
                assert settled["tiers"][name] == pytest.approx(
                    {
                        "requests": tier["requests"],
                        "cost": tier["cost_usd"],
                        "savedCache": tier["saved_cache_usd"],
                        "savedRouting": tier["saved_routing_usd"],
                    }
                )
            assert settled["saved"] == pytest.approx(
                snap["totals"]["saved_cache_usd"] + snap["totals"]["saved_routing_usd"]
            )
            errors = sum(n for k, n in snap["requests"]["by_status"].items() if k.startswith("5"))
            assert snap["requests"]["by_status"]["499"] > 0
            assert snap["requests"]["errors"] == errors > 0
            assert settled["errorShare"] == pytest.approx(errors / fed)
            assert settled["outcomes"] == {
                **snap["requests"]["by_cache"],
                "errors (HTTP 5xx)": errors,
            }
            # The request and first-token rows are filled (the page shows an en dash for "none").
            assert "\u2013" not in settled["latencyCells"][:6]
            dom = await page.evaluate("document.documentElement.outerHTML")
            await asyncio.to_thread(_write_bytes, OUTPUT / "dashboard.html", dom.encode())
    finally:
        stop.set()
        await feeder


async def test_dashboard_data_and_assets_are_served(
    dashboard_url: tuple[str, Metrics],
) -> None:
    url, metrics = dashboard_url
    feed_one(metrics, 1)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            page = await response.text()
        assert "/dashboard/static/dashboard.js" in page and "__PREFIX__" not in page
        async with session.get(url + "/data") as response:
            assert response.headers["Content-Type"].startswith("application/json")
            assert (await response.json())["requests"]["total"] == 1
        for name in ("dashboard.js", "dashboard.css"):
            async with session.get(f"{url}/static/{name}") as response:
                assert response.status == 200
        async with session.get(f"{url}/static/../metrics.py") as response:
            assert response.status == 404
        # The page fetches nothing from outside the server.
        assert not re.search(r"(src|href)=\"https?://", page)


async def test_dashboard_works_under_another_prefix(aiohttp_server: AiohttpServer) -> None:
    metrics = Metrics()
    app = web.Application()
    app.add_routes(dashboard_routes(metrics.snapshot, prefix="/ops/board"))
    server: TestServer = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/ops/board")) as response:
            page = await response.text()
        assert 'href="/ops/board/static/dashboard.css"' in page
        assert 'data-data-url="/ops/board/data"' in page
        async with session.get(server.make_url("/ops/board/data")) as response:
            assert (await response.json())["requests"]["total"] == 0
        async with session.get(server.make_url("/dashboard")) as response:
            assert response.status == 404
