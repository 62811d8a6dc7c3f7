"""Canary rollouts against fake engines: the split and its stickiness, promote and rollback under
traffic, automatic rollback, the shadow quality check, restarts, and that no answer of one version
is ever served for another.

The stable engine serves model ``m`` under version v1; the canary serves ``m-canary`` under v2.
The fakes answer only the name they serve (404 otherwise), so an answer shows the proxy asked
that version's replica set for its own name; clients see ``m`` in every answer, whichever version
gave it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cache.service import InvalidationFilter
from proxy.cli import main
from proxy.engines.pool import Engine, ReplicaLoad
from tests.integration.conftest import (
    FakeEngine,
    Proxy,
    StartFake,
    StartProxy,
    engine_config,
    wait_until,
)
from tests.integration.test_cache_pipeline import in_flight

_ids = itertools.count()


def canary_engine(
    stable: FakeEngine, canary: FakeEngine, share: float, **canary_extra: Any
) -> dict[str, Any]:
    return engine_config(
        "small",
        "m",
        [stable.url],
        version="v1",
        canary={
            "version": "v2",
            "urls": [canary.url],
            "share": share,
            "model": "m-canary",
            **canary_extra,
        },
    )


async def start_pair(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    *,
    share: float,
    cache: bool = True,
    canary_options: dict[str, Any] | None = None,
    engine_extra: dict[str, Any] | None = None,
    health_interval_s: float = 0.2,
    **canary_extra: Any,
) -> tuple[FakeEngine, FakeEngine, Proxy]:
    stable = await start_fake("m")
    canary = await start_fake("m-canary", **(canary_options or {}))
    # A generous health timeout: on a loaded test machine a slow /health must not mark a replica
    # down mid-test (these tests count every non-200).
    sections: dict[str, Any] = {"health": {"interval_s": health_interval_s, "timeout_s": 10.0}}
    if cache:
        sections["cache"] = {"enabled": True, "data_dir": str(tmp_path / "cache")}
    engine = canary_engine(stable, canary, share, **canary_extra)
    proxy = await start_proxy([{**engine, **(engine_extra or {})}], **sections)
    return stable, canary, proxy


def conversation(i: int, turns: int = 1) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f"conversation {i}: what is {i} squared?"}]
    for t in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"answer {t}"},
            {"role": "user", "content": f"and turn {t}?"},
        ]
    return messages


async def ask(proxy: Proxy, messages: list[dict[str, str]], **extra: Any) -> tuple[int, str, str]:
    """(status, version header, cache header); checks the answer names the engine's model."""
    body = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": 8, **extra}
    resp = await proxy.client.post("/v1/chat/completions", json=body)
    version = resp.headers.get("x-frugal-model-version", "")
    cache = resp.headers.get("x-frugal-cache", "")
    if resp.status == 200 and not extra.get("stream"):
        answer = await resp.json()
        # The name the client asked for, whichever version answered (the canary serves another).
        assert answer["model"] == "m", (version, cache, answer["model"])
    else:
        await resp.read()
    return resp.status, version, cache


async def test_canary_share_is_within_two_points_over_5000_conversations(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.2, cache=False
    )
    versions: list[str] = []
    for start in range(0, 5000, 25):
        results = await asyncio.gather(
            *(ask(proxy, conversation(i)) for i in range(start, start + 25))
        )
        assert [r for r in results if r[0] != 200] == []
        versions += [v for _, v, _ in results]
    share = versions.count("v2") / len(versions)
    assert abs(share - 0.2) <= 0.02, share
    assert set(versions) == {"v1", "v2"}
    assert canary.state.counters.requests == versions.count("v2")
    assert stable.state.counters.requests == versions.count("v1")


async def test_a_conversation_keeps_its_version_on_every_turn(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, _, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.5, cache=False)
    seen: dict[int, set[str]] = {}
    for i in range(60):
        for turns in (1, 2, 3):
            _, version, _ = await ask(proxy, conversation(i, turns))
            seen.setdefault(i, set()).add(version)
    assert all(len(v) == 1 for v in seen.values())
    assert {v for vs in seen.values() for v in vs} == {"v1", "v2"}


async def test_cache_hits_carry_the_version_that_stored_them(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    stable, canary, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.5)
    first = {i: await ask(proxy, conversation(i)) for i in range(40)}
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    calls = stable.state.counters.requests + canary.state.counters.requests
    for i in range(40):
        status, version, cache = await ask(proxy, conversation(i))
        assert (status, cache, version) == (200, "hit-exact", first[i][1])
    assert stable.state.counters.requests + canary.state.counters.requests == calls


async def test_a_stored_version_names_the_replica_set_to_ask_again(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Cache audits re-ask the version that stored an answer, canary or stable.
    stable, canary, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.5)
    rollouts = proxy.services.rollouts
    v1, v2 = rollouts.replica_set("small", "v1"), rollouts.replica_set("small", "v2")
    assert v1 is not None and [r.url for r in v1.replicas] == [stable.url]
    assert v2 is not None and [r.url for r in v2.replicas] == [canary.url]
    assert rollouts.replica_set("small", "v0") is None
    assert rollouts.replica_set("other", "v1") is None


