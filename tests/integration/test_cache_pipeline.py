"""The response cache in the request path, against fake engines: exact and semantic hits, SSE
replay, what is and is not stored, single-flight, versions and partitions."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from proxy.sse import parse_all
from tests.integration.conftest import Proxy, StartFake, StartProxy, engine_config, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"model": "m", "messages": QUESTION, "temperature": 0, "max_tokens": 8}


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A stand-in embedder: same words (in any order, any case) give the same unit vector."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 384] += 1.0
        norm = np.linalg.norm(out[row])
        if norm:
            out[row] /= norm
    return out


async def cached_proxy(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, **sections: Any
) -> tuple[Any, Proxy]:
    engine = await start_fake("m")
    proxy = await start_proxy(
        [engine_config("e", "m", [engine.url])],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache"), **sections.pop("cache", {})},
        **sections,
    )
    return engine, proxy


async def in_flight(proxy: Proxy, *, followers: int = 0) -> None:
    """Wait (bounded) until one single-flight is up with ``followers`` joined: what a fixed sleep
    only hopes for on a loaded machine."""
    flights = proxy.services.flights._flights

    def joined() -> bool:
        return len(flights) == 1 and next(iter(flights.values())).waiters == followers

    await wait_until(joined, timeout_s=10)
    assert joined(), [f.waiters for f in flights.values()]


async def post_until(proxy: Proxy, body: dict[str, Any], cache: str, **kw: Any) -> Any:
    """Post once the background stores are written, and expect ``cache``."""
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    resp = await proxy.client.post("/v1/chat/completions", json=body, **kw)
    assert resp.headers["x-frugal-cache"] == cache, resp.headers
    return resp


async def test_exact_hit_serves_the_same_answer_without_the_engine(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    first = await proxy.client.post("/v1/chat/completions", json=GREEDY)
    assert first.headers["x-frugal-cache"] == "miss"
    answer = await first.json()
    hit = await post_until(proxy, GREEDY, "hit-exact")
    served = await hit.json()
    assert {**served, "id": answer["id"], "created": answer["created"]} == answer
    assert hit.headers["x-frugal-model-version"] == first.headers["x-frugal-model-version"]
    assert "x-frugal-cache-age" in hit.headers
    assert engine.state.counters.requests == 1
    # Key order and whitespace do not change the key.
    raw = (
        b'{ "max_tokens":8,"temperature":0.0, "messages":[{"content":'
        b'"What is the capital of France?","role":"user"}],"model":"m"}'
    )
    again = await proxy.client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert again.headers["x-frugal-cache"] == "hit-exact"
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'frugal_cache_hits_total{kind="exact"' in metrics


async def test_streamed_answer_is_stored_and_replayed_both_ways(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    streamed = await proxy.client.post("/v1/chat/completions", json={**GREEDY, "stream": True})
    events = [orjson.loads(p) for p in parse_all(await streamed.read())[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    as_json = await post_until(proxy, GREEDY, "hit-exact")
    body = await as_json.json()
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["completion_tokens"] > 0
    replay = await proxy.client.post(
        "/v1/chat/completions",
        json={**GREEDY, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert replay.headers["x-frugal-cache"] == "hit-exact"
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    payloads = parse_all(await replay.read())
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    replayed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert replayed == text
    assert chunks[-1]["usage"] == body["usage"]
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    assert engine.state.counters.requests == 1


async def test_every_replay_gets_its_own_id_and_created(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    first = await (await proxy.client.post("/v1/chat/completions", json=GREEDY)).json()
    before = int(time.time())
    responses = [await post_until(proxy, GREEDY, "hit-exact") for _ in range(2)]
    hits = [await r.json() for r in responses]
    # named after the request it was served to, as vLLM names a miss's answer
    assert hits[0]["id"] == "chatcmpl-" + responses[0].headers["x-request-id"]
    replay = await post_until(proxy, {**GREEDY, "stream": True}, "hit-exact")
    chunks = [orjson.loads(p) for p in parse_all(await replay.read())[:-1]]
    ids = {first["id"], *(h["id"] for h in hits), chunks[0]["id"]}
    assert len(ids) == 4, ids
    assert all(i.startswith("chatcmpl-") for i in ids - {first["id"]})
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}  # one id across a replayed stream
    assert all(h["created"] >= before for h in hits)
    assert all(c["created"] >= before for c in chunks)
    prompt = {"model": "m", "prompt": "Say hi", "temperature": 0, "max_tokens": 8}
    await proxy.client.post("/v1/completions", json=prompt)
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    completion = await proxy.client.post("/v1/completions", json=prompt)
    assert completion.headers["x-frugal-cache"] == "hit-exact"
    assert (await completion.json())["id"].startswith("cmpl-")
    assert engine.state.counters.requests == 2


async def test_sampled_requests_bypass_and_are_never_stored(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    sampled = {"model": "m", "messages": QUESTION, "max_tokens": 8}  # default temperature 1
    for _ in range(3):
        resp = await proxy.client.post("/v1/chat/completions", json=sampled)
        assert resp.headers["x-frugal-cache"] == "bypass"
        await asyncio.sleep(0.05)
    assert engine.state.counters.requests == 3
    seeded = {**sampled, "seed": 11}
    await proxy.client.post("/v1/chat/completions", json=seeded)
    assert (await post_until(proxy, seeded, "hit-exact")).status == 200


async def test_cache_control_no_cache_and_no_store(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    no_store = await proxy.client.post(
        "/v1/chat/completions", json=GREEDY, headers={"Cache-Control": "no-store"}
    )
    assert no_store.status == 200
    await asyncio.sleep(0.2)
    assert (await proxy.client.post("/v1/chat/completions", json=GREEDY)).headers[
        "x-frugal-cache"
    ] == "miss"
    await post_until(proxy, GREEDY, "hit-exact")
    fresh = await proxy.client.post(
        "/v1/chat/completions", json=GREEDY, headers={"Cache-Control": "no-cache"}
    )
    assert fresh.headers["x-frugal-cache"] == "bypass"
    assert engine.state.counters.requests == 3


async def test_unfinished_answers_are_not_stored(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    engine.configure(abort_after_chunks=3, completion_tokens=30)
    body = {**GREEDY, "stream": True, "max_tokens": 30}
    cut = await proxy.client.post("/v1/chat/completions", json=body)
    assert b'"error"' in await cut.read()
    engine.configure(abort_after_chunks=None)
    await asyncio.sleep(0.2)
    resp = await proxy.client.post("/v1/chat/completions", json=body)
    assert resp.headers["x-frugal-cache"] == "miss"
    await resp.read()


async def test_identical_concurrent_misses_make_one_engine_call(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    # Long enough that every follower arrives while the leader waits, even on a loaded machine.
    engine.configure(ttft_ms=1500, tokens_per_s=200)
    plain = [proxy.client.post("/v1/chat/completions", json=GREEDY) for _ in range(4)]
    streamed = [
        proxy.client.post("/v1/chat/completions", json={**GREEDY, "stream": True}) for _ in range(4)
    ]
    responses = await asyncio.gather(*plain, *streamed)
    assert all(r.status == 200 for r in responses)
    texts = [(await r.json())["choices"][0]["message"]["content"] for r in responses[:4]]
    for r in responses[4:]:
        events = [orjson.loads(p) for p in parse_all(await r.read())[:-1]]
        texts.append(
            "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        )
    assert len(set(texts)) == 1 and texts[0]
    assert engine.state.counters.requests == 1
    assert sum(r.headers.get("x-frugal-cache-coalesced") == "1" for r in responses) == 7


async def test_failed_leader_does_not_leave_followers_hanging(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    engine.configure(ttft_ms=200, fail_fraction=1.0, fail_status=500)
    responses = await asyncio.wait_for(
        asyncio.gather(*(proxy.client.post("/v1/chat/completions", json=GREEDY) for _ in range(3))),
        timeout=10,
    )
    assert all(r.status >= 500 for r in responses)
    for r in responses:
        assert "error" in await r.json()


async def test_a_leader_failing_mid_stream_ends_or_frees_its_followers(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    # (a first token late enough that both others join while the leader waits for it)
    engine.configure(abort_after_chunks=4, completion_tokens=30, ttft_ms=1500)
    streamed = {**GREEDY, "max_tokens": 30, "stream": True}
    leader = asyncio.create_task(proxy.client.post("/v1/chat/completions", json=streamed))
    await in_flight(proxy)  # the leader is waiting for its first token
    plain = asyncio.create_task(
        proxy.client.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 30})
    )
    follower = asyncio.create_task(proxy.client.post("/v1/chat/completions", json=streamed))
    for task in (leader, follower):
        resp = await asyncio.wait_for(task, timeout=10)
        events = parse_all(await resp.read())
        # the stream broke after it began: its last events are an error, then [DONE]
        assert events[-1] == b"[DONE]"
        assert "error" in orjson.loads(events[-2])
    resp = await asyncio.wait_for(plain, timeout=10)
    # Not streamed, so it had been sent nothing: it asked the engine itself instead of failing
    # with the leader (the engine cuts that request too, and says so as its own failure).
    assert resp.headers["x-frugal-cache"] == "miss"
    assert "error" in await resp.json()
    assert engine.state.counters.requests >= 2  # the leader's and the follower's own


async def test_a_streaming_leader_that_leaves_does_not_take_its_followers_down(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    # a 1.5 s stream: the follower joins while it runs, even on a loaded machine
    engine.configure(tokens_per_s=20, completion_tokens=30)
    streamed = {**GREEDY, "max_tokens": 30, "stream": True}
    leader = await proxy.client.post("/v1/chat/completions", json=streamed)
    await leader.content.readany()  # the leader's stream has begun
    follower = asyncio.create_task(proxy.client.post("/v1/chat/completions", json=streamed))
    await in_flight(proxy, followers=1)  # the follower has joined the flight
    leader.close()  # the leader's client leaves mid-stream
    resp = await asyncio.wait_for(follower, timeout=10)
    events = parse_all(await asyncio.wait_for(resp.read(), timeout=10))
    assert resp.headers["x-frugal-cache"] == "hit-exact"  # it shared the leader's answer
    assert events[-1] == b"[DONE]"
    assert not any(b'"error"' in e for e in events)
    finishes = [
        c["choices"][0]["finish_reason"] for c in map(orjson.loads, events[:-1]) if c.get("choices")
    ]
    assert finishes[-1] in ("stop", "length")  # the whole answer, to its end
    assert engine.state.counters.aborted == 0 and engine.state.counters.requests == 1
    # ... and the answer read for the follower was stored for everyone
    again = await post_until(proxy, {**GREEDY, "max_tokens": 30}, "hit-exact")
    assert again.status == 200
    assert proxy.services.engines[0].replicas[0].inflight == 0


async def test_a_stop_ends_the_followers_of_a_leader_that_left_with_an_error_event(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The rest of a stream whose client left is read in the background for its followers: the
    stop must cut it as it cuts the streams it feeds (proxy/stopping.py), or the followers are
    cut mid-stream with no error event at aiohttp's deadline, and the drain waits for the
    engine's whole answer (seen: 18 s to stop with shutdown_timeout_s 6)."""
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    engine.configure(tokens_per_s=20, completion_tokens=400)  # a 20 s answer
    streamed = {**GREEDY, "max_tokens": 400, "stream": True}
    leader = await proxy.client.post("/v1/chat/completions", json=streamed)
    await leader.content.readany()  # the leader's stream has begun
    follower = await proxy.client.post("/v1/chat/completions", json=streamed)
    await in_flight(proxy, followers=1)
    leader.close()  # the leader's client leaves: the rest is read in the background
    cache = proxy.services.cache
    assert cache is not None
    await wait_until(lambda: bool(cache._tasks))  # (the hand-off: the only background task)
    await follower.content.readuntil(b"\n\n")  # the follower is being streamed to
    proxy.services.streams.cut()  # the stop's first deadline
    events = parse_all(await asyncio.wait_for(follower.read(), timeout=3))
    # (before: the follower streamed on to the end of the answer; the cut did not reach it)
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "shutting_down"
    await asyncio.wait_for(cache.drain(), timeout=3)  # nothing left reading
    await wait_until(lambda: engine.state.counters.aborted == 1)
    assert engine.state.counters.aborted == 1  # the engine was told to stop
    assert proxy.services.engines[0].replicas[0].inflight == 0


