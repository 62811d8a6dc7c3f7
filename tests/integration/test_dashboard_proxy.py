"""The dashboard of a real proxy, in a real browser, while traffic flows through the proxy.

Fake engines behind the full request path (policies open, cache with a stand-in embedder,
difficulty routing by threshold); requests go through the proxy over HTTP; headless Chromium
loads ``/dashboard`` from the same server and must show exactly that traffic. A screenshot lands
in ``tests/_output/dashboard_proxy_1280.png``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy.app import SERVICES, create_app
from proxy.settings import Settings
from tests.integration.conftest import StartFake, engine_config
from tests.integration.test_cache_pipeline import bag_of_words
from tests.integration.test_dashboard import CHROMIUM, OUTPUT, READ_PAGE, HeadlessChromium

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]

QUESTIONS = ["capital of France", "boiling point of water", "tallest mountain on earth"]


async def test_dashboard_shows_the_proxys_own_traffic(
    start_fake: StartFake, aiohttp_server: Any, tmp_path: Path
) -> None:
    small = await start_fake("small-model")
    large = await start_fake("large-model")
    settings = Settings.model_validate(
        {
            "engines": [
                engine_config("small", "small-model", [small.url]),
                {
                    **engine_config("large", "large-model", [large.url]),
                    "cost": {"input_per_mtok": 1.0, "output_per_mtok": 3.0},
                },
            ],
            "policies": None,
            "data_dir": str(tmp_path / "data"),
            "cache": {"enabled": True, "semantic": True},
            "routing": {"threshold": 0.0},
            "health": {"interval_s": 0.2},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    server = await aiohttp_server(create_app(settings, encode=bag_of_words, access_log=False))
    base = str(server.make_url("")).rstrip("/")
    services = server.app[SERVICES]
    sent = 0
    import aiohttp

    async with aiohttp.ClientSession() as session, HeadlessChromium() as browser:

        async def send(model: str, question: str) -> None:
            nonlocal sent
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "temperature": 0,
                "max_tokens": 8,
            }
            async with session.post(base + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
            sent += 1

        page = await browser.open(base + "/dashboard")
        for round_ in range(4):
            for question in QUESTIONS:
                await send("small-model", question)  # misses, then exact hits
                await send("auto", f"{question} please, round {round_}")  # routed
            assert services.cache is not None
            await services.cache.drain()
            await asyncio.sleep(0.3)
        polls = await page.evaluate("Number(document.body.dataset.polls || 0)")
        await page.wait_for(f"Number(document.body.dataset.polls) >= {polls + 2}")
        shown = await page.evaluate(READ_PAGE)
        await page.screenshot(OUTPUT / "dashboard_proxy_1280.png", width=1280)
        await page.screenshot(OUTPUT / "dashboard_proxy_390.png", width=390, mobile=True)

    snap = services.metrics.snapshot()
    assert shown["status"] == "live"
    assert shown["requestsTotal"] == sent == snap["requests"]["total"]
    hits = sum(n for k, n in snap["requests"]["by_cache"].items() if k.startswith("hit"))
    assert hits >= 9  # the three questions repeated three more times
    assert shown["cacheHitShare"] == pytest.approx(hits / sent)
    # Threshold 0: every routed request went to the large engine; explicit ones to the small.
    assert shown["routes"] == snap["routes"]["by_engine"]
    assert set(shown["routes"]) == {"small", "large"}
    assert shown["engines"]["small"]["healthy"] == 1
    assert shown["tiers"]["open"]["requests"] == sent
