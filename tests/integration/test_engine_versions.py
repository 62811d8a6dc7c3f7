"""``version: auto`` followed while the proxy runs: an engine redeployed in place (same URL,
other weights) gets a new version, its old cache entries are misses and are purged, and a
replica serving another version than its engine's is held out of rotation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from proxy.observability.metrics import iter_samples
from tests.integration.conftest import (
    FakeEngine,
    Proxy,
    StartFake,
    StartProxy,
    engine_config,
    wait_until,
)

GREEDY = {
    "model": "m",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 8,
}


async def _proxy(
    start_proxy: StartProxy, urls: list[str], tmp_path: Path, *, version_interval_s: float
) -> Proxy:
    return await start_proxy(
        [engine_config("e", "m", urls)],
        health={"interval_s": 0.05, "timeout_s": 1.0, "version_interval_s": version_interval_s},
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )


async def _ask(proxy: Proxy, body: dict[str, Any] = GREEDY) -> Any:
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()  # the previous answer is stored
    resp = await proxy.client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    await resp.read()
    return resp


def _counter(proxy: Proxy, name: str) -> float:
    samples = iter_samples(proxy.services.metrics.registry)
    return sum(s.value for s in samples if s.name == name and s.labels.get("engine") == "e")


async def _stored(proxy: Proxy) -> int:
    assert proxy.services.cache is not None
    return (await proxy.services.cache.stats()).stored_entries


async def _stored_is(proxy: Proxy, entries: int) -> bool:
    return await _stored(proxy) == entries


async def _cached_then_redeployed(fake: FakeEngine, proxy: Proxy, redeploy: Any) -> tuple[str, Any]:
    first = await _ask(proxy)
    assert first.headers["x-frugal-cache"] == "miss"
    assert (await _ask(proxy)).headers["x-frugal-cache"] == "hit-exact"
    old = first.headers["x-frugal-model-version"]
    await redeploy()
    engine = proxy.services.engines[0]
    await wait_until(lambda: engine.version != old)
    assert engine.version is not None and engine.version != old
    return old, await _ask(proxy)


async def test_a_redeploy_seen_when_the_replica_comes_back_makes_old_entries_misses(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    fake = await start_fake("m")
    # No periodic check in the test's time: the restart alone must trigger the new question.
    proxy = await _proxy(start_proxy, [fake.url], tmp_path, version_interval_s=3600)
    replica = proxy.services.engines[0].replicas[0]

    async def restart_with_other_weights() -> None:
        fake.configure(health_fail=True)
        await wait_until(lambda: replica.healthy is False)
        fake.redeploy(root="/models/m-v2")
        fake.configure(health_fail=False)

    old, after = await _cached_then_redeployed(fake, proxy, restart_with_other_weights)
    assert after.headers["x-frugal-model-version"] not in (old, "unknown")
    assert after.headers["x-frugal-cache"] == "miss"  # not the old model's answer
    assert (await _ask(proxy)).headers["x-frugal-cache"] == "hit-exact"  # stored under the new
    await wait_until(lambda: _stored_is(proxy, 1))
    assert await _stored(proxy) == 1  # the old version's entry was purged
    assert _counter(proxy, "frugal_engine_version_changes_total") == 1


async def test_a_redeploy_without_a_missed_health_poll_is_seen_periodically(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    fake = await start_fake("m")
    proxy = await _proxy(start_proxy, [fake.url], tmp_path, version_interval_s=0.2)

    async def quick_swap() -> None:
        fake.redeploy(max_model_len=8192)  # a longer context: another version too

    old, after = await _cached_then_redeployed(fake, proxy, quick_swap)
    assert after.headers["x-frugal-model-version"] != old
    assert after.headers["x-frugal-cache"] == "miss"


async def test_the_periodic_check_derives_the_start_up_version_with_its_launch_extra(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # `frugal up` folds the launch dtype into `version: auto` (version_extra). The start-up
    # resolution once left it out, so the first periodic check saw "another" version, switched
    # and purged the engine's entries 30 s after every start.
    fake = await start_fake("m")
    proxy = await start_proxy(
        [engine_config("e", "m", [fake.url], version_extra="dtype=float32")],
        health={"interval_s": 0.05, "timeout_s": 1.0, "version_interval_s": 0.1},
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )
    engine = proxy.services.engines[0]
    first = await _ask(proxy)
    started_with = first.headers["x-frugal-model-version"]
    replica = engine.replicas[0]
    asked_at = replica.version_at
    await wait_until(lambda: replica.version_at != asked_at)  # the periodic check has run
    await asyncio.sleep(0.3)  # and run again
    assert engine.version == replica.version == started_with
    assert (await _ask(proxy)).headers["x-frugal-cache"] == "hit-exact"
    assert _counter(proxy, "frugal_engine_version_changes_total") == 0


async def test_a_replica_on_another_version_is_held_out_until_the_engine_moves_to_it(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    a, b = await start_fake("m"), await start_fake("m")
    proxy = await _proxy(start_proxy, [a.url, b.url], tmp_path, version_interval_s=0.1)
    engine = proxy.services.engines[0]
    ra, rb = engine.replicas
    await wait_until(lambda: engine.version is not None and ra.version == rb.version)
    old = engine.version

    b.redeploy(root="/models/m-v2")  # a rolling redeploy, half done
    await wait_until(lambda: rb.version not in (None, old))
    assert engine.version == old and not engine.in_rotation(rb)
    served_by_b = b.state.counters.requests
    for i in range(8):
        resp = await _ask(proxy, {**GREEDY, "messages": [{"role": "user", "content": f"q{i}"}]})
        assert resp.headers["x-frugal-model-version"] == old
    assert b.state.counters.requests == served_by_b  # all went to a
    assert (await proxy.client.get("/readyz")).status == 200
    await wait_until(lambda: _counter(proxy, "frugal_replicas_held_out_total") == 1)
    assert _counter(proxy, "frugal_replicas_held_out_total") == 1  # logged and counted once

    a.configure(health_fail=True)  # the last old replica goes down for its redeploy
    await wait_until(lambda: engine.version == rb.version)
    resp = await _ask(proxy)
    assert resp.headers["x-frugal-model-version"] == rb.version != old
    assert resp.headers["x-frugal-cache"] == "miss"
    assert (await proxy.client.get("/readyz")).status == 200

    a.configure(health_fail=False)  # back, but still the old weights: held out now
    await wait_until(lambda: ra.healthy is True and ra.version == old)
    served_by_a = a.state.counters.requests
    for i in range(8):
        await _ask(proxy, {**GREEDY, "messages": [{"role": "user", "content": f"r{i}"}]})
    assert a.state.counters.requests == served_by_a
    assert engine.version == rb.version


async def test_an_engine_whose_version_cannot_be_resolved_says_why_once(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    import structlog

    engine = await start_fake("m")
    with structlog.testing.capture_logs() as logs:
        # the config names a model the engine does not serve: no version, so /readyz says 503
        proxy = await start_proxy([engine_config("e", "wrongname", [engine.url])])
        assert (await proxy.client.get("/readyz")).status == 503
        await wait_until(lambda: proxy.services.engines[0].version is None and len(logs) > 0)
        await asyncio.sleep(1.0)  # retried meanwhile (every 0.5-5 s)
    unknown = [e for e in logs if e["event"] == "engine version unknown yet"]
    # (before: nothing at all was logged)
    assert len(unknown) == 1, logs
    assert unknown[0]["engine"] == "e" and unknown[0]["replica"] == engine.url
    assert "does not serve 'wrongname'" in unknown[0]["reason"]