async def traffic(proxy: Proxy, stop: asyncio.Event, out: list[tuple[int, str, str]]) -> None:
    """One client sending fresh and repeated questions, streamed and not, until told to stop."""
    while not stop.is_set():
        i = next(_ids) % 300
        stream = i % 3 == 0
        out.append(await ask(proxy, conversation(i), **({"stream": True} if stream else {})))


async def test_promote_under_traffic_loses_no_request_and_retires_v1_entries(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    stable, _, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.3, canary_options={"ttft_ms": 5}
    )
    stable.configure(ttft_ms=5)
    results: list[tuple[int, str, str]] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(traffic(proxy, stop, results)) for _ in range(8)]
    await wait_until(lambda: len(results) >= 200)
    resp = await proxy.client.post("/admin/rollout/small/promote")
    assert resp.status == 200
    status = await resp.json()
    assert (status["status"], status["stable_version"], status["canary_version"]) == (
        "promoted", "v2", None,
    )  # fmt: skip
    promoted_at = len(results)
    await wait_until(lambda: len(results) >= promoted_at + 300)
    stop.set()
    await asyncio.gather(*workers)
    assert all(code == 200 for code, _, _ in results), [r for r in results if r[0] != 200][:5]
    before = {v for _, v, _ in results[:promoted_at]}
    assert before == {"v1", "v2"}
    # Requests in flight at the promotion may still finish on v1; a few later none may.
    assert {v for _, v, _ in results[promoted_at + 50 :]} == {"v2"}
    assert any(c == "hit-exact" for _, _, c in results[promoted_at + 50 :])
    # v1's entries are gone from the store, v2's stay.
    await proxy.services.rollouts.drain()
    cache = proxy.services.cache
    assert cache is not None
    await cache.drain()
    assert await cache.invalidate(InvalidationFilter(engine="small", version="v1")) == 0
    assert await cache.invalidate(InvalidationFilter(engine="small", version="v2")) > 0
    # The stable fake gets nothing new.
    served = stable.state.counters.requests
    for i in range(1000, 1030):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v2")
    assert stable.state.counters.requests == served


async def test_rollback_under_traffic_loses_no_request(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, canary_options={"ttft_ms": 5}
    )
    results: list[tuple[int, str, str]] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(traffic(proxy, stop, results)) for _ in range(8)]
    await wait_until(lambda: len(results) >= 200)
    resp = await proxy.client.post("/admin/rollout/small/rollback")
    assert resp.status == 200
    assert (await resp.json())["status"] == "rolled_back"
    rolled_at = len(results)
    await wait_until(lambda: len(results) >= rolled_at + 300)
    stop.set()
    await asyncio.gather(*workers)
    assert all(code == 200 for code, _, _ in results)
    assert {v for _, v, _ in results[rolled_at + 50 :]} == {"v1"}
    await proxy.services.rollouts.drain()
    cache = proxy.services.cache
    assert cache is not None
    await cache.drain()
    assert await cache.invalidate(InvalidationFilter(engine="small", version="v2")) == 0
    served = canary.state.counters.requests
    for i in range(1000, 1030):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v1")
    assert canary.state.counters.requests == served
    # Nothing left to promote or roll back.
    again = await proxy.client.post("/admin/rollout/small/rollback")
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "rollout_conflict"


FAST_JUDGE = {"min_requests": 40, "check_interval_s": 0.05, "window_s": 60}


async def test_automatic_rollback_fires_on_an_erroring_canary(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, _, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, cache=False,
        canary_options={"fail_status": 500, "fail_fraction": 0.6, "rng_seed": 1},
        auto_rollback=FAST_JUDGE,
    )  # fmt: skip
    rollouts = proxy.services.rollouts
    for i in range(400):
        await ask(proxy, conversation(i))
        if rollouts.by_name["small"].state.status != "canary":
            break
    await wait_until(lambda: rollouts.by_name["small"].state.status == "rolled_back")
    state = rollouts.by_name["small"].state
    assert state.status == "rolled_back" and state.reason.startswith("auto: error_rate")
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'frugal_rollout_auto_rollbacks_total{engine="small",reason="error_rate"} 1.0' in metrics
    # Afterwards every conversation is served by the stable version, successfully.
    for i in range(50):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v1")


def judged_latencies(proxy: Proxy) -> dict[str, Any]:
    """Each version's answers and slowest latencies in the judged window: why a verdict is late."""
    rollouts = proxy.services.rollouts
    out: dict[str, Any] = {}
    for version in ("v1", "v2"):
        window = rollouts.windows[("small", version)].judged(rollouts.clock(), 60)
        out[version] = (window.requests, [round(s, 3) for s in window.latencies[-5:]])
    return out


async def test_automatic_rollback_fires_on_a_slow_canary(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # 400 ms to the canary's first token, ~0 to the stable's: far beyond twice as slow, with a
    # margin for a loaded test machine (small batches keep the proxy's own queueing low).
    _, _, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, cache=False,
        canary_options={"ttft_ms": 400}, auto_rollback={**FAST_JUDGE, "max_latency_ratio": 2},
    )  # fmt: skip
    rollouts = proxy.services.rollouts
    sent = 0
    # The judge's stable p95 upper bound is a high order statistic: with 200 answers it is the
    # second slowest, so two event-loop stalls of a loaded CI machine hold it off. More answers
    # move the bound away from the tail; usually the verdict comes within the first 100.
    while rollouts.by_name["small"].state.status == "canary" and sent < 1200:
        await asyncio.gather(*(ask(proxy, conversation(sent + i)) for i in range(10)))
        sent += 10
    await wait_until(lambda: rollouts.by_name["small"].state.status == "rolled_back")
    state = rollouts.by_name["small"].state
    assert state.status == "rolled_back", judged_latencies(proxy)
    assert state.reason.startswith("auto: latency")
    assert rollouts.metrics.auto_rollbacks.labels("small", "latency").value == 1


