"""The semantic lookup beside the engine call (``cache.lookup_beside_engine``), with a tier's
budget and the engine's admission queue: a hit found by meaning is served whenever it would have
been with the lookup before the engine call. (The overlap itself: test_cache_pipeline.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.app import SERVICES, create_app
from proxy.services import Services
from proxy.settings import Settings
from tests.integration.conftest import FakeEngine, StartFake, engine_config, wait_until
from tests.integration.test_cache_pipeline import bag_of_words
from tests.integration.test_policy_pipeline import FREE_KEY, auth, tier, write_policies

QUESTION = "largest lakes of Europe"
PARAPHRASE = "Europe: largest lakes of?"


async def start(
    aiohttp_client: Any,
    tmp_path: Path,
    engine: FakeEngine,
    *,
    max_concurrency: int | None = None,
    **policy: Any,
) -> tuple[TestClient[Any, Any], Services]:
    folder = write_policies(
        tmp_path / "policies",
        tier("free", [FREE_KEY], models=["m"], **{"cache": {"scope": "tier"}, **policy}),
    )
    settings = Settings.model_validate(
        {
            "engines": [engine_config("e", "m", [engine.url], max_concurrency=max_concurrency)],
            "policies": str(folder),
            "data_dir": str(tmp_path / "data"),
            "health": {"interval_s": 0.1},
            "cache": {"enabled": True, "semantic": True},
            "routing": {"enabled": False},
            "embeddings": {"max_queue_ms": None},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    client = await aiohttp_client(create_app(settings, encode=bag_of_words, access_log=False))
    assert client.server.app is not None
    services = client.server.app[SERVICES]
    assert services.settings.cache.lookup_beside_engine  # the default
    return client, services


def ask(text: str) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 64,
        "temperature": 0,
    }


async def post(client: TestClient[Any, Any], text: str) -> Any:
    return await client.post("/v1/chat/completions", json=ask(text), headers=auth(FREE_KEY))


async def test_a_tier_out_of_budget_is_still_served_its_hits_found_by_meaning(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    # The worst case (about 30 prompt tokens at $0.1/Mtok, 64 out at $0.2/Mtok: $1.6e-5) fits
    # once into $2e-5; after the first answer it no longer does.
    engine = await start_fake("m")
    client, services = await start(
        aiohttp_client, tmp_path, engine, budget={"usd_per_day": 0.00002}
    )
    assert (await post(client, QUESTION)).headers["x-frugal-cache"] == "miss"
    assert services.cache is not None
    await services.cache.drain()
    refused = await post(client, "an unrelated question about rivers")
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "insufficient_quota"
    # (before: the engine call, sent beside the lookup, was refused first: a 429 for a hit)
    hit = await post(client, PARAPHRASE)
    assert hit.status == 200, await hit.text()
    assert hit.headers["x-frugal-cache"] == "hit-semantic"
    assert engine.state.counters.requests == 1


async def test_a_hit_is_not_held_behind_the_engines_queue(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    client, services = await start(
        aiohttp_client, tmp_path, engine, max_concurrency=1, queue={"max_wait_ms": 60_000}
    )
    assert (await post(client, QUESTION)).headers["x-frugal-cache"] == "miss"
    assert services.cache is not None
    await services.cache.drain()
    engine.configure(hang=True)
    stuck = asyncio.create_task(post(client, "an unrelated question about rivers"))
    await wait_until(lambda: services.admissions["e"].active == 1)  # it holds the one slot
    assert services.admissions["e"].active == 1
    # The paraphrase is looked up first, not queued for the slot (for up to 60 s) beside it.
    hit = await asyncio.wait_for(post(client, PARAPHRASE), 10)
    assert hit.headers["x-frugal-cache"] == "hit-semantic"
    assert services.admissions["e"].waiting == 0
    stuck.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stuck
