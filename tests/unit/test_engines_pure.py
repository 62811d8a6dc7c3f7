from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from proxy.engines.autoversion import version_due
from proxy.engines.breaker import CircuitBreaker
from proxy.engines.health import parse_vllm_metrics
from proxy.engines.pool import Engine, Replica, ReplicaLoad, choose_replica, retry_after_s
from proxy.engines.version import derive_version, folder_digest, model_card, next_version
from proxy.settings import EngineSettings


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


def test_a_stream_answering_closes_a_half_open_breaker_and_nothing_else() -> None:
    b = CircuitBreaker(failure_threshold=2, open_s=10)
    b.on_failure(0.0)
    b.on_answering()  # closed: a stream's first token says nothing about past failures
    assert b.state == "closed" and b.failures == 1
    b.on_failure(0.0)
    assert b.state == "open"
    b.on_answering()  # open: no probe has answered
    assert b.state == "open"
    assert b.acquire(10.0) and b.state == "half_open" and not b.acquire(10.0)
    b.on_answering()  # the probe's first token
    assert b.state == "closed" and b.acquire(10.0)


def test_only_the_probe_frees_the_half_open_slot() -> None:
    b = CircuitBreaker(failure_threshold=1, open_s=10)
    assert b.acquire(0.0)  # a long answer, sent while the breaker was closed
    b.on_failure(1.0)  # another request fails: open
    assert b.acquire(11.0) and b.state == "half_open"  # the probe
    b.release(probe=False)  # the long answer's client leaves
    assert not b.acquire(11.0)  # the probe is still out: no second one
    b.release(probe=True)  # the probe's client leaves
    assert b.acquire(11.0)


def test_an_engine_is_ready_while_a_healthy_replica_s_breaker_lets_requests_through() -> None:
    settings = EngineSettings(name="e", model="m", urls=["http://a", "http://b"])
    engine = Engine.from_settings(settings)
    a, b = engine.replicas
    a.healthy, b.healthy = True, False
    assert engine.ready_at(0.0)
    a.breaker._open(0.0)
    assert engine.ready and not engine.ready_at(1.0)  # healthy, but every request refused
    assert engine.ready_at(a.breaker.open_s)  # its probe is due
    b.healthy = True
    assert engine.ready_at(1.0)


@given(
    opened=st.lists(st.floats(min_value=0, max_value=100), max_size=4),
    open_s=st.floats(min_value=0.1, max_value=60),
    now=st.floats(min_value=0, max_value=200),
    closed=st.integers(min_value=0, max_value=2),
)
def test_retry_after_is_the_soonest_reopening_in_whole_seconds(
    opened: list[float], open_s: float, now: float, closed: int
) -> None:
    replicas = [replica(f"http://r{i}") for i in range(len(opened) + closed)]
    for r, at in zip(replicas, opened, strict=False):
        r.breaker = CircuitBreaker(open_s=open_s)
        r.breaker._open(min(at, now))
    wait = retry_after_s(replicas, now)
    assert wait >= 1
    due = [r.breaker.reopens_in(now) for r in replicas if r.breaker.state == "open"]
    if due:
        # never before the soonest replica can take a probe, and not a whole second later
        assert min(due) <= wait < max(1.0, min(due)) + 1
        assert any(r.breaker.available(now + wait + 1e-9) for r in replicas)
    else:
        assert wait == 1


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


def test_what_else_shapes_the_answers_changes_the_version() -> None:
    same = dict(model="m", root="/m", max_model_len=4096, folder_digest="d")
    plain = derive_version(**same)  # type: ignore[arg-type]
    bf16 = derive_version(**same, extra="dtype=bfloat16")  # type: ignore[arg-type]
    fp32 = derive_version(**same, extra="dtype=float32")  # type: ignore[arg-type]
    assert len({plain, bf16, fp32}) == 3
    # no extra: the version an earlier release derived for the same engine
    assert plain == "m@" + hashlib.sha256(b"m\x00/m\x004096\x00d").hexdigest()[:12]


def test_model_card() -> None:
    payload = {"data": [{"id": "a"}, {"id": "b", "root": "/w"}]}
    assert model_card(payload, "b") == {"id": "b", "root": "/w"}
    assert model_card(payload, "c") is None
    assert model_card({}, "a") is None


# ---- version: auto followed across redeploys -------------------------------------------------


def test_the_current_version_stands_while_a_healthy_replica_serves_it() -> None:
    assert next_version("v1", ["v1", "v2"]) == "v1"  # a rolling redeploy, half done
    assert next_version("v1", ["v1", None]) == "v1"
    assert next_version("v1", []) == "v1"  # nothing healthy: nothing to go by
    assert next_version("v1", [None, None]) == "v1"


def test_the_engine_moves_when_the_healthy_replicas_agree_on_a_new_version() -> None:
    assert next_version("v1", ["v2", "v2"]) == "v2"
    assert next_version("v1", ["v2", None]) == "v2"  # one not asked yet is out of rotation anyway
    assert next_version(None, ["v1"]) == "v1"  # the first version known
    assert next_version("v1", ["v2", "v3"]) == "v1"  # no agreement: no move
    assert next_version(None, ["v2", "v3"]) is None


def _engine(version: str, *reported: str | None) -> Engine:
    urls = [f"http://r{i}" for i in range(len(reported))]
    engine = Engine.from_settings(EngineSettings(name="e", model="m", version=version, urls=urls))
    for replica, seen in zip(engine.replicas, reported, strict=True):
        replica.healthy, replica.version = True, seen
    return engine


def test_an_auto_engine_takes_only_replicas_that_reported_its_version() -> None:
    engine = _engine("auto", "v1", "v2", None)
    engine.version = "v1"
    first, odd, unknown = engine.replicas
    assert engine.required_version == "v1"
    assert [engine.in_rotation(r) for r in engine.replicas] == [True, False, False]
    for key in (bytes([i]) for i in range(32)):
        chosen = choose_replica(engine.replicas, affinity=key, now=0, version="v1")
        assert chosen is first
    assert choose_replica([odd, unknown], affinity=None, now=0, version="v1") is None
    assert engine.ready
    first.healthy = False
    assert not engine.ready  # healthy replicas, but none serves the engine's version


def test_an_auto_engine_of_unknown_version_and_a_fixed_one_take_any_replica() -> None:
    unknown = _engine("auto", "v1", None)
    assert unknown.required_version is None
    assert all(unknown.in_rotation(r) for r in unknown.replicas)
    fixed = _engine("2024-06", "v1", "v2")
    assert fixed.version == "2024-06" and fixed.required_version is None
    assert all(fixed.in_rotation(r) for r in fixed.replicas) and fixed.ready


def test_a_replica_is_asked_its_version_when_unknown_else_periodically() -> None:
    r = replica("http://r")
    assert version_due(r, now=100, interval_s=30)  # never asked
    r.version, r.version_at = "v1", 100.0
    assert not version_due(r, now=129, interval_s=30)
    assert version_due(r, now=130, interval_s=30)
    r.version = None  # back from down: asked again at once
    assert version_due(r, now=101, interval_s=30)
