"""/metrics against what actually happened to a known sequence of requests through the proxy."""

from __future__ import annotations

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
