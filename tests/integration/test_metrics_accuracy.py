"""/metrics and the logs against what actually happened to known requests through the proxy."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import orjson
import structlog

from proxy.observability.access import AccessLog
from proxy.observability.metrics import Metrics
from tests.integration.conftest import Proxy, StartFake, StartProxy, engine_config, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def finished(p: Proxy, status: int) -> float:
    """Requests counted as finished with ``status``, whatever their other labels."""
    return sum(
        s.value
        for family in p.services.metrics.registry.collect()
        for s in family.samples
        if s.name == "frugal_requests_total" and s.labels["status"] == str(status)
    )


async def test_an_engine_error_is_not_a_first_token(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", fail_fraction=1.0, fail_status=500)
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    for stream in (False, True):
        resp = await p.client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 502
        await resp.read()
    await wait_until(lambda: finished(p, 502) == 2)
    metrics = p.services.metrics
    assert finished(p, 502) == 2
    labels = {"tier": "open", "engine": "e", "cache": "bypass"}
    assert value(metrics, "frugal_request_latency_seconds_count", **labels) == 2
    # No content byte reached the client: nothing to time.
    assert value(metrics, "frugal_time_to_first_token_seconds_count", **labels) == 0
    assert metrics.snapshot()["latency"]["ttft"]["p50"] is None


async def test_a_client_that_leaves_mid_stream_adds_no_proxy_overhead(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", tokens_per_s=20, completion_tokens=200)
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.0
    while loop.time() < until:  # a second of the engine's tokens, then the client leaves
        await resp.content.readany()
    resp.close()
    await wait_until(lambda: finished(p, 499) == 1)
    metrics = p.services.metrics
    assert finished(p, 499) == 1
    latency = value(metrics, "frugal_request_latency_seconds_sum", tier="open", engine="e",
                    cache="bypass")  # fmt: skip
    overhead = value(metrics, "frugal_proxy_overhead_seconds_sum", tier="open")
    assert latency >= 0.9
    # The second was the engine's; the proxy's own share is milliseconds (a loaded test box
    # stretches them, hence the wide margin: counted as overhead, it would be the whole latency).
    assert overhead < latency / 3, (overhead, latency)


async def test_the_dashboards_errors_are_failures_not_clients_that_left_or_were_refused(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    """Its error rate is the alert's (FrugalErrorRateHigh): 5xx answers. A client that hangs up
    (499) or sends a bad body (400) is no failure of the proxy or an engine."""
    engine = await start_fake("m", tokens_per_s=20, completion_tokens=200)
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    await resp.content.readany()  # the stream has begun; then the client leaves
    resp.close()
    bad = await p.client.post("/v1/chat/completions", json={**CHAT, "messages": "not a list"})
    assert bad.status == 400
    engine.configure(fail_fraction=1.0, fail_status=500)
    failed = await p.client.post("/v1/chat/completions", json=CHAT)
    assert failed.status == 502
    await wait_until(lambda: finished(p, 499) + finished(p, 400) + finished(p, 502) == 3)
    data = await (await p.client.get("/dashboard/data")).json()
    assert data["requests"]["by_status"] == {"499": 1, "400": 1, "502": 1}
    assert (data["requests"]["total"], data["requests"]["errors"]) == (3, 1)


async def test_a_coalesced_follower_waits_on_the_engine_not_the_proxy(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine = await start_fake("m", ttft_ms=1000)
    p = await start_proxy(
        [engine_config("e", "m", [engine.url])],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )
    leader = asyncio.create_task(p.client.post("/v1/chat/completions", json=CHAT))
    await wait_until(lambda: engine.state.in_flight == 1)
    follower = await p.client.post("/v1/chat/completions", json=CHAT)
    assert follower.headers.get("x-frugal-cache-coalesced") == "1"
    await (await leader).read()
    await wait_until(lambda: finished(p, 200) == 2)
    metrics = p.services.metrics
    follower_latency = value(metrics, "frugal_request_latency_seconds_sum", tier="open",
                             engine="e", cache="hit-exact")  # fmt: skip
    overhead = value(metrics, "frugal_proxy_overhead_seconds_sum", tier="open")
    assert follower_latency >= 0.5
    # Both waited on the one engine call; neither spent that time in the proxy itself (counted
    # as overhead, the sum would be at least the follower's latency).
    assert overhead < follower_latency / 2, (overhead, follower_latency)


async def test_the_access_line_says_why_a_request_was_refused(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m")
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    buffer = io.BytesIO()
    p.services.access_log = AccessLog(json=True, stream=buffer)
    bad = {**CHAT, "messages": "not a list"}
    resp = await p.client.post("/v1/chat/completions", json=bad)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] is None  # OpenAI's shape: no code, a type
    await wait_until(lambda: b"\n" in buffer.getvalue())
    line = orjson.loads(buffer.getvalue().splitlines()[0])
    assert (line["status"], line["error"]) == (400, "invalid_request_error")


async def test_the_access_line_says_where_a_requests_time_went(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", ttft_ms=200)
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    buffer = io.BytesIO()
    p.services.access_log = AccessLog(json=True, stream=buffer)
    resp = await p.client.post("/v1/completions", json={"model": "m", "prompt": "Say hi"})
    assert resp.status == 200
    await resp.read()
    await wait_until(lambda: b"\n" in buffer.getvalue())
    line = orjson.loads(buffer.getvalue().splitlines()[0])
    assert line["endpoint"] == "completion"
    assert 200 <= line["ttft_ms"] <= line["latency_ms"]
    # the engine's 200 ms are not the proxy's
    assert 0 <= line["overhead_ms"] < 100 < line["latency_ms"]
    assert line["overhead_ms"] == round(
        value(p.services.metrics, "frugal_proxy_overhead_seconds_sum", tier="open") * 1000, 3
    )


async def test_an_engine_failure_log_names_the_request(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", fail_fraction=1.0, fail_status=500)
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    with structlog.testing.capture_logs() as logs:
        resp = await p.client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 502
    failures = [e for e in logs if e["event"] == "engine.replica_failed"]
    assert failures
    # The access line of this 502 and the replica's failure share the request's id.
    assert {e.get("request_id") for e in failures} == {resp.headers["x-request-id"]}


async def test_a_made_up_model_name_cannot_blow_up_the_access_line(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m")
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    buffer = io.BytesIO()
    p.services.access_log = AccessLog(json=True, stream=buffer)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "x" * 100_000})
    assert resp.status == 404
    await wait_until(lambda: b"\n" in buffer.getvalue())
    raw = buffer.getvalue().splitlines()[0]
    assert len(raw) < 2000
    line = orjson.loads(raw)
    assert line["model"].startswith("x" * 128)
    assert line["model"].endswith("(100000 characters)")


async def test_waiting_for_a_busy_engines_slot_is_not_proxy_overhead(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # A first token long enough that the second request's wait dwarfs what a loaded test box
    # adds to the proxy's own time, and short of the open tier's 2 s limit on queueing.
    engine = await start_fake("m", ttft_ms=1500)
    p = await start_proxy([engine_config("e", "m", [engine.url], max_concurrency=1)])
    bodies = [
        {**CHAT, "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(2)
    ]
    first = asyncio.create_task(p.client.post("/v1/chat/completions", json=bodies[0]))
    await wait_until(lambda: engine.state.in_flight == 1)
    second = await p.client.post("/v1/chat/completions", json=bodies[1])  # queues for the slot
    assert (await first).status == second.status == 200
    await wait_until(lambda: finished(p, 200) == 2)
    metrics = p.services.metrics
    waited = value(metrics, "frugal_queue_wait_seconds_sum", engine="e", tier="open")
    overhead = value(metrics, "frugal_proxy_overhead_seconds_sum", tier="open")
    assert waited >= 0.8  # the second waited for the first's engine time
    # That wait is the engine's capacity, counted in frugal_queue_wait_seconds, not overhead
    # (counted as overhead, the sum would be at least the wait).
    assert overhead < waited / 2, (overhead, waited)


async def test_a_replica_that_goes_down_stops_reporting_its_last_batch(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", tokens_per_s=5, completion_tokens=200)
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    metrics = p.services.metrics
    labels = {"engine": "e", "replica": engine.url}

    def gauge(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    streams = [
        await p.client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True, "messages": [{"role": "user", "content": f"q{i}"}]},
        )
        for i in range(3)
    ]
    await wait_until(lambda: gauge("frugal_engine_requests_running") == 3)
    assert gauge("frugal_engine_requests_running") == 3
    assert (gauge("frugal_engine_kv_cache_usage_ratio") or 0.0) > 0
    for resp in streams:
        resp.close()
    await engine.server.close()  # the replica dies
    await wait_until(lambda: gauge("frugal_engine_up") == 0)
    assert gauge("frugal_engine_up") == 0
    # Its batch and KV cache are gone with it, not frozen at their last values.
    assert gauge("frugal_engine_requests_running") == 0
    assert gauge("frugal_engine_kv_cache_usage_ratio") == 0
    assert p.services.metrics.snapshot()["engines"]["e"]["running"] == 0


async def test_the_access_line_tells_a_shared_answer_from_a_cached_one(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine = await start_fake("m", ttft_ms=300)
    p = await start_proxy(
        [engine_config("e", "m", [engine.url])],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )
    buffer = io.BytesIO()
    p.services.access_log = AccessLog(json=True, stream=buffer)
    leader = asyncio.create_task(p.client.post("/v1/chat/completions", json=CHAT))
    await wait_until(lambda: engine.state.in_flight == 1)
    follower = await p.client.post("/v1/chat/completions", json=CHAT)
    assert follower.headers.get("x-frugal-cache-coalesced") == "1"
    await (await leader).read()
    await wait_until(lambda: buffer.getvalue().count(b"\n") == 2)
    lines = {line["request_id"]: line for line in map(orjson.loads, buffer.getvalue().splitlines())}
    shared = lines[follower.headers["x-request-id"]]
    assert (shared["cache"], shared["coalesced"]) == ("hit-exact", True)
    assert [line["coalesced"] for line in lines.values()].count(False) == 1  # the leader