async def test_no_automatic_rollback_on_a_healthy_canary(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, _, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, cache=False, auto_rollback=FAST_JUDGE
    )
    rollouts = proxy.services.rollouts
    for i in range(300):
        assert (await ask(proxy, conversation(i)))[0] == 200
    judged = rollouts.by_name["small"]
    assert await rollouts.check_now() == []
    assert judged.state.status == "canary"
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    figures = {v: row["figures"] for v, row in status["versions"].items()}
    assert figures["v1"]["engine_answers"] >= 40 and figures["v2"]["engine_answers"] >= 40
    assert figures["v2"]["error_rate"] == 0.0


async def test_state_survives_a_restart_with_the_old_config(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    stable, canary, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.3)
    assert (await proxy.client.post("/admin/rollout/small/promote")).status == 200
    await proxy.services.rollouts.drain()
    await proxy.client.close()
    # A fresh app on the same data directory, with the very same config (canary v2 at 30%).
    again = await start_proxy(
        [canary_engine(stable, canary, 0.3)],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )
    status = await (await again.client.get("/admin/rollout/small")).json()
    assert (status["status"], status["stable_version"]) == ("promoted", "v2")
    for i in range(20):
        assert (await ask(again, conversation(i)))[:2] == (200, "v2")


async def test_share_endpoint_and_cli(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.0, cache=False)
    for i in range(20):
        assert (await ask(proxy, conversation(i)))[1] == "v1"
    url = str(proxy.client.make_url("")).rstrip("/")
    code = await asyncio.to_thread(main, ["rollout", "share", "small", "1", "--url", url])
    assert code == 0
    for i in range(20):
        assert (await ask(proxy, conversation(i)))[1] == "v2"
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["rollout", "status", "small", "--url", url])
    out = capsys.readouterr().out
    assert code == 0
    assert "engine small: canary (canary share 100.0%)" in out
    assert any(line.startswith("v2") and "canary" in line for line in out.splitlines())
    bad = await proxy.client.post("/admin/rollout/small/share", json={"share": 2})
    assert bad.status == 400
    misspelt = await proxy.client.post("/admin/rollout/small/share", json={"shares": 0.5})
    assert misspelt.status == 400
    assert (await misspelt.json())["error"]["param"] == "shares"  # (before: "share must be ...")
    missing = await proxy.client.get("/admin/rollout/nope")
    assert missing.status == 404
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'frugal_version_requests_total{engine="small",outcome="ok",version="v2"} 20.0' in metrics
    assert 'frugal_rollout_canary_share{engine="small",version="v2"} 1.0' in metrics


async def test_shadow_check_measures_agreement(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, cache=False,
        quality={"share": 1.0, "max_concurrency": 64},
    )  # fmt: skip
    for i in range(40):
        await ask(proxy, conversation(i))
    rollouts = proxy.services.rollouts
    await rollouts.shadow.drain()
    agreed = rollouts.metrics.shadow.labels("small", "v2", "agree").value
    assert agreed == 40  # the same fake text for the same greedy prompt
    # A streamed answer is compared once whole (the user's stream is not held up for it).
    await ask(proxy, conversation(0), stream=True)
    await rollouts.shadow.drain()
    assert rollouts.metrics.shadow.labels("small", "v2", "agree").value == 41
    # A canary that answers shorter disagrees on every greedy request.
    canary.configure(completion_tokens=4)
    for i in range(40, 60):
        await ask(proxy, conversation(i))
    await rollouts.shadow.drain()
    assert rollouts.metrics.shadow.labels("small", "v2", "disagree").value == 20
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    assert status["versions"]["v2"]["figures"]["shadow_agreement"] == pytest.approx(41 / 61)


async def test_a_restart_keeps_both_versions_cache_entries(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    stable, canary, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.5)
    first = {i: (await ask(proxy, conversation(i)))[1] for i in range(30)}
    assert set(first.values()) == {"v1", "v2"}
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    await proxy.client.close()
    # The start-up purge of unserved versions must keep the canary's entries too.
    again = await start_proxy(
        [canary_engine(stable, canary, 0.5)],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )
    for i, version in first.items():
        assert (await ask(again, conversation(i)))[1:] == (version, "hit-exact")


