from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.engines.breaker import CircuitBreaker
from proxy.engines.health import parse_vllm_metrics
from proxy.engines.pool import Replica, ReplicaLoad, choose_replica
from proxy.engines.version import derive_version, folder_digest, model_card


def replica(url: str, inflight: int = 0, healthy: bool | None = True) -> Replica:
    return Replica(url=url, breaker=CircuitBreaker(), healthy=healthy, inflight=inflight)


def test_breaker_opens_after_threshold_and_half_opens_once() -> None:
    b = CircuitBreaker(failure_threshold=2, open_s=10)
    assert b.acquire(0)
    b.on_failure(0)
    assert b.state == "closed"
    b.on_failure(1)
    assert b.state == "open"
    assert not b.available(5) and not b.acquire(5)
    assert b.available(11)
    assert b.acquire(11)  # the probe
    assert b.state == "half_open"
    assert not b.acquire(11.5)  # only one probe at a time
    b.on_failure(12)
    assert b.state == "open" and not b.acquire(13)
    assert b.acquire(22)
    b.on_success()
    assert b.state == "closed" and b.acquire(22) and b.acquire(22)


def test_breaker_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=3)
    b.on_failure(0)
    b.on_failure(0)
    b.on_success()
    b.on_failure(0)
    b.on_failure(0)
    assert b.state == "closed"


urls = st.lists(st.sampled_from([f"http://r{i}" for i in range(8)]), min_size=1, unique=True)


@given(urls, st.lists(st.integers(0, 50), min_size=8, max_size=8), st.binary(max_size=16))
def test_choice_is_a_candidate_and_never_much_busier_than_the_least(
    names: list[str], loads: list[int], key: bytes
) -> None:
    replicas = [replica(u, inflight=loads[i]) for i, u in enumerate(names)]
    chosen = choose_replica(replicas, affinity=key, now=0)
    assert chosen in replicas
    least = min(r.pressure for r in replicas)
    assert chosen is not None and chosen.pressure <= least + max(4, 0.5 * least)


@given(urls, st.binary(min_size=1, max_size=16))
def test_same_conversation_same_replica_when_idle(names: list[str], key: bytes) -> None:
    replicas = [replica(u) for u in names]
    first = choose_replica(replicas, affinity=key, now=0)
    assert all(choose_replica(replicas, affinity=key, now=0) is first for _ in range(3))
    # Removing another replica does not move this conversation.
    others = [r for r in replicas if r is not first]
    if others:
        fewer = [r for r in replicas if r is not others[0]]
        assert choose_replica(fewer, affinity=key, now=0) is first


def test_unhealthy_open_and_excluded_replicas_are_skipped() -> None:
    down, opened, ok = replica("http://a", healthy=False), replica("http://b"), replica("http://c")
    opened.breaker.state, opened.breaker.opened_at = "open", 0.0
    assert choose_replica([down, opened, ok], affinity=b"k", now=1) is ok
    assert choose_replica([down, opened, ok], affinity=b"k", now=1, exclude=[ok]) is None
    unknown = replica("http://d", healthy=None)  # not polled yet: worth a try
    assert choose_replica([unknown], affinity=None, now=0) is unknown


def test_busy_preferred_replica_yields_to_an_idle_one() -> None:
    a, b = replica("http://a"), replica("http://b")
    key = next(
        bytes([i]) for i in range(256) if choose_replica([a, b], affinity=bytes([i]), now=0) is a
    )
    a.load = ReplicaLoad(running=30, waiting=10)
    assert choose_replica([a, b], affinity=key, now=0) is b


def test_parse_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_running Number of requests
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prompt_tokens_total{model_name="m"} 1234.0
garbage line
"""
    load = parse_vllm_metrics(text)
    assert (load.running, load.waiting, load.kv_usage) == (3.0, 3.0, 0.5)
    assert parse_vllm_metrics("vllm:gpu_cache_usage_perc 0.75").kv_usage == 0.75


def test_version_changes_with_weights_and_is_stable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    d1 = folder_digest(tmp_path)
    v1 = derive_version(model="m", root="/m", max_model_len=4096, folder_digest=d1)
    assert v1 == derive_version(model="m", root="/m", max_model_len=4096, folder_digest=d1)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 100)
    v2 = derive_version(
        model="m", root="/m", max_model_len=4096, folder_digest=folder_digest(tmp_path)
    )
    assert v1 != v2
    assert v1 != derive_version(model="m", root="/m", max_model_len=2048, folder_digest=d1)
    assert v1.startswith("m@")
    assert folder_digest(tmp_path / "missing") is None


def test_model_card() -> None:
    payload = {"data": [{"id": "a"}, {"id": "b", "root": "/w"}]}
    assert model_card(payload, "b") == {"id": "b", "root": "/w"}
    assert model_card(payload, "c") is None
    assert model_card({}, "a") is None