async def test_a_coalesced_stream_gets_usage_only_when_its_client_asked(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    engine.configure(ttft_ms=1500)  # the follower joins while the leader waits
    streamed = {**GREEDY, "stream": True}  # no stream_options: no usage chunk wanted
    leader = asyncio.create_task(proxy.client.post("/v1/chat/completions", json=streamed))
    await in_flight(proxy)
    follower = await proxy.client.post("/v1/chat/completions", json=streamed)
    assert follower.headers.get("x-frugal-cache-coalesced") == "1"
    for resp in (await leader, follower):
        chunks = [orjson.loads(p) for p in parse_all(await resp.read())[:-1]]
        assert chunks and not [c for c in chunks if c.get("usage")]


async def test_a_new_model_version_never_sees_old_entries(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    await proxy.client.post("/v1/chat/completions", json=GREEDY)
    await post_until(proxy, GREEDY, "hit-exact")
    old_version = proxy.services.engines[0].version
    await proxy.client.close()
    # Redeploy: other weights behind the same model name.
    engine.state.options = dataclasses.replace(engine.state.options, root="/models/m-v2")
    again = await start_proxy(
        [engine_config("e", "m", [engine.url])],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache")},
    )
    resp = await again.client.post("/v1/chat/completions", json=GREEDY)
    assert resp.headers["x-frugal-model-version"] != old_version
    assert resp.headers["x-frugal-cache"] == "miss"
    stats = await (await again.client.get("/admin/cache/stats")).json()
    assert stats["stored_entries"] in (0, 1)  # the old version's entry was purged


async def test_user_scope_partitions_never_share(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "user"})
    alice = {**GREEDY, "user": "alice"}
    await proxy.client.post("/v1/chat/completions", json=alice)
    await post_until(proxy, alice, "hit-exact")
    bob = await proxy.client.post("/v1/chat/completions", json={**GREEDY, "user": "bob"})
    assert bob.headers["x-frugal-cache"] == "miss"
    # OpenAI's newer safety_identifier names the end user when `user` is absent
    # (before: every such request shared the one user-less partition)
    for end_user in ("carol", "dave"):
        await post_until(proxy, {**GREEDY, "safety_identifier": end_user}, "miss")
    # the same end user as `user: alice`
    await post_until(proxy, {**GREEDY, "safety_identifier": "alice"}, "hit-exact")


async def test_semantic_hit_on_a_paraphrase_and_miss_on_another_question(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, aiohttp_client: Any
) -> None:
    client, services = await semantic_app(start_fake, tmp_path, aiohttp_client, encode=bag_of_words)
    original = {**GREEDY, "messages": [{"role": "user", "content": "capital city of France"}]}
    first = await client.post("/v1/chat/completions", json=original)
    answer = await first.json()
    paraphrase = {
        **GREEDY,
        "messages": [{"role": "user", "content": "France: capital city of?"}],
    }
    cache = services.cache
    assert cache is not None
    await cache.drain()
    resp = await client.post("/v1/chat/completions", json=paraphrase)
    assert resp.headers["x-frugal-cache"] == "hit-semantic"
    assert float(resp.headers["x-frugal-cache-similarity"]) > 0.9
    assert (await resp.json())["choices"] == answer["choices"]
    other = {**GREEDY, "messages": [{"role": "user", "content": "largest river in Brazil"}]}
    resp = await client.post("/v1/chat/completions", json=other)
    assert resp.headers["x-frugal-cache"] == "miss"
    # Same question in another conversation context: never a semantic hit.
    context = {
        **paraphrase,
        "messages": [{"role": "system", "content": "answer in German"}, *paraphrase["messages"]],
    }
    resp = await client.post("/v1/chat/completions", json=context)
    assert resp.headers["x-frugal-cache"] == "miss"
    # One outcome a request, though each miss looked up twice (before and after routing).
    lookups = (await cache.stats()).lookups
    assert (lookups["miss"], lookups["semantic"], lookups["exact"]) == (3, 1, 0)


def ask(text: str) -> dict[str, Any]:
    return {**GREEDY, "messages": [{"role": "user", "content": text}]}


async def semantic_app(
    start_fake: StartFake,
    tmp_path: Path,
    aiohttp_client: Any,
    *,
    engine: Any = None,
    encode: Any = None,
    embeddings: dict[str, Any] | None = None,
    **cache: Any,
) -> tuple[Any, Any]:
    """A test client for an app with the semantic cache (and ``cache`` settings) in front of
    ``engine`` (default: a new fake engine serving "m"), and its services. ``encode`` stands in
    for the real model. The wait for a vector is unbounded unless ``embeddings`` says otherwise:
    a test of what a lookup finds must not see it skipped because the host was busy."""
    from proxy.app import SERVICES, create_app
    from proxy.settings import Settings

    if engine is None:
        engine = await start_fake("m")
    settings = Settings.model_validate(
        {
            "engines": [engine_config("e", "m", [engine.url])],
            "policies": None,
            "data_dir": str(tmp_path / "data"),
            "health": {"interval_s": 0.1},
            "cache": {"enabled": True, "semantic": True, **cache},
            "routing": {"enabled": False},
            "embeddings": embeddings if embeddings is not None else {"max_queue_ms": None},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    client = await aiohttp_client(create_app(settings, encode=encode, access_log=False))
    assert client.server.app is not None
    return client, client.server.app[SERVICES]


async def serves_a_paraphrase_and_refuses_a_negation(client: Any, services: Any) -> None:
    cache = services.cache
    assert cache is not None
    first = await client.post(
        "/v1/chat/completions", json=ask("How do I reverse a list in Python?")
    )
    assert first.headers["x-frugal-cache"] == "miss"
    await cache.drain()
    same = await client.post(
        "/v1/chat/completions", json=ask("How can I reverse a list in Python?")
    )
    assert same.headers["x-frugal-cache"] == "hit-semantic"
    negated = await client.post(
        "/v1/chat/completions", json=ask("How do I not reverse a list in Python?")
    )
    assert negated.headers["x-frugal-cache"] == "miss"


def encoder_children() -> list[int]:
    """Pids of this process's encoder children (proxy/embeddings/process.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        alive = stat[0] != "Z"  # (a killed child stays a zombie until the pool reaps it)
        if alive and int(stat[1]) == os.getpid() and b"proxy.embeddings.process" in command:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_trained_verifier_serves_paraphrases_and_refuses_near_misses(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any, isolation: str
) -> None:
    """The real path: fused MiniLM embedding, ANN search, guards and the trained verifier; the
    encoder in child processes (the default) or on the proxy's threads."""
    from threadpoolctl import threadpool_info, threadpool_limits

    # The proxy runs numpy's BLAS on one thread (its helper threads spin on two cores): start
    # from two so the app's own limit is what is checked.
    before = threadpool_limits(2, user_api="blas")
    from proxy.cache import packed_encoder
    from proxy.cache.verifier import CacheVerifier
    from proxy.embeddings.process import PooledEncoder

    client, services = await semantic_app(
        start_fake,
        tmp_path,
        aiohttp_client,
        embeddings={"max_queue_ms": None, "isolation": isolation, "threads": 2},
    )
    assert services.verifier is not None
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    before.restore_original_limits()
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
    assert isinstance(services.verifier, CacheVerifier)
    encoder = services.verifier.verifier.encoder
    if isolation == "thread":
        # the proxy's encoder: the packed runtime, a long lone text unsplit after a pause
        assert isinstance(encoder, packed_encoder.PackedEncoder)
        assert encoder._split_idle_s == packed_encoder.SPLIT_IDLE_S
        assert encoder_children() == []
    else:
        # one child, encoding on the worker's two threads
        assert isinstance(encoder, PooledEncoder)
        assert len(encoder_children()) == 1

    await serves_a_paraphrase_and_refuses_a_negation(client, services)
    if isolation == "process":
        # A lost encoder process is replaced, and the cache goes on serving by meaning.
        for pid in encoder_children():
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: encoder_children() == [], timeout_s=10)
        assert encoder_children() == []
        first = await client.post(
            "/v1/chat/completions", json=ask("What is the capital of France?")
        )
        assert first.headers["x-frugal-cache"] == "miss"
        await services.cache.drain()
        same = await client.post("/v1/chat/completions", json=ask("What's the capital of France?"))
        assert same.headers["x-frugal-cache"] == "hit-semantic"
        assert len(encoder_children()) == 1  # replaced
        assert len(encoder_children()) >= 1
    other_language = await client.post(
        "/v1/chat/completions", json=ask("How do I reverse a list in Java?")
    )
    assert other_language.headers["x-frugal-cache"] == "miss"
    shaped = await client.post(
        "/v1/chat/completions", json=ask("How do I reverse a list in Python, step by step?")
    )
    assert shaped.headers["x-frugal-cache"] == "miss"
    # /metrics says why: the guards refused the most similar stored question
    metrics = await (await client.get("/metrics")).text()
    refusals = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("frugal_cache_semantic_refusals_total{")
    }
    assert refusals.get("veto_negation", 0) >= 1
    assert refusals.get("veto_entity", 0) >= 1  # "in Java" against "in Python"
    assert refusals.get("veto_instruction", 0) >= 1  # "step by step" asks for another answer

    # Past MiniLM's 128 word pieces two questions after the same pasted context embed alike
    # (cosine 1.0, and the head accepts): they are matched exactly only.
    batches: list[int] = []
    services.embedder._on_batch = lambda size, *_: batches.append(size)
    flask = "We run a Flask service behind gunicorn with a pool of ten connections. "
    cases = (
        (flask * 8, 1),  # 576 characters: only the pass can tell it is cut
        ("Check these flags: " + "ok " * 140, 0),  # more words than pieces: no pass
        (flask * 16, 0),  # over the 1,000-character limit: no pass
    )
    for context, passes in cases:
        batches.clear()
        first = await client.post("/v1/chat/completions", json=ask(context + "What's the cause?"))
        assert first.headers["x-frugal-cache"] == "miss"
        await services.cache.drain()
        other = await client.post("/v1/chat/completions", json=ask(context + "How big a pool?"))
        assert other.headers["x-frugal-cache"] == "miss"
        again = await client.post("/v1/chat/completions", json=ask(context + "What's the cause?"))
        assert again.headers["x-frugal-cache"] == "hit-exact"
        assert len(batches) == 2 * passes  # the two questions; the exact hit needs none
    # /metrics says why those misses were matched exactly only
    metrics = (await (await client.get("/metrics")).text()).splitlines()
    assert 'frugal_cache_exact_only_total{reason="past_window"} 4.0' in metrics
    assert 'frugal_cache_exact_only_total{reason="too_long"} 2.0' in metrics

    # Texts that differ only where the encoder is blind embed alike (cosine 1.0): an emoji is
    # one unknown word piece, whitespace and control characters are none. Never served for
    # each other.
    blind = (("Is 🍎 healthy for dogs?", "Is 🍌 healthy for dogs?"), ("   \n\t ", "\u0000\u0000"))
    for first_text, second_text in blind:
        first = await client.post("/v1/chat/completions", json=ask(first_text))
        assert first.headers["x-frugal-cache"] == "miss"
        await services.cache.drain()
        second = await client.post("/v1/chat/completions", json=ask(second_text))
        assert second.headers["x-frugal-cache"] == "miss", second_text
    metrics = (await (await client.get("/metrics")).text()).splitlines()
    assert 'frugal_cache_exact_only_total{reason="no_words"} 2.0' in metrics
    assert 'frugal_cache_semantic_refusals_total{reason="veto_unknown_word"} 1.0' in metrics


async def test_the_cross_encoder_runs_packed_in_the_proxy(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    """``cache.cross_encoder: true``: the verifier's second stage on the packed runtime, off the
    event loop, serving a paraphrase and refusing a negation."""
    from proxy.cache import verifier as verifier_module
    from proxy.cache.packed_encoder import PackedCrossEncoder

    if not (verifier_module.ARTIFACT_DIR / verifier_module.CROSS_FILE).exists():
        pytest.skip("no cross-encoder artifact")
    client, services = await semantic_app(start_fake, tmp_path, aiohttp_client, cross_encoder=True)
    cache_verifier = services.verifier
    assert isinstance(cache_verifier, verifier_module.CacheVerifier)
    assert isinstance(cache_verifier.verifier.cross, PackedCrossEncoder)
    await serves_a_paraphrase_and_refuses_a_negation(client, services)


async def test_import_warms_and_invalidate_clears_through_the_cli(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    url = str(proxy.client.make_url("")).rstrip("/")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "What is the capital of France?", "answer": "Paris."}\n'
        '{"prompt": "What is 2+2?", "answer": "4"}\n'
    )
    code = await asyncio.to_thread(
        main, ["cache", "import", str(pairs), "--url", url, "--engine", "e"]
    )
    assert code == 0
    assert '"stored": 2' in capsys.readouterr().out
    warm = {"model": "m", "messages": QUESTION, "temperature": 0}
    resp = await proxy.client.post("/v1/chat/completions", json=warm)
    assert resp.headers["x-frugal-cache"] == "hit-exact"
    assert (await resp.json())["choices"][0]["message"]["content"] == "Paris."
    assert engine.state.counters.requests == 0

    code = await asyncio.to_thread(main, ["cache", "invalidate", "--url", url, "--engine", "e"])
    assert code == 0
    assert '"invalidated": 2' in capsys.readouterr().out
    resp = await proxy.client.post("/v1/chat/completions", json=warm)
    assert resp.headers["x-frugal-cache"] == "miss"
    code = await asyncio.to_thread(main, ["cache", "stats", "--url", url])
    assert code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no answer"}\n')
    code = await asyncio.to_thread(
        main, ["cache", "import", str(bad), "--url", url, "--engine", "e"]
    )
    assert code == 2
    assert "bad.jsonl:1: answer: must be a string" in capsys.readouterr().err


async def test_cli_import_reports_every_bad_line_by_file_line_and_stores_nothing(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy import admin_cli
    from proxy.cli import main

    monkeypatch.setattr(admin_cli, "IMPORT_BATCH", 4)  # the bad lines fall in later batches
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    url = str(proxy.client.make_url("")).rstrip("/")
    lines = [orjson.dumps({"prompt": f"q{i}", "answer": f"a{i}"}).decode() for i in range(12)]
    lines[6] = '{"prompt": "q6", "answer": "a6", "usage": "x"}'
    lines[9] = "not json"
    lines.insert(2, "")  # a blank line still counts in the numbering
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    code = await asyncio.to_thread(
        main, ["cache", "import", str(pairs), "--url", url, "--engine", "e"]
    )
    err = capsys.readouterr().err
    assert code == 2
    # (before: rows[2] of the second batch was reported, the first batch stayed stored)
    assert "pairs.jsonl:8: usage: must be an object" in err
    assert "pairs.jsonl:11: not JSON" in err
    assert "2 bad line(s)" in err and "nothing was imported" in err
    stats = await (await proxy.client.get("/admin/cache/stats")).json()
    assert stats["stored_entries"] == 0

    del lines[10], lines[7]
    pairs.write_text("\n".join(lines) + "\n")
    code = await asyncio.to_thread(
        main, ["cache", "import", str(pairs), "--url", url, "--engine", "e"]
    )
    assert code == 0
    assert '"stored": 10' in capsys.readouterr().out


async def test_cli_import_keeps_each_batch_under_the_proxys_body_limit(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    url = str(proxy.client.make_url("")).rstrip("/")
    # 300 valid rows of 20 kB: 256 of them (one batch by count) are over the 4 MiB body limit
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            orjson.dumps({"prompt": f"q{i}", "answer": "a" * 20_000}).decode() + "\n"
            for i in range(300)
        )
    )
    code = await asyncio.to_thread(
        main, ["cache", "import", str(pairs), "--url", url, "--engine", "e"]
    )
    captured = capsys.readouterr()
    # (before: 413 on the first batch, the import stopped with nothing stored)
    assert code == 0, captured.err
    assert '"stored": 300' in captured.out


async def test_cli_import_names_a_row_too_large_for_the_proxy(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    _, proxy = await cached_proxy(
        start_fake,
        start_proxy,
        tmp_path,
        cache={"scope": "global"},
        server={"max_body_bytes": 100_000},
    )
    url = str(proxy.client.make_url("")).rstrip("/")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "q0", "answer": "a"}\n'
        + orjson.dumps({"prompt": "q1", "answer": "a" * 200_000}).decode()
        + "\n"
    )
    code = await asyncio.to_thread(
        main, ["cache", "import", str(pairs), "--url", url, "--engine", "e"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"{pairs}:2: the row (" in err and "server.max_body_bytes" in err


def test_cli_import_reads_lines_as_utf8_split_at_newlines_only(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy import admin_cli
    from proxy.cli import main

    sent: list[Any] = []
    monkeypatch.setattr(
        admin_cli, "_call", lambda *args: (sent.append(args[3]), (200, {"stored": 1}))[1]
    )
    pairs = tmp_path / "pairs.jsonl"
    # a raw U+2028 inside a JSON string is valid JSON (json.dumps(ensure_ascii=False) writes it)
    pairs.write_bytes('{"prompt": "a\u2028b", "answer": "c"}\n'.encode())
    assert main(["cache", "import", str(pairs), "--engine", "e"]) == 0
    assert sent[0]["rows"] == [{"prompt": "a\u2028b", "answer": "c"}]
    # (before: a UnicodeDecodeError traceback)
    pairs.write_bytes(b'{"prompt": "q", "answer": "c"}\n{"prompt": "caf\xe9", "answer": "c"}\n')
    assert main(["cache", "import", str(pairs), "--engine", "e"]) == 2
    err = capsys.readouterr().err
    assert f"{pairs}:2: not UTF-8 text" in err and "Traceback" not in err
    assert len(sent) == 1


def test_cli_import_of_a_file_without_rows_fails_sending_nothing(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy import admin_cli
    from proxy.cli import main

    def refuse(*_: object) -> tuple[int, object]:
        raise AssertionError("a request was sent")

    monkeypatch.setattr(admin_cli, "_call", refuse)
    pairs = tmp_path / "pairs.jsonl"
    for text in ("", "\n\n  \n"):
        pairs.write_text(text)
        # (before: exit 0, "rows": 0, whatever --engine said)
        assert main(["cache", "import", str(pairs), "--engine", "no-such-engine"]) == 2
        assert f"{pairs} has no rows; nothing was imported" in capsys.readouterr().err


def test_cli_names_the_file_line_of_a_row_the_proxy_refuses(tmp_path: Path) -> None:
    from proxy.admin_cli import _in_file_terms

    body = {"error": {"message": "rows[1].usage: must be an object", "param": "rows[1].usage"}}
    named = _in_file_terms(body, Path("f.jsonl"), [7, 9, 10])
    assert named["error"]["message"] == "f.jsonl:9: usage: must be an object"
    assert _in_file_terms({"error": {"message": "m", "param": "scope"}}, Path("f"), [1]) == {
        "error": {"message": "m", "param": "scope"}
    }


async def test_a_bad_import_row_is_refused_and_never_poisons_its_prompt(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    question = QUESTION[0]["content"]
    for row, param in [
        ({"prompt": question, "answer": "Paris.", "usage": "x"}, "rows[1].usage"),
        (
            {"prompt": question, "answer": "Paris.", "usage": {"prompt_tokens": "ten"}},
            "rows[1].usage.prompt_tokens",
        ),
        ({"request": "str", "answer": "Paris."}, "rows[1].request"),
        ({"messages": [], "answer": "Paris."}, "rows[1].messages"),
    ]:
        rows = [{"prompt": "Another question?", "answer": "Yes."}, row]
        resp = await proxy.client.post(
            "/admin/cache/import", json={"engine": "e", "scope": "global", "rows": rows}
        )
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
        assert error["param"] == param
        assert error["message"].startswith(error["param"])
    # (before: stored, then every request for the prompt failed with a 500)
    resp = await proxy.client.post("/v1/chat/completions", json=GREEDY)
    assert resp.status == 200 and resp.headers["x-frugal-cache"] == "miss"
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    stats = await (await proxy.client.get("/admin/cache/stats")).json()
    assert stats["stored_entries"] == 1  # the engine's answer: no row of a refused batch


async def _proxy_and_import_command(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> tuple[Any, Proxy, list[str]]:
    """A cached proxy, and `frugal cache import` of one pair to it (engine e, no partition)."""
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    url = str(proxy.client.make_url("")).rstrip("/")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "What is the capital of France?", "answer": "Paris."}\n')
    return engine, proxy, ["cache", "import", str(pairs), "--url", url, "--engine", "e"]


async def test_cli_import_defaults_to_the_proxys_scope_and_needs_its_owner(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    # the default config: cache.scope tenant, no API keys (every request is tenant anonymous)
    engine, proxy, command = await _proxy_and_import_command(start_fake, start_proxy, tmp_path)
    # (before: stored under global, which no request of this proxy ever looks in)
    assert await asyncio.to_thread(main, command) == 1
    err = capsys.readouterr().err
    assert "scope 'tenant' takes owner [TENANT]" in err and "'anonymous'" in err
    assert await asyncio.to_thread(main, [*command, "--owner", "anonymous"]) == 0
    assert '"scope": "tenant"' in capsys.readouterr().out
    warm = {"model": "m", "messages": QUESTION, "temperature": 0}  # as imported: no max_tokens
    resp = await proxy.client.post("/v1/chat/completions", json=warm)
    assert resp.headers["x-frugal-cache"] == "hit-exact"
    assert engine.state.counters.requests == 0


async def test_cli_import_with_the_max_tokens_the_requests_carry(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    # (as a budgeted tier's requests carry its max_tokens cap: it is part of the key)
    engine, proxy, base = await _proxy_and_import_command(start_fake, start_proxy, tmp_path)
    command = [*base, "--owner", "anonymous"]
    assert await asyncio.to_thread(main, [*command, "--max-tokens", "8"]) == 0
    capsys.readouterr()
    resp = await proxy.client.post("/v1/chat/completions", json=GREEDY)  # max_tokens 8
    assert resp.headers["x-frugal-cache"] == "hit-exact"
    assert engine.state.counters.requests == 0
    assert await asyncio.to_thread(main, [*command, "--max-tokens", "0"]) == 1
    assert "max_tokens must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("scope", "owner", "param"),
    [
        ("tenant", None, "owner"),
        ("tenant", [""], "owner"),
        ("user", ["alice"], "owner"),  # a user partition is [tenant, user]
        ("global", ["acme"], "owner"),
        ("tier", ["a", "b"], "owner"),
        ("tier", [1], "owner"),
        ("tier", "open", "owner"),
        ("team", ["a"], "scope"),
        (["tenant"], ["a"], "scope"),  # (a list or an object here was a 500)
        ({"a": 1}, ["a"], "scope"),
    ],
)
async def test_import_refuses_a_partition_no_request_is_in(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    scope: str,
    owner: Any,
    param: str,
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    rows = [{"prompt": "q", "answer": "a"}]
    body = {"engine": "e", "scope": scope, "owner": owner, "rows": rows}
    resp = await proxy.client.post("/admin/cache/import", json=body)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["param"] == param
    stats = await (await proxy.client.get("/admin/cache/stats")).json()
    assert stats["stored_entries"] == 0


async def test_an_import_to_one_users_partition_is_hit_by_that_user_only(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "user"})
    rows = [{"prompt": QUESTION[0]["content"], "answer": "Paris."}]
    body = {"engine": "e", "owner": ["anonymous", "alice"], "rows": rows}
    resp = await proxy.client.post("/admin/cache/import", json=body)
    assert (await resp.json())["stored"] == 1
    warm = {"model": "m", "messages": QUESTION, "temperature": 0}
    alice = await proxy.client.post("/v1/chat/completions", json={**warm, "user": "alice"})
    assert alice.headers["x-frugal-cache"] == "hit-exact"
    assert (await alice.json())["model"] == "m"  # what the engine serves (was its name, "e")
    bob = await proxy.client.post("/v1/chat/completions", json={**warm, "user": "bob"})
    assert bob.headers["x-frugal-cache"] == "miss"


async def test_invalidate_clears_one_tenants_partition_only(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)  # scope: tenant
    url = str(proxy.client.make_url("")).rstrip("/")
    rows = [{"prompt": QUESTION[0]["content"], "answer": "Paris."}]
    for tenant in ("acme", "anonymous"):
        body = {"engine": "e", "owner": [tenant], "rows": rows}
        assert (await proxy.client.post("/admin/cache/import", json=body)).status == 200
    for where in ({"owner": ["acme"]}, {"scope": "user", "owner": ["acme"]}):
        resp = await proxy.client.post("/admin/cache/invalidate", json=where)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "owner"
    command = ["cache", "invalidate", "--url", url, "--scope", "tenant", "--owner", "acme"]
    # (before: no --owner; {"scope": "tenant"} cleared every tenant's entries)
    assert await asyncio.to_thread(main, command) == 0
    assert '"invalidated": 1' in capsys.readouterr().out
    warm = {"model": "m", "messages": QUESTION, "temperature": 0}
    resp = await proxy.client.post("/v1/chat/completions", json=warm)
    assert resp.headers["x-frugal-cache"] == "hit-exact"  # the anonymous tenant's entry stays


async def test_invalidating_everything_must_be_asked_for_by_name(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, capsys: Any
) -> None:
    from proxy.cli import main

    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    rows = [{"prompt": QUESTION[0]["content"], "answer": "Paris."}]
    assert (
        await proxy.client.post("/admin/cache/import", json={"engine": "e", "rows": rows})
    ).status == 200
    # (before: an empty body, or filters all null, wiped every entry)
    for body in (
        {},
        {"engine": None},
        {"all": False},
        {"all": "yes"},
        {"all": True, "engine": "e"},
    ):
        resp = await proxy.client.post("/admin/cache/invalidate", json=body)
        assert resp.status == 400, body
        assert (await resp.json())["error"]["param"] == "all"
    warm = {"model": "m", "messages": QUESTION, "temperature": 0}
    hit = await proxy.client.post("/v1/chat/completions", json=warm)
    assert hit.headers["x-frugal-cache"] == "hit-exact"
    url = str(proxy.client.make_url("")).rstrip("/")
    command = ["cache", "invalidate", "--url", url, "--all"]
    assert await asyncio.to_thread(main, command) == 0
    assert '"invalidated": 1' in capsys.readouterr().out
    gone = await proxy.client.post("/v1/chat/completions", json=warm)
    assert gone.headers["x-frugal-cache"] == "miss"


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/admin/cache/invalidate", {"scope": ["tenant"]}, "scope"),
        ("/admin/cache/invalidate", {"scope": {"a": 1}}, "scope"),
        ("/admin/cache/import", {"engine": "e", "endpoint": ["chat"], "rows": []}, "endpoint"),
        ("/admin/cache/import", {"engine": "e", "endpoint": {"chat": 1}, "rows": []}, "endpoint"),
    ],
)
async def test_admin_fields_of_the_wrong_type_are_400s_naming_them(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, path: str, body: Any, param: str
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    resp = await proxy.client.post(path, json=body)
    assert resp.status == 400, await resp.text()  # (before: 500 internal_error)
    assert (await resp.json())["error"]["param"] == param


async def test_import_refuses_a_version_that_is_not_a_string(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    rows = [{"prompt": "q", "answer": "a"}]
    for version in (5, ["v1"], ""):
        body = {"engine": "e", "version": version, "rows": rows}
        resp = await proxy.client.post("/admin/cache/import", json=body)
        # (before: 503 "engine 'e' has no known version yet")
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "version"


async def test_a_finished_stream_the_engine_closed_without_done_is_whole_and_stored(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # role, 3 tokens, finish, usage (the proxy asks for it upstream): then the end, no [DONE]
    engine = await start_fake("m", end_after_chunks=6, completion_tokens=3)
    proxy = await start_proxy(
        [engine_config("e", "m", [engine.url])],
        cache={"enabled": True, "data_dir": str(tmp_path / "cache"), "scope": "global"},
    )
    body = {"model": "m", "messages": QUESTION, "temperature": 0, "stream": True}
    first = await proxy.client.post("/v1/chat/completions", json=body)
    payloads = parse_all(await first.read())
    assert payloads[-1] == b"[DONE]" and all(b'"error"' not in p for p in payloads)
    assert first.headers["x-frugal-cache"] == "miss"
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    again = await proxy.client.post("/v1/chat/completions", json=body)
    # (before: a finished answer without [DONE] was not stored)
    assert again.headers["x-frugal-cache"] == "hit-exact"
    assert engine.state.counters.requests == 1


def slow_bag_of_words(texts: list[str]) -> np.ndarray:
    """bag_of_words at 50 ms a text: the encoder's queue is easy to overrun, and its wait known."""
    time.sleep(0.05 * len(texts))
    return bag_of_words(texts)


async def test_answers_to_questions_the_busy_encoder_skipped_are_found_by_meaning_later(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    engine = await start_fake("m")
    client, services = await semantic_app(
        start_fake,
        tmp_path,
        aiohttp_client,
        engine=engine,
        encode=slow_bag_of_words,
        embeddings={"max_queue_ms": 60, "max_wait_ms": 1},
        lookup_beside_engine=False,  # (the engine's requests counted are the misses)
    )
    cache, embedder = services.cache, services.embedder
    assert cache is not None and embedder is not None

    async def burst(texts: list[str]) -> None:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=ask(t)) for t in texts)
        )
        assert [r.headers["x-frugal-cache"] for r in replies] == ["miss"] * len(texts)

    await burst([f"warm up question {w}" for w in ("one", "two", "three", "four", "five")])
    topics = ("rivers", "mountains", "deserts", "oceans", "forests", "glaciers", "islands", "lakes")
    await burst([f"largest {t} of Europe" for t in topics])
    assert embedder.shed >= 1  # at 50 ms a text the third arrival would wait 100 ms
    await cache.drain()  # the exact entries, and the skipped questions' embeddings after them
    assert cache.late_embeddings_dropped == 0
    for topic in topics:
        reply = await client.post("/v1/chat/completions", json=ask(f"Europe: largest {topic} of?"))
        assert reply.headers["x-frugal-cache"] == "hit-semantic", topic
    assert engine.state.counters.requests == 13


async def test_a_request_is_not_held_past_max_queue_by_an_encoder_slower_than_measured(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    # A text admitted with nothing ahead of it, whose pass then stalls (CPU engines on the same
    # cores): the request goes on after max_queue_ms, and the answer is still indexed by
    # meaning from that same pass once it ends, not from a second one.
    stalled, passes = threading.Event(), []

    def stalling(texts: list[str]) -> np.ndarray:
        passes.append(list(texts))
        if "largest lakes of Europe" in texts:
            assert stalled.wait(30)
        return bag_of_words(texts)

    engine = await start_fake("m")
    client, services = await semantic_app(
        start_fake,
        tmp_path,
        aiohttp_client,
        engine=engine,
        encode=stalling,
        embeddings={"max_queue_ms": 100, "max_wait_ms": 1},
        lookup_beside_engine=False,  # the request itself waits for the lookup
    )
    cache = services.cache
    assert cache is not None
    passes.clear()  # the start-up pass
    started = time.perf_counter()
    reply = await client.post("/v1/chat/completions", json=ask("largest lakes of Europe"))
    assert reply.status == 200 and reply.headers["x-frugal-cache"] == "miss"
    assert time.perf_counter() - started < 10  # not the 30 s the pass is held
    stalled.set()
    await cache.drain()
    paraphrase = await client.post("/v1/chat/completions", json=ask("Europe: largest lakes of?"))
    assert paraphrase.headers["x-frugal-cache"] == "hit-semantic"
    assert passes.count(["largest lakes of Europe"]) == 1
    assert engine.state.counters.requests == 1


class HeldEncoder:
    """bag_of_words, held for the texts in ``held`` until ``release`` is set."""

    def __init__(self, *held: str) -> None:
        self.held, self.release = set(held), threading.Event()

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.held & set(texts):
            assert self.release.wait(30)
        return bag_of_words(texts)


async def held_app(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any, **cache: Any
) -> tuple[HeldEncoder, Any, Any, Any]:
    """A semantic app whose encoder holds "largest lakes of Europe" until released: its encoder,
    engine, client and services."""
    encoder = HeldEncoder("largest lakes of Europe")
    engine = await start_fake("m")
    client, services = await semantic_app(
        start_fake, tmp_path, aiohttp_client, engine=engine, encode=encoder,
        embeddings={"max_queue_ms": 30_000}, **cache,
    )  # fmt: skip
    return encoder, engine, client, services


async def test_a_miss_asks_the_engine_while_its_question_is_still_being_embedded(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    # A request whose route needs no embedding does not wait for the encoder before asking the
    # engine: on a miss the semantic lookup adds nothing to the time to first token.
    encoder, engine, client, services = await held_app(start_fake, tmp_path, aiohttp_client)
    body = {**ask("largest lakes of Europe"), "stream": True}
    reply = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    await wait_until(lambda: engine.state.counters.requests == 1, timeout_s=10)
    assert engine.state.counters.requests == 1
    await asyncio.sleep(0.3)
    assert not encoder.release.is_set() and not reply.done()  # the answer waits for the lookup
    encoder.release.set()
    response = await reply
    assert response.status == 200 and response.headers["x-frugal-cache"] == "miss"
    assert (await response.read()).endswith(b"data: [DONE]\n\n")
    # Its first byte reached the client after the lookup, not when the engine sent it: the
    # time to first token and the proxy's own time both hold the 0.3 s waited for the lookup.
    metrics = await (await client.get("/metrics")).text()
    for family in ("frugal_time_to_first_token_seconds", "frugal_proxy_overhead_seconds"):
        sums = [ln for ln in metrics.splitlines() if ln.startswith(f"{family}_sum")]
        assert sums and float(sums[0].rsplit(" ", 1)[1]) >= 0.3, (family, sums)
    assert services.cache is not None
    await services.cache.drain()
    paraphrase = await client.post("/v1/chat/completions", json=ask("Europe: largest lakes of?"))
    assert paraphrase.headers["x-frugal-cache"] == "hit-semantic"
    # (the paraphrase's engine request, sent beside its lookup, was closed on the hit)
    assert engine.state.counters.requests == 2


async def test_a_hit_found_beside_the_engine_call_aborts_it(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    engine = await start_fake("m", ttft_ms=2_000)
    client, services = await semantic_app(
        start_fake, tmp_path, aiohttp_client, engine=engine, encode=bag_of_words
    )
    first = await client.post("/v1/chat/completions", json=ask("largest lakes of Europe"))
    assert first.headers["x-frugal-cache"] == "miss"
    assert services.cache is not None
    await services.cache.drain()
    for stream in (False, True):
        reply = await client.post(
            "/v1/chat/completions", json={**ask("Europe: largest lakes of?"), "stream": stream}
        )
        assert reply.headers["x-frugal-cache"] == "hit-semantic"
        await reply.read()
    # Each paraphrase's engine request was sent and then closed, so the engine stops it.
    await wait_until(lambda: engine.state.counters.aborted == 2, timeout_s=10)
    assert engine.state.counters.aborted == 2
    assert engine.state.counters.requests == 3
    metrics = await (await client.get("/metrics")).text()
    assert 'frugal_engine_requests_cancelled_total{engine="e",reason="cache_hit"} 2.0' in metrics


async def test_a_hit_found_after_the_engines_first_byte_closes_its_answer(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    # The engine answers at once but slowly; the paraphrase's vector is held until the engine
    # has started to answer: the hit is served, and the answer already under way is closed.
    encoder = HeldEncoder("Europe: largest lakes of?")
    engine = await start_fake("m", tokens_per_s=10)  # 16 tokens: 1.5 s
    client, services = await semantic_app(
        start_fake, tmp_path, aiohttp_client, engine=engine, encode=encoder,
        embeddings={"max_queue_ms": 30_000},
    )  # fmt: skip
    first = await client.post(
        "/v1/chat/completions", json={**ask("largest lakes of Europe"), "max_tokens": 16}
    )
    assert first.headers["x-frugal-cache"] == "miss"
    assert services.cache is not None
    await services.cache.drain()
    body = {**ask("Europe: largest lakes of?"), "stream": True, "max_tokens": 16}
    reply = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    await wait_until(lambda: engine.state.counters.requests == 2, timeout_s=10)
    await asyncio.sleep(0.3)  # its first token is out: the proxy holds it for the lookup
    assert not reply.done() and engine.state.counters.aborted == 0
    encoder.release.set()
    response = await reply
    assert response.headers["x-frugal-cache"] == "hit-semantic"
    assert (await response.read()).endswith(b"data: [DONE]\n\n")
    await wait_until(lambda: engine.state.counters.aborted == 1, timeout_s=10)
    assert engine.state.counters.aborted == 1  # closed, not left to generate its 16 tokens
    metrics = await (await client.get("/metrics")).text()
    assert 'frugal_engine_requests_cancelled_total{engine="e",reason="cache_hit"} 1.0' in metrics


async def test_off_the_engine_is_asked_only_after_the_lookup(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    encoder, engine, client, _ = await held_app(
        start_fake, tmp_path, aiohttp_client, lookup_beside_engine=False
    )
    reply = asyncio.create_task(
        client.post("/v1/chat/completions", json=ask("largest lakes of Europe"))
    )
    await asyncio.sleep(0.3)
    assert engine.state.counters.requests == 0
    encoder.release.set()
    assert (await reply).status == 200
    assert engine.state.counters.requests == 1


async def test_a_completion_of_several_prompts_is_stored_and_replayed_whole(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # vLLM answers each prompt of an array with n choices (prompt i's j-th is choice i * n + j)
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    body = {"model": "m", "prompt": ["red", "blue"], "n": 2, "temperature": 0, "max_tokens": 4}
    first = await proxy.client.post("/v1/completions", json=body)
    assert first.headers["x-frugal-cache"] == "miss"
    answer = await first.json()
    texts = [c["text"] for c in answer["choices"]]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    hit = await proxy.client.post("/v1/completions", json=body)
    assert hit.headers["x-frugal-cache"] == "hit-exact"
    assert [c["text"] for c in (await hit.json())["choices"]] == texts
    replay = await proxy.client.post("/v1/completions", json={**body, "stream": True})
    assert replay.headers["x-frugal-cache"] == "hit-exact"
    chunks = [orjson.loads(p) for p in parse_all(await replay.read())[:-1]]
    replayed = ["", "", "", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            replayed[choice["index"]] += choice["text"]
    assert replayed == texts
    assert engine.state.counters.requests == 1


async def test_import_refuses_a_version_the_engine_does_not_serve(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    rows = [{"prompt": "q", "answer": "a"}]
    body = {"engine": "e", "version": "no-such-version", "rows": rows}
    resp = await proxy.client.post("/admin/cache/import", json=body)
    # (before: 200 stored 1, under a version no request is ever looked up with)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == "version" and "no-such-version" in error["message"]
    stats = await (await proxy.client.get("/admin/cache/stats")).json()
    assert stats["stored_entries"] == 0
    served = proxy.services.by_name["e"].version
    resp = await proxy.client.post("/admin/cache/import", json={**body, "version": served})
    assert resp.status == 200 and (await resp.json())["stored"] == 1


async def test_admin_invalidations_and_imports_are_logged(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    import structlog

    _, proxy = await cached_proxy(start_fake, start_proxy, tmp_path, cache={"scope": "global"})
    rows = [{"prompt": "q", "answer": "a"}]
    with structlog.testing.capture_logs() as logs:
        resp = await proxy.client.post("/admin/cache/import", json={"engine": "e", "rows": rows})
        assert resp.status == 200
        resp = await proxy.client.post("/admin/cache/invalidate", json={"engine": "e"})
        assert (await resp.json())["invalidated"] == 1
    # (before: nothing: an operator's import or wipe of the cache left no trace in the logs)
    imported = [e for e in logs if e["event"] == "cache import"]
    assert imported and imported[0]["engine"] == "e" and imported[0]["stored"] == 1
    invalidated = [e for e in logs if e["event"] == "cache invalidated"]
    assert invalidated and invalidated[0]["removed"] == 1
    assert invalidated[0]["where"] == {"engine": "e"}


async def test_the_access_line_says_how_close_a_semantic_hit_was(
    start_fake: StartFake, tmp_path: Path, aiohttp_client: Any
) -> None:
    import io

    from proxy.observability.access import AccessLog

    client, services = await semantic_app(start_fake, tmp_path, aiohttp_client)
    buffer = io.BytesIO()
    services.access_log = AccessLog(json=True, stream=buffer)
    assert services.cache is not None
    await client.post("/v1/chat/completions", json=ask("How do I reverse a list in Python?"))
    await services.cache.drain()
    hit = await client.post("/v1/chat/completions", json=ask("How can I reverse a list in Python?"))
    assert hit.headers["x-frugal-cache"] == "hit-semantic"
    await wait_until(lambda: buffer.getvalue().count(b"\n") == 2)
    miss_line, hit_line = (orjson.loads(line) for line in buffer.getvalue().splitlines())
    assert miss_line["cache_similarity"] is None
    # A wrong answer reported by request id is traced to how close its question was.
    assert hit_line["cache"] == "hit-semantic"
    assert hit_line["cache_similarity"] == pytest.approx(
        float(hit.headers["x-frugal-cache-similarity"]), abs=1e-4
    )
    assert hit_line["coalesced"] is False