async def test_a_canary_that_does_not_serve_its_model_is_rolled_back(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The canary's replicas serve another model than its config names: every answer is the
    # engine's 404. The client asked for a model the proxy serves, so that is the version
    # failing, not the client: it must count as the version's error and trip the judge.
    stable = await start_fake("m")
    canary = await start_fake("m-elsewhere")
    proxy = await start_proxy(
        [canary_engine(stable, canary, 0.5, auto_rollback=FAST_JUDGE)],
        health={"interval_s": 0.2, "timeout_s": 10.0},
    )
    rollouts = proxy.services.rollouts
    statuses = []
    for i in range(400):
        statuses.append((await ask(proxy, conversation(i)))[:2])
        if rollouts.by_name["small"].state.status != "canary":
            break
    assert (404, "v2") in statuses  # (the client still gets the engine's answer)
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'frugal_version_requests_total{engine="small",outcome="error",version="v2"}' in metrics
    await wait_until(lambda: rollouts.by_name["small"].state.status == "rolled_back")
    assert rollouts.by_name["small"].state.reason.startswith("auto: error_rate")
    for i in range(20):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v1")


async def test_a_promotion_the_data_directory_cannot_record_still_completes(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The disk is full when the operator promotes: the promotion is in effect at once (as with
    # Redis down), so the admin must be told it succeeded and its cleanup must still run, not
    # get a 500 for a change that happened anyway (and a 409 when they retry).
    from proxy.rollout.store import FileStateStore

    _, _, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.5)
    for i in range(20):
        await ask(proxy, conversation(i))
    cache = proxy.services.cache
    assert cache is not None
    await cache.drain()

    def full(self: FileStateStore, states: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileStateStore, "_save", full)
    resp = await proxy.client.post("/admin/rollout/small/promote")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "promoted"
    await proxy.services.rollouts.drain()
    assert await cache.invalidate(InvalidationFilter(engine="small", version="v1")) == 0
    for i in range(20):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v2")


async def test_status_keeps_the_retired_versions_figures_after_a_rollback(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # After a rollback the operator asks why: the figures of the version taken out of service
    # (its errors, its latency; here its failures, each answered by the stable in its place)
    # stay in the status, the CLI and the dashboard for their window.
    _, _, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, cache=False,
        canary_options={"fail_status": 500, "fail_fraction": 1.0},
        auto_rollback={"enabled": False},
    )  # fmt: skip
    answered = [(await ask(proxy, conversation(i)))[:2] for i in range(40)]
    assert answered == [(200, "v1")] * 40
    failed = proxy.services.rollouts.metrics.fallbacks.labels("small", "v2", "v1").value
    assert failed > 0
    assert (await proxy.client.post("/admin/rollout/small/rollback")).status == 200
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    assert status["versions"]["v1"]["role"] == "stable"
    retired = status["versions"]["v2"]
    assert retired["role"] == "retired" and retired["replicas"] == []
    assert retired["figures"]["fallbacks"] == failed
    url = str(proxy.client.make_url("")).rstrip("/")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["rollout", "status", "small", "--url", url]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("v2") and "retired" in line for line in out.splitlines()), out


async def test_promoting_over_a_discovered_stable_version_names_that_version(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # A stable with `version: auto` serves the version its replicas report: the one a promote
    # retires is that version (status "previous", the retired figures), not the word "auto".
    stable = await start_fake("m")
    canary = await start_fake("m-canary")
    engine = canary_engine(stable, canary, 0.5)
    engine["version"] = "auto"
    proxy = await start_proxy([engine], health={"interval_s": 0.1, "timeout_s": 10.0})
    rollouts = proxy.services.rollouts
    await wait_until(lambda: rollouts.by_name["small"].engine.version is not None)
    discovered = rollouts.by_name["small"].engine.version
    assert discovered not in (None, "auto")
    for i in range(20):
        resp = await proxy.client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": conversation(i), "temperature": 0, "max_tokens": 8},
        )
        assert resp.status == 200
    assert (await proxy.client.post("/admin/rollout/small/promote")).status == 200
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    assert (status["stable_version"], status["previous"]) == ("v2", discovered)
    assert status["versions"][discovered]["role"] == "retired"


async def test_admin_engines_shows_the_canarys_replicas(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Before promoting, the operator checks the canary's replicas are healthy: /admin/engines
    # lists them (health, breaker) with the stable's, and stops once the canary is gone.
    stable, canary, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.5)
    rollouts = proxy.services.rollouts
    await wait_until(lambda: all(r.healthy for r in rollouts.polled[-1].replicas))
    engines = await (await proxy.client.get("/admin/engines")).json()
    small = engines["small"]
    assert [r["url"] for r in small["replicas"]] == [stable.url]
    assert small["canary"]["version"] == "v2" and small["canary"]["model"] == "m-canary"
    assert [(r["url"], r["healthy"]) for r in small["canary"]["replicas"]] == [(canary.url, True)]
    assert (await proxy.client.post("/admin/rollout/small/rollback")).status == 200
    engines = await (await proxy.client.get("/admin/engines")).json()
    assert engines["small"]["canary"] is None


async def test_a_request_queued_through_a_promotion_names_the_version_that_answered_it(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # One request at a time on the engine: a second one waits in the admission queue while the
    # operator promotes. It is then answered by the promoted version's replicas, and its
    # header, the access log and the per-version figures must say so, not the retired v1.
    stable = await start_fake("m", ttft_ms=400)
    canary = await start_fake("m-canary")
    engine = canary_engine(stable, canary, 0.0)
    engine["max_concurrency"] = 1
    proxy = await start_proxy([engine], health={"interval_s": 0.2, "timeout_s": 10.0})
    rollouts = proxy.services.rollouts
    first = asyncio.create_task(ask(proxy, conversation(1)))
    await wait_until(lambda: stable.state.counters.requests == 1)
    second = asyncio.create_task(ask(proxy, conversation(2)))  # queued behind the first
    await wait_until(lambda: proxy.services.admissions["small"].waiting == 1)
    assert (await proxy.client.post("/admin/rollout/small/promote")).status == 200
    assert (await first)[:2] == (200, "v1")
    assert (await second)[:2] == (200, "v2")
    assert canary.state.counters.requests == 1
    assert rollouts.windows[("small", "v1")].figures(rollouts.clock())["requests"] == 1


async def test_a_versions_first_request_is_not_read_as_a_burst(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The proxy has watched for half a second when the canary's first request comes: its rate
    # is one request over that time, not one over the few ms since it came.
    _, _, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=1.0, cache=False)
    await asyncio.sleep(0.5)
    assert (await ask(proxy, conversation(1)))[:2] == (200, "v2")
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    assert 0 < status["versions"]["v2"]["figures"]["request_rate_per_s"] <= 2.0


async def test_no_shadow_comparison_across_a_promotion(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # A canary answer still on its way when the canary is promoted: the stable it was to be
    # compared with is gone (the engine's replicas are the canary's now), so comparing would
    # ask v2 again and count v2 agreeing with itself as the canary agreeing with the stable.
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=1.0, cache=False,
        canary_options={"tokens_per_s": 20}, quality={"share": 1.0},
    )  # fmt: skip
    rollouts = proxy.services.rollouts
    # Streamed: the comparison is set up when the stream starts and made once it has ended.
    answer = asyncio.create_task(ask(proxy, conversation(1), stream=True))
    await wait_until(lambda: canary.state.counters.requests == 1)
    assert (await proxy.client.post("/admin/rollout/small/promote")).status == 200
    assert (await answer)[:2] == (200, "v2")
    await rollouts.shadow.drain()
    assert (stable.state.counters.requests, canary.state.counters.requests) == (0, 1)
    assert rollouts.metrics.shadow.labels("small", "v2", "agree").value == 0
    assert rollouts.metrics.shadow.labels("small", "v2", "dropped").value == 1


async def take_down(proxy: Proxy, fake: FakeEngine, how: str, version: str) -> None:
    """Make every replica of ``version`` unable to take a request, the way ``how`` says, and
    wait until the proxy knows it."""
    if how == "unreachable":
        await fake.server.close()
    elif how == "unhealthy":
        fake.configure(health_fail=True, fail_fraction=1.0)
    else:  # "breaker": every answer a 500; the engine's breaker opens at the first one (whose
        # request the other version answers, in the down version's place)
        fake.configure(fail_fraction=1.0, fail_status=500)
        assert (await ask(proxy, conversation(100)))[:2] != (200, version)
    down = proxy.services.rollouts.replica_set("small", version)
    assert down is not None
    await wait_until(lambda: not down.can_take(time.monotonic()))
    assert not down.can_take(time.monotonic())


# The breaker opens at an engine's first failure and stays open for the whole test; no automatic
# rollback (these tests count on the canary staying in service while down).
DOWN_OPTIONS: dict[str, Any] = {
    "engine_extra": {"breaker": {"failure_threshold": 1, "open_s": 600}},
    "auto_rollback": {"enabled": False},
}


@pytest.mark.parametrize("how", ["unreachable", "unhealthy", "breaker"])
async def test_a_down_canarys_share_is_answered_by_the_stable(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, how: str
) -> None:
    # Every conversation is in the canary's share; its replicas are down. The stable's healthy
    # replicas answer them instead of a 503 (the stable fake counts them), and everything says
    # v1 answered: the header, the cache key, the version figures, a metric.
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=1.0, **DOWN_OPTIONS
    )
    await take_down(proxy, canary, how, "v2")
    rollouts = proxy.services.rollouts
    # (and the request that opened the breaker, if that is how it went down)
    fallbacks = 21 + rollouts.metrics.fallbacks.labels("small", "v2", "v1").value
    served = stable.state.counters.requests
    for i in range(20):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v1")
    assert await ask(proxy, conversation(50), stream=True) == (200, "v1", "miss")
    assert stable.state.counters.requests == served + 21
    cache = proxy.services.cache
    assert cache is not None
    await cache.drain()
    for i in range(20):
        assert await ask(proxy, conversation(i)) == (200, "v1", "hit-exact")
    assert await cache.invalidate(InvalidationFilter(engine="small", version="v2")) == 0
    assert rollouts.metrics.fallbacks.labels("small", "v2", "v1").value == fallbacks
    # v1's figures count the answers; v2's count the fallbacks apart (no client saw an error),
    # and its judge counts them as v2's errors.
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    assert status["versions"]["v1"]["figures"]["engine_answers"] >= 21
    assert status["versions"]["v2"]["figures"]["fallbacks"] == fallbacks
    assert rollouts.windows[("small", "v2")].judged(rollouts.clock(), 60).errors >= 21
    metrics = await (await proxy.client.get("/metrics")).text()
    series = 'frugal_rollout_fallbacks_total{engine="small",from_version="v2",to_version="v1"}'
    assert f"{series} {fallbacks}" in metrics


async def test_a_down_stables_share_is_answered_by_the_canary(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The converse: the stable's replicas are down, the canary's are up. The canary is a version
    # already serving real users: its answer beats a 503 (and the router keeps `auto` traffic on
    # the engine: see test_auto_stays_on_an_engine_whose_stable_is_down_but_whose_canary_is_up).
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.0, cache=False, **DOWN_OPTIONS
    )
    await take_down(proxy, stable, "unhealthy", "v1")
    for i in range(20):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v2")
    assert canary.state.counters.requests == 20
    assert proxy.services.rollouts.metrics.fallbacks.labels("small", "v1", "v2").value == 20


async def test_readyz_counts_an_engine_ready_while_its_canary_can_answer(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The stable's replicas down, the canary's up: the engine still answers (the canary takes
    # the stable's share), so the proxy stays in its load balancer; both down, it does not.
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.0, cache=False, **DOWN_OPTIONS
    )
    await take_down(proxy, stable, "unhealthy", "v1")
    ready = await proxy.client.get("/readyz")
    assert ready.status == 200, await ready.text()
    small = (await ready.json())["engines"]["small"]
    assert (small["ready"], small["version"], small["replicas"]) == (
        True,
        "v1",
        {stable.url: False},
    )
    assert small["canary"] == {
        "ready": True,
        "version": "v2",
        "replicas": {canary.url: True},
        "breakers": {canary.url: "closed"},
    }
    await take_down(proxy, canary, "unhealthy", "v2")
    ready = await proxy.client.get("/readyz")
    assert ready.status == 503
    small = (await ready.json())["engines"]["small"]
    assert (small["ready"], small["canary"]["ready"]) == (False, False)


async def start_routed(
    start_fake: StartFake, start_proxy: StartProxy, *, share: float, health_interval_s: float
) -> tuple[FakeEngine, FakeEngine, FakeEngine, Proxy]:
    """``small`` (stable v1 and its canary v2) and a dearer ``large``, routed: with no embedder
    the router sends ``auto`` to small unless small cannot answer or its load is too high."""
    stable = await start_fake("m")
    canary = await start_fake("m-canary")
    large = await start_fake("large-model")
    small = canary_engine(stable, canary, share, auto_rollback={"enabled": False})
    proxy = await start_proxy(
        [
            {**small, "breaker": {"failure_threshold": 1, "open_s": 600}},
            {
                **engine_config("large", "large-model", [large.url]),
                "cost": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            },
        ],
        routing={"enabled": True},
        health={"interval_s": health_interval_s, "timeout_s": 10.0},
    )
    rollouts = proxy.services.rollouts
    # (every replica set polled up and, for large, its version read)
    await wait_until(
        lambda: all(e.can_take(time.monotonic()) for e in rollouts.polled), timeout_s=15
    )
    assert all(e.can_take(time.monotonic()) for e in rollouts.polled), rollouts.polled
    return stable, canary, large, proxy


async def ask_auto(proxy: Proxy, i: int) -> tuple[int, str, str, str]:
    """(status, engine, version, route reason) of conversation ``i`` asked of ``auto``."""
    body = {"model": "auto", "messages": conversation(i), "temperature": 0, "max_tokens": 8}
    resp = await proxy.client.post("/v1/chat/completions", json=body)
    await resp.read()
    headers = resp.headers
    return (
        resp.status,
        headers.get("x-frugal-engine", ""),
        headers.get("x-frugal-model-version", ""),
        headers.get("x-frugal-route-reason", ""),
    )


async def test_auto_stays_on_an_engine_whose_stable_is_down_but_whose_canary_is_up(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # The router judges an engine by the versions that can answer: small's canary can, so `auto`
    # stays on small (its canary answers) rather than failing over to the dearer large.
    stable, canary, large, proxy = await start_routed(
        start_fake, start_proxy, share=0.0, health_interval_s=0.2
    )
    await take_down(proxy, stable, "unhealthy", "v1")
    for i in range(10):
        assert await ask_auto(proxy, i) == (200, "small", "v2", "difficulty")
    assert (canary.state.counters.requests, large.state.counters.requests) == (10, 0)
    # Both versions down: small cannot answer, and `auto` fails over to large.
    await take_down(proxy, canary, "unhealthy", "v2")
    status, engine, _, reason = await ask_auto(proxy, 10)
    assert (status, engine, reason) == (200, "large", "failover")


@pytest.mark.parametrize(
    ("share", "expected"), [(1.0, ("large", "load")), (0.0, ("small", "difficulty"))]
)
async def test_auto_judges_an_engines_load_by_the_version_that_would_answer(
    start_fake: StartFake, start_proxy: StartProxy, share: float, expected: tuple[str, str]
) -> None:
    # Small's canary is swamped (vLLM reports a long queue), its stable idle. A conversation in
    # the canary's share would wait behind that queue: `auto` moves it to large for load. One in
    # the stable's share would not: it stays on small, answered by the idle stable.
    _, _, _, proxy = await start_routed(
        start_fake, start_proxy, share=share, health_interval_s=60.0
    )
    canary = proxy.services.rollouts.replica_set("small", "v2")
    assert canary is not None
    canary.replicas[0].load = ReplicaLoad(running=1, waiting=1000)  # (the next poll is 60 s away)
    status, engine, _, reason = await ask_auto(proxy, 1)
    assert (status, engine, reason) == (200, *expected)


# Replicas fail unnoticed: the health poll's first round (at start) marks them up and the next is
# a minute away; their breakers would open only after a thousand failures in a row.
UNNOTICED: dict[str, Any] = {
    "health_interval_s": 60.0,
    "engine_extra": {"breaker": {"failure_threshold": 1000}},
    "auto_rollback": {"enabled": False},
}


async def fail_unnoticed(proxy: Proxy, fake: FakeEngine, how: str, version: str) -> Engine:
    """Make ``version``'s replicas fail before their first byte, the way ``how`` says, after the
    health poll marked them up: the proxy still takes them for up (its version is the split's
    choice, and its requests are sent there)."""
    replicas = proxy.services.rollouts.replica_set("small", version)
    assert replicas is not None
    await wait_until(lambda: all(r.healthy for r in replicas.replicas))
    if how == "unreachable":
        await fake.server.close()
    elif how == "5xx":
        fake.configure(fail_fraction=1.0, fail_status=503)
    else:  # "silent": a stream's first token never comes (first_token_s bounds the wait)
        fake.configure(hang=True)
    return replicas


async def ask_streamed(proxy: Proxy, messages: list[dict[str, str]]) -> tuple[int, str, str]:
    """:func:`ask` streamed, checking the client got a whole answer under the engine's name."""
    body = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": 8, "stream": True}
    resp = await proxy.client.post("/v1/chat/completions", json=body)
    text = await resp.text()
    if resp.status == 200:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", text
        assert {orjson.loads(e)["model"] for e in events[:-1]} == {"m"}, text
    return resp.status, resp.headers["x-frugal-model-version"], resp.headers["x-frugal-cache"]


@pytest.mark.parametrize("how", ["unreachable", "5xx"])
async def test_a_canary_failing_unnoticed_has_its_share_answered_by_the_stable(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, how: str
) -> None:
    # Every conversation is in the canary's share. Its replica fails before anyone has noticed
    # (neither the health poll nor its breaker): each request, sent to it and failing before a
    # byte reached the client, is retried on the stable's replica rather than answered 502 or
    # 503. Then, as for a canary known to be down, everything says v1 answered: the header, the
    # cache key, the cost, the version figures, the fallback metric; and the judge counts each
    # as a v2 failure. (The canary is priced apart: a cost taken from it would show.)
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=1.0,
        cost={"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}, **UNNOTICED,
    )  # fmt: skip
    v2 = await fail_unnoticed(proxy, canary, how, "v2")
    served = stable.state.counters.requests
    for i in range(10):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v1")
    for i in range(10, 15):
        assert await ask_streamed(proxy, conversation(i)) == (200, "v1", "miss")
    assert stable.state.counters.requests == served + 15
    assert v2.can_take(time.monotonic())  # still unnoticed: each fallback was decided late
    rollouts = proxy.services.rollouts
    assert rollouts.metrics.fallbacks.labels("small", "v2", "v1").value == 15
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    v1_figures, v2_figures = (
        status["versions"]["v1"]["figures"],
        status["versions"]["v2"]["figures"],
    )
    assert v1_figures["engine_answers"] == 15 and v1_figures["errors"] == 0
    assert 0 < v1_figures["cost_usd"] < 0.001  # the stable's price (the canary's: ~0.03 each)
    assert v2_figures["fallbacks"] == 15 and v2_figures["engine_answers"] == 0
    assert rollouts.windows[("small", "v2")].judged(rollouts.clock(), 60).errors == 15
    metrics = await (await proxy.client.get("/metrics")).text()
    series = 'frugal_rollout_fallbacks_total{engine="small",from_version="v2",to_version="v1"}'
    assert f"{series} 15.0" in metrics
    # The answers were stored as v1's: once the canary is gone, its conversations hit them.
    cache = proxy.services.cache
    assert cache is not None
    await cache.drain()
    assert (await proxy.client.post("/admin/rollout/small/rollback")).status == 200
    for i in range(15):
        assert await ask(proxy, conversation(i)) == (200, "v1", "hit-exact")
    assert stable.state.counters.requests == served + 15


async def test_a_stable_failing_unnoticed_has_its_share_answered_by_the_canary(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The converse, as for a stable known to be down: the canary already serves users.
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.0, cache=False, **UNNOTICED
    )
    await fail_unnoticed(proxy, stable, "5xx", "v1")
    for i in range(5):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v2")
    assert await ask_streamed(proxy, conversation(5)) == (200, "v2", "bypass")
    assert canary.state.counters.requests == 6
    assert proxy.services.rollouts.metrics.fallbacks.labels("small", "v1", "v2").value == 6


async def test_a_silent_canarys_stream_is_retried_on_the_stable_within_the_requests_time(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # A stream's first token is bounded by first_token_s: the canary's silence leaves time for
    # the stable. A non-streamed answer's first byte is its end, so only total_s bounds it: the
    # canary used the request's whole time, and there is none left to ask the stable (a 504).
    timeouts = {"connect_s": 1.0, "first_token_s": 0.3, "total_s": 1.0}
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=1.0, cache=False,
        **{**UNNOTICED, "engine_extra": {**UNNOTICED["engine_extra"], "timeouts": timeouts}},
    )  # fmt: skip
    await fail_unnoticed(proxy, canary, "silent", "v2")
    assert await ask_streamed(proxy, conversation(1)) == (200, "v1", "bypass")
    assert (await ask(proxy, conversation(2)))[:2] == (504, "v2")
    assert stable.state.counters.requests == 1
    canary.configure(hang=False)  # (let the test server close)


async def test_a_request_queued_while_its_canary_went_down_is_answered_by_the_stable(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The canary was up when the second request was given to it, which then queued for the
    # engine's one slot; meanwhile the first failed there and opened its breaker. No replica of
    # the canary takes the second now: the stable answers it, not a 503. Both count as retries.
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=1.0, cache=False,
        **{**UNNOTICED, "engine_extra": {
            "max_concurrency": 1,
            "timeouts": {"connect_s": 1.0, "first_token_s": 0.3, "total_s": 5.0},
            "breaker": {"failure_threshold": 1, "open_s": 600},
        }},
    )  # fmt: skip
    await fail_unnoticed(proxy, canary, "silent", "v2")
    first = asyncio.create_task(ask_streamed(proxy, conversation(1)))
    await wait_until(lambda: canary.state.counters.requests == 1)
    second = asyncio.create_task(ask(proxy, conversation(2)))
    await wait_until(lambda: proxy.services.admissions["small"].waiting == 1)
    assert await first == (200, "v1", "bypass")
    assert (await second)[:2] == (200, "v1")
    assert (canary.state.counters.requests, stable.state.counters.requests) == (1, 2)
    assert proxy.services.rollouts.metrics.fallbacks.labels("small", "v2", "v1").value == 2
    retries = proxy.services.metrics.upstream_retries
    assert retries.labels("small", "upstream_timeout").value == 1
    assert retries.labels("small", "no_healthy_replica").value == 1
    canary.configure(hang=False)


async def test_requests_sharing_a_failed_canary_call_ask_the_stable_for_themselves(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Two identical requests: the second follows the first's engine call. That call fails on
    # the canary and is retried on the stable; the follower, which asked for v2's answer, is not
    # handed v1's under a v2 header but asks for itself (and falls back the same way).
    timeouts = {"connect_s": 1.0, "first_token_s": 0.3, "total_s": 5.0}
    stable, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=1.0,
        **{**UNNOTICED, "engine_extra": {**UNNOTICED["engine_extra"], "timeouts": timeouts}},
    )  # fmt: skip
    await fail_unnoticed(proxy, canary, "silent", "v2")
    first = asyncio.create_task(ask_streamed(proxy, conversation(1)))
    await wait_until(lambda: canary.state.counters.requests == 1)
    second = asyncio.create_task(ask_streamed(proxy, conversation(1)))
    await in_flight(proxy, followers=1)
    assert await first == (200, "v1", "miss")
    assert await second == (200, "v1", "miss")
    assert (canary.state.counters.requests, stable.state.counters.requests) == (2, 2)
    assert proxy.services.rollouts.metrics.fallbacks.labels("small", "v2", "v1").value == 2
    canary.configure(hang=False)


async def test_a_canary_that_stays_down_is_rolled_back_though_no_client_saw_an_error(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # The stable answers the down canary's share, and the judge counts each such request as the
    # canary's failure (the 503 it would have been): a canary that stays down does not stall
    # its rollout out of sight (nor fail a user's request at each probe of its breaker).
    _, canary, proxy = await start_pair(
        start_fake, start_proxy, tmp_path, share=0.5, cache=False, auto_rollback=FAST_JUDGE
    )
    await take_down(proxy, canary, "unhealthy", "v2")
    rollouts = proxy.services.rollouts
    for i in range(400):
        assert (await ask(proxy, conversation(i)))[:2] == (200, "v1")
        if rollouts.by_name["small"].state.status != "canary":
            break
    await wait_until(lambda: rollouts.by_name["small"].state.status == "rolled_back")
    assert rollouts.by_name["small"].state.reason.startswith("auto: error_rate")
    status = await (await proxy.client.get("/admin/rollout/small")).json()
    retired = status["versions"]["v2"]
    assert retired["role"] == "retired" and retired["figures"]["fallbacks"] >= 40


async def test_a_canary_serving_another_model_name_answers_under_the_engines_name(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # canary.model: the canary's replicas serve "m-canary" (the fake 404s any other name), the
    # engine's clients ask for "m" and must see "m" in every answer, streamed, cached, or after
    # a promotion (the engine then sends the promoted replicas their own name).
    _, canary, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=1.0)

    async def answered_models(i: int) -> set[str]:
        body = {"model": "m", "messages": conversation(i), "temperature": 0, "max_tokens": 8}
        resp = await proxy.client.post("/v1/chat/completions", json=body)
        assert (resp.status, resp.headers["x-frugal-model-version"]) == (200, "v2")
        streamed = await proxy.client.post(
            "/v1/chat/completions", json={**body, "stream": True, "max_tokens": 4}
        )
        assert streamed.status == 200
        events = [
            orjson.loads(line[len(b"data: ") :])
            for line in (await streamed.read()).split(b"\n")
            if line.startswith(b"data: {")
        ]
        assert events
        return {(await resp.json())["model"]} | {e["model"] for e in events}

    assert await answered_models(1) == {"m"}
    assert [orjson.loads(r.body)["model"] for r in canary.state.log] == ["m-canary"] * 2
    cache = proxy.services.cache
    assert cache is not None
    await cache.drain()
    assert await answered_models(1) == {"m"}  # (from the cache)
    assert (await proxy.client.post("/admin/rollout/small/promote")).status == 200
    assert await answered_models(2) == {"m"}
    assert {orjson.loads(r.body)["model"] for r in canary.state.log} == {"m-canary"}
