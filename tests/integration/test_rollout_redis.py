"""Two proxy replicas sharing rollout state through Redis: a promotion made on one is applied by
the other, and a fresh replica starts with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.conftest import StartFake, StartProxy, wait_until
from tests.integration.test_rollout import ask, canary_engine, conversation

if TYPE_CHECKING:
    from tests.conftest_redis import RedisServer

pytest_plugins = ["tests.conftest_redis"]
pytestmark = pytest.mark.redis


async def _fleet(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> Callable[[str], Awaitable[Any]]:
    """A maker of proxy replicas sharing one Redis (each on its own data folder ``name``), with
    engine ``small`` and a canary at half share."""
    stable = await start_fake("m")
    canary = await start_fake("m-canary")
    engines = [canary_engine(stable, canary, 0.5)]

    async def replica(name: str) -> Any:
        return await start_proxy(
            engines, redis={"url": redis_server.url}, data_dir=str(tmp_path / name)
        )

    return replica


async def test_a_promotion_reaches_every_replica(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> None:
    replica = await _fleet(start_fake, start_proxy, tmp_path, redis_server)
    first, second = await replica("a"), await replica("b")
    assert (await first.client.post("/admin/rollout/small/promote")).status == 200
    other = second.services.rollouts.by_name["small"]
    await wait_until(lambda: other.state.status == "promoted", timeout_s=10)
    assert other.engine.version == "v2"
    for i in range(20):
        assert (await ask(second, conversation(i)))[:2] == (200, "v2")
    # A third replica, on an empty data directory, starts from Redis.
    third = await replica("c")
    status = await (await third.client.get("/admin/rollout/small")).json()
    assert (status["status"], status["stable_version"]) == ("promoted", "v2")


async def test_two_changes_at_once_end_with_one_state_on_every_replica(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> None:
    # Two admins act on two replicas at the same moment: one promotes, the other rolls back,
    # and the earlier change's write reaches Redis last. The later change wins (documented),
    # and every replica must end up with it, not each keep its own.
    from proxy.rollout.store import RedisStateStore

    replica = await _fleet(start_fake, start_proxy, tmp_path, redis_server)
    first, second = await replica("a"), await replica("b")
    mine = first.services.rollouts.by_name["small"]
    before = mine.state
    assert (await first.client.post("/admin/rollout/small/promote")).status == 200
    promoted = mine.state
    # The other replica's rollback, made a moment before, lands in Redis after the promotion.
    rolled_back = before.rollback(now=promoted.changed_at - 1.0)
    assert rolled_back.rev == promoted.rev
    store = RedisStateStore(redis_server.url)
    try:
        await store.save(rolled_back)
    finally:
        await store.aclose()
    other = second.services.rollouts.by_name["small"]

    def agreed() -> bool:
        return mine.state == other.state

    await wait_until(agreed, timeout_s=10)
    assert other.state.status == mine.state.status == "promoted"
    for i in range(10):
        assert (await ask(second, conversation(i)))[:2] == (200, "v2")


async def test_a_change_made_while_redis_was_down_reaches_the_fleet_when_it_returns_empty(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A promotion made on one replica while Redis is down stands there; once Redis is back
    (restarted without persistence: empty) the other replicas must apply it too. (Before: the
    follower only republished a state Redis held an older one of, so the fleet stayed split.)"""
    replica = await _fleet(start_fake, start_proxy, tmp_path, redis_server)
    first, second = await replica("a"), await replica("b")
    redis_server.stop()
    assert (await first.client.post("/admin/rollout/small/promote")).status == 200
    redis_server.start()  # same port, empty
    other = second.services.rollouts.by_name["small"]
    await wait_until(lambda: other.state.status == "promoted", timeout_s=10)
    assert other.state == first.services.rollouts.by_name["small"].state
    for i in range(10):
        assert (await ask(second, conversation(i)))[:2] == (200, "v2")
