"""The Redis cache store on a real redis-server: two replicas sharing entries, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from proxy.cache.entry import CacheEntry, EntryMeta
from proxy.cache.index import SemanticIndex
from proxy.cache.keys import Endpoint, Partition, Scope, make_keys
from proxy.cache.redis_store import RedisStore
from proxy.cache.service import CosineVerifier, ResponseCache
from proxy.cache.store import CacheBackendError, followable

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest_redis import RedisServer
    from tests.integration.conftest import StartFake, StartProxy

pytest_plugins = ["tests.conftest_redis"]
# A stuck Redis call must fail its test in minutes, not after the suite-wide 15 minutes.
pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

DIM = 8
GLOBAL = Partition(Scope.GLOBAL)


def vec(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def keys_for(question: str, version: str = "v1") -> Any:
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0}
    return make_keys(Endpoint.CHAT, body, engine="large", version=version, partition=GLOBAL)


def answer(text: str) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "large",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def entry(n: int, ttl: float = 60.0) -> CacheEntry:
    meta = EntryMeta(
        key=f"{n:064x}",
        context="c",
        endpoint="chat",
        engine="e",
        version="v",
        partition="p",
        scope="global",
        created_at=0.0,
        ttl=ttl,
        compute_seconds=0.1,
        query_text=str(n),
    )
    return CacheEntry(meta, b"{}", np.ones(DIM, dtype=np.float32))


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def replica(url: str, errors: list[str] | None = None) -> ResponseCache:
    store = RedisStore(
        url,
        prefix="t",
        retry_after=0.2,
        follow_block_ms=200,
        on_error=(lambda op, exc: errors.append(op)) if errors is not None else None,
    )
    return ResponseCache(store, index=SemanticIndex(DIM), verifier=CosineVerifier(0.9))


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_server.url, prefix="t")
    yield s
    await s.close()


async def test_store_operations(store: RedisStore) -> None:
    assert followable(store) is store
    for n in range(5):
        await store.put(entry(n))
    got = await store.get(entry(2).meta.key)
    assert got is not None and got.meta.query_text == "2" and got.embedding is not None
    assert set(await store.get_many([entry(1).meta.key, "f" * 64])) == {entry(1).meta.key}
    assert await store.count() == 5
    assert len([e async for e in store.scan()]) == 5
    deleted = await store.delete_where(lambda m: m.query_text in {"0", "1"})
    assert sorted(m.query_text or "" for m in deleted) == ["0", "1"]
    assert await store.delete([entry(2).meta.key]) == 1
    assert await store.count() == 2


async def test_entries_expire_in_redis(store: RedisStore) -> None:
    await store.put(entry(1, ttl=0.05))
    await asyncio.sleep(0.2)
    assert await store.get(entry(1).meta.key) is None


async def test_replicas_share_exact_and_semantic_entries(redis_server: RedisServer) -> None:
    first, second = replica(redis_server.url), replica(redis_server.url)
    await first.start()
    await second.start()
    await first.ready()
    await second.ready()
    assert await first.store_response(
        keys_for("capital of France?"), answer("Paris"), embedding=vec(1, 0.1)
    )
    exact = await second.lookup(keys_for("capital of France?"))
    assert exact is not None and exact.kind == "exact"

    async def second_follows() -> bool:
        return len(second.index) == 1

    await eventually(second_follows)
    hit = await second.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12))
    assert hit is not None and hit.kind == "semantic"

    # a third replica started later rebuilds its index from Redis
    third = replica(redis_server.url)
    await third.start()
    await third.ready()
    assert len(third.index) == 1
    assert await third.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12)) is not None
    for r in (first, second, third):
        await r.aclose()


async def test_outage_degrades_to_misses_and_recovers(redis_server: RedisServer) -> None:
    errors: list[str] = []
    cache = replica(redis_server.url, errors)
    await cache.start()
    await cache.ready()
    keys = keys_for("q")
    assert await cache.store_response(keys, answer("a"), embedding=vec(1))
    assert await cache.lookup(keys) is not None

    redis_server.stop()
    assert await cache.lookup(keys) is None
    assert await cache.lookup(keys) is None  # during back-off: fails fast, still a miss
    assert not await cache.store_response(keys_for("other"), answer("b"))
    stats = await cache.stats()
    assert stats.backend_errors >= 3 and stats.stores["failed"] == 1

    async def follower_failed() -> bool:
        return "follow" in errors

    await eventually(follower_failed)  # the callback heard of what the cache cannot see
    with pytest.raises(CacheBackendError):
        await cache.store.get(keys.exact)

    redis_server.start()  # same port, empty (no persistence)

    async def recovered() -> bool:
        return await cache.store_response(keys, answer("a again"), embedding=vec(1))

    await eventually(recovered)
    hit = await cache.lookup(keys)
    assert hit is not None and hit.json()["choices"][0]["message"]["content"] == "a again"

    async def resynced() -> bool:
        # the follower resynced from the (new, empty) server plus the entry stored since
        return len(cache.index) == 1

    await eventually(resynced)
    await cache.aclose()


async def test_admin_invalidate_and_import_fail_clearly_during_an_outage(
    redis_server: RedisServer,
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    capsys: Any,
) -> None:
    from proxy.cli import main
    from tests.integration.conftest import engine_config

    engine = await start_fake("m")
    proxy = await start_proxy(
        [engine_config("e", "m", [engine.url])],
        cache={"enabled": True, "backend": "redis", "scope": "global"},
        redis={"url": redis_server.url},
    )
    url = str(proxy.client.make_url("")).rstrip("/")
    rows = [{"prompt": "q", "answer": "a"}]
    resp = await proxy.client.post("/admin/cache/import", json={"engine": "e", "rows": rows})
    assert (await resp.json())["stored"] == 1

    redis_server.stop()
    # (before: 500 internal_error, "unexpected error" and a traceback in the log)
    resp = await proxy.client.post("/admin/cache/invalidate", json={"engine": "e"})
    error = (await resp.json())["error"]
    assert resp.status == 503 and error["code"] == "cache_unavailable"
    assert "cache store is unavailable" in error["message"]
    # (before: 200 {"stored": 0} and the CLI exited 0)
    resp = await proxy.client.post("/admin/cache/import", json={"engine": "e", "rows": rows})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "cache_unavailable"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "answer": "a"}\n')
    command = ["cache", "import", str(pairs), "--url", url, "--engine", "e"]
    assert await asyncio.to_thread(main, command) == 1
    err = capsys.readouterr().err
    assert "answered 503: the cache store is unavailable: " in err
    assert f"{pairs}:1 and the rows after it were not stored" in err


async def test_a_rebuild_failed_by_the_back_off_is_tried_again(redis_server: RedisServer) -> None:
    first = replica(redis_server.url)
    await first.start()
    await first.ready()
    assert await first.store_response(
        keys_for("capital of France?"), answer("Paris"), embedding=vec(1)
    )
    await first.aclose()

    second = replica(redis_server.url)
    store = second.store
    assert isinstance(store, RedisStore)
    # A request failed a moment ago (Redis paused at start-up): the client backs off, and the
    # start-up rebuild's scan fails at once. (The back-off lasts until the test ends it: a
    # timed one could be over before a loaded machine gets to the scan.)
    store._backoff.until = time.monotonic() + 3600
    await second.start()
    await second.ready()  # the rebuild failed once
    assert (await second.stats()).backend_errors >= 1
    assert len(second.index) == 0
    store._backoff.until = 0.0  # the back-off is over

    async def rebuilt() -> bool:
        return len(second.index) == 1

    await eventually(rebuilt)
    hit = await second.lookup(keys_for("France's capital?"), embedding=vec(1, 0.12))
    assert hit is not None and hit.kind == "semantic"
    await second.aclose()


async def test_each_failure_is_one_cache_error_on_metrics(redis_server: RedisServer) -> None:
    from proxy.app import _CacheMetrics
    from proxy.observability.metrics import Metrics

    metrics = Metrics()
    observer = _CacheMetrics(metrics, "redis")
    # wired as the app wires it
    store = RedisStore(redis_server.url, prefix="t", on_error=observer.on_backend_error)
    cache = ResponseCache(store, index=SemanticIndex(DIM), observer=observer)
    redis_server.stop()
    assert not await cache.store_response(keys_for("q"), answer("a"))  # a failed call
    store._backoff.until = 0.0  # (past the back-off: the get fails on the socket too)
    assert await cache.lookup(keys_for("q")) is None

    def errors(op: str) -> float | None:
        labels = {"backend": "redis", "op": op}
        return metrics.registry.get_sample_value("frugal_cache_errors_total", labels)

    assert (errors("put"), errors("get")) == (1, 1)
    await store.close()


async def test_a_replica_serving_other_engines_keeps_the_fleets_entries(
    redis_server: RedisServer, start_fake: StartFake, start_proxy: StartProxy
) -> None:
    """A replica configured with other engines, starting on the fleet's Redis, must not purge the
    entries of the engines the running replicas serve. (A new version of the same engine is a
    rollout the fleet follows through Redis, and each replica then purges the old version
    itself: tests/integration/test_rollout*.)"""
    from tests.integration.conftest import engine_config

    engine = await start_fake("m")
    cache = {"enabled": True, "backend": "redis", "scope": "global"}
    redis = {"url": redis_server.url}
    running = await start_proxy(
        [engine_config("e", "m", [engine.url], version="v1")], cache=cache, redis=redis
    )
    rows = [{"prompt": "q", "answer": "a"}]
    resp = await running.client.post("/admin/cache/import", json={"engine": "e", "rows": rows})
    assert (await resp.json())["stored"] == 1
    ask = {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0}
    resp = await running.client.post("/v1/chat/completions", json=ask)
    assert resp.headers["x-frugal-cache"] == "hit-exact"

    starting = await start_proxy(
        [engine_config("f", "m", [engine.url], version="v1")], cache=cache, redis=redis
    )

    async def ready() -> bool:
        return (await starting.client.get("/readyz")).status == 200

    await eventually(ready)
    # (before: its start-up purge deleted every entry of engines and versions it did not serve
    # itself, within milliseconds of its versions being known)
    await asyncio.sleep(0.5)
    stats = await (await running.client.get("/admin/cache/stats")).json()
    assert stats["stored_entries"] == 1
    resp = await running.client.post("/v1/chat/completions", json=ask)
    assert resp.headers["x-frugal-cache"] == "hit-exact"
