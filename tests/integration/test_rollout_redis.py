"""Two proxy replicas sharing rollout state through Redis: a promotion made on one is applied by
the other, and a fresh replica starts with it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import StartFake, StartProxy, wait_until
from tests.integration.test_rollout import ask, canary_engine, conversation

if TYPE_CHECKING:
    from tests.conftest_redis import RedisServer

pytest_plugins = ["tests.conftest_redis"]
pytestmark = pytest.mark.redis


async def test_a_promotion_reaches_every_replica(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> None:
    stable = await start_fake("m")
    canary = await start_fake("m-canary")
    engines = [canary_engine(stable, canary, 0.5)]
    redis = {"url": redis_server.url}
    first = await start_proxy(engines, redis=redis, data_dir=str(tmp_path / "a"))
    second = await start_proxy(engines, redis=redis, data_dir=str(tmp_path / "b"))
    assert (await first.client.post("/admin/rollout/small/promote")).status == 200
    other = second.services.rollouts.by_name["small"]
    await wait_until(lambda: other.state.status == "promoted", timeout_s=10)
    assert other.engine.version == "v2"
    for i in range(20):
        assert (await ask(second, conversation(i)))[:2] == (200, "v2")
    # A third replica, on an empty data directory, starts from Redis.
    third = await start_proxy(engines, redis=redis, data_dir=str(tmp_path / "c"))
    status = await (await third.client.get("/admin/rollout/small")).json()
    assert (status["status"], status["stable_version"]) == ("promoted", "v2")
