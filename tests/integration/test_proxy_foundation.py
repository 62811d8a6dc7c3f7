"""The proxy in front of fake engines: endpoints, pass-through, streaming, failures."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import structlog
from aiohttp import web

from proxy import handlers
from proxy.app import TRANSPORT, create_app
from proxy.engines.pool import Replica
from proxy.errors import InternalError
from proxy.observability.access import AccessLog
from proxy.settings import Settings
from proxy.sse import parse_all
from tests.integration.conftest import (
    ProxyServer,
    StartFake,
    StartProxy,
    engine_config,
    wait_until,
)

CHAT = {"model": "small-model", "messages": [{"role": "user", "content": "Say hi"}]}


async def _raw_chat_post(
    p: Any, body: bytes, *, length: int | None = None, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A chat POST written on a socket of its own: ``body`` after a head that may announce more
    (``length``), on a small receive buffer if asked (a client slow to read)."""
    reader, writer = await asyncio.open_connection(p.client.server.host, p.client.server.port)
    if receive_buffer is not None:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
        )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body) if length is None else length, body)
    )
    return reader, writer


async def _two_engines(start_fake: StartFake, start_proxy: StartProxy, **proxy: Any) -> Any:
    small = await start_fake("small-model")
    large = await start_fake("large-model")
    p = await start_proxy(
        [
            engine_config("small", "small-model", [small.url]),
            engine_config("large", "large-model", [large.url]),
        ],
        **proxy,
    )
    return small, large, p


async def test_chat_non_streamed_carries_engine_and_version(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert resp.headers["x-frugal-engine"] == "small"
    assert resp.headers["x-frugal-model-version"].startswith("small-model@")
    assert resp.headers["x-request-id"]


@pytest.mark.parametrize("lean", [True, False])
async def test_the_lean_engine_client_can_be_switched_off(
    start_fake: StartFake, start_proxy: StartProxy, lean: bool
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy, server={"lean_engine_client": lean})
    for stream in (False, True):
        resp = await p.client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200 and await resp.read()
    lean_client = p.client.server.app[TRANSPORT].lean
    if lean:
        assert lean_client is not None
        # the non-streamed call went through it and left its connection open for the next one
        assert sum(len(idle) for idle in lean_client._idle.values()) == 1
    else:
        assert lean_client is None


async def test_auto_goes_to_first_engine_and_model_is_rewritten(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small, large, p = await _two_engines(start_fake, start_proxy, routing={"enabled": False})
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "auto"})
    assert resp.status == 200
    assert resp.headers["x-frugal-engine"] == "small"
    sent = small.state.log[-1]
    assert orjson.loads(sent.body)["model"] == "small-model"
    assert large.state.counters.requests == 0


async def test_unknown_fields_pass_through_unchanged(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    request = {
        **CHAT,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "stop": ["\n\n"],
        "seed": 7,
        "repetition_penalty": 1.1,
        "guided_choice": ["a", "b"],
        "vendor_extra": {"nested": [1, 2, 3]},
    }
    resp = await p.client.post(
        "/v1/chat/completions", json=request, headers={"x-request-id": "req-123"}
    )
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "req-123"
    sent = small.state.log[-1]
    assert orjson.loads(sent.body) == request
    assert dict((k.lower(), v) for k, v in sent.headers)["x-request-id"] == "req-123"


async def test_streamed_chat_relays_chunks_and_hides_unrequested_usage(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    payloads = parse_all(await resp.read())
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(p) for p in payloads[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in e or e["usage"] is None for e in events)
    # The proxy asked the engine for usage, to count tokens.
    sent = orjson.loads(small.state.log[-1].body)
    assert sent["stream_options"] == {"include_usage": True}


async def test_streamed_usage_is_relayed_when_asked(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await p.client.post("/v1/chat/completions", json=body)
    events = [orjson.loads(x) for x in parse_all(await resp.read())[:-1]]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] > 0


async def test_completions_streamed_and_not(start_fake: StartFake, start_proxy: StartProxy) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    body = {"model": "large-model", "prompt": "Once upon a time", "max_tokens": 5}
    resp = await p.client.post("/v1/completions", json=body)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["text"]
    assert resp.headers["x-frugal-engine"] == "large"
    resp = await p.client.post("/v1/completions", json={**body, "stream": True})
    payloads = parse_all(await resp.read())
    assert payloads[-1] == b"[DONE]"
    assert "text" in orjson.loads(payloads[0])["choices"][0]


async def test_models_lists_every_engine_and_auto(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    resp = await p.client.get("/v1/models")
    ids = [m["id"] for m in (await resp.json())["data"]]
    assert ids == ["auto", "small-model", "large-model"]


async def test_a_model_is_retrieved_by_id_like_its_card_in_the_list(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    listed = {m["id"]: m for m in (await (await p.client.get("/v1/models")).json())["data"]}
    assert "root" in listed["small-model"]  # the engine's version
    for name in ("auto", "small-model", "large-model"):
        resp = await p.client.get(f"/v1/models/{name}")
        assert resp.status == 200
        assert await resp.json() == listed[name]
    resp = await p.client.get("/v1/models/gpt-17")
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"


async def _status_is(p: Any, path: str, status: int) -> bool:
    return (await p.client.get(path)).status == status


async def test_health_ready_and_metrics(start_fake: StartFake, start_proxy: StartProxy) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    assert (await p.client.get("/healthz")).status == 200
    await wait_until(lambda: _status_is(p, "/readyz", 200))
    assert (await p.client.get("/readyz")).status == 200
    await p.client.post("/v1/chat/completions", json=CHAT)
    text = await (await p.client.get("/metrics")).text()
    assert "frugal_requests_total" in text
    assert "vllm:" not in text
    small.configure(health_fail=True)
    await wait_until(lambda: _status_is(p, "/readyz", 503))
    ready = await p.client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["engines"]["small"]["ready"] is False


async def test_readyz_is_503_while_every_replica_s_breaker_is_open(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # /health answers 200, completions fail: only the breaker knows the replica is out.
    failing = await start_fake("m", fail_status=500, fail_fraction=1.0)
    breaker = {"failure_threshold": 1, "open_s": 60}
    p = await start_proxy([engine_config("e", "m", [failing.url], breaker=breaker)])
    await wait_until(lambda: _status_is(p, "/readyz", 200))
    assert (await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})).status == 502
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert resp.status == 503  # what every request gets now
    ready = await p.client.get("/readyz")
    assert ready.status == 503
    engine = (await ready.json())["engines"]["e"]
    assert engine["ready"] is False
    assert engine["replicas"] == {failing.url: True} and engine["breakers"] == {failing.url: "open"}
    breaker = p.services.engines[0].replicas[0].breaker
    breaker.opened_at -= breaker.open_s  # its probe is due: the next request goes through
    ready = await p.client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["engines"]["e"]["breakers"] == {failing.url: "half_open"}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"", 400, None),
        (orjson.dumps({"model": "small-model"}), 400, "messages"),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "model"),
        (orjson.dumps({**CHAT, "messages": "hello"}), 400, "messages"),
        (orjson.dumps({**CHAT, "temperature": "hot"}), 400, "temperature"),
        (orjson.dumps({**CHAT, "max_tokens": -3}), 400, "max_tokens"),
        (orjson.dumps({**CHAT, "stream": "yes"}), 400, "stream"),
        (orjson.dumps({**CHAT, "model": "gpt-17"}), 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(
    start_fake: StartFake, start_proxy: StartProxy, body: bytes, status: int, param: str | None
) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    resp = await p.client.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    assert small.state.counters.requests == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ],
)
async def test_a_body_a_browser_may_send_unasked_is_a_415(
    start_fake: StartFake, start_proxy: StartProxy, content_type: str
) -> None:
    # A web page may post these types to another origin without a preflight: the proxy
    # refuses them, so no page spends engine time through a proxy that needs no key.
    small, _, p = await _two_engines(start_fake, start_proxy)
    origin = {"Origin": "https://evil.example", "Content-Type": content_type}
    for path in ("/v1/chat/completions", "/v1/completions"):
        resp = await p.client.post(path, data=orjson.dumps(CHAT), headers=origin)
        assert resp.status == 415
        error = (await resp.json())["error"]
        assert error["code"] == "unsupported_media_type"
        assert "application/json" in error["message"]
    assert small.state.counters.requests == 0
    # JSON, a +json type, or no type at all (vLLM reads those as JSON too) are served
    for fine in ("application/json", "application/json; charset=utf-8", "application/vnd.x+json"):
        resp = await p.client.post(
            "/v1/chat/completions", data=orjson.dumps(CHAT), headers={"Content-Type": fine}
        )
        assert resp.status == 200, fine
    bare = await p.client.post(
        "/v1/chat/completions", data=orjson.dumps(CHAT), skip_auto_headers=["Content-Type"]
    )
    assert bare.status == 200


async def test_body_over_limit_is_413(start_fake: StartFake, start_proxy: StartProxy) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy, server={"max_body_bytes": 1000})
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    resp = await p.client.post("/v1/chat/completions", json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_unknown_path_and_method_are_openai_shaped(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    resp = await p.client.get("/v1/nothing")
    assert resp.status == 404
    assert "error" in await resp.json()
    resp = await p.client.get("/v1/chat/completions")
    assert resp.status == 405
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    # RFC 9110: a 405 names the methods the resource allows
    assert resp.headers["Allow"] == "POST"
    resp = await p.client.post("/v1/models")
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_engine_4xx_is_relayed_unchanged(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small = await start_fake("small-model")
    # The engine itself rejects the model name: the proxy must pass its answer on as it is.
    p = await start_proxy([engine_config("small", "other-name", [small.url])])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "other-name"})
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_failed_replica_is_retried_on_another(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    bad = await start_fake("m", fail_fraction=1.0, fail_status=500)
    good = await start_fake("m")
    p = await start_proxy([engine_config("e", "m", [bad.url, good.url])])
    for i in range(6):
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
        resp = await p.client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
    assert good.state.counters.requests == 6
    # The breaker opened after three failures: the bad replica stopped getting traffic.
    assert bad.state.counters.requests <= 3


async def test_dead_replica_is_retried_then_503_when_all_down(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    good = await start_fake("m")
    dead_url = "http://127.0.0.1:9"  # discard port: connection refused
    p = await start_proxy([engine_config("e", "m", [dead_url, good.url])])
    for i in range(4):
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
        resp = await p.client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
    await good.server.close()
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert resp.status in (502, 503)
    assert (await resp.json())["error"]["type"] in ("upstream_error", "service_unavailable")


async def test_no_healthy_replica_is_503(start_fake: StartFake, start_proxy: StartProxy) -> None:
    sick = await start_fake("m", health_fail=True)
    p = await start_proxy([engine_config("e", "m", [sick.url])])
    await wait_until(lambda: p.services.engines[0].replicas[0].healthy is False)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "no_healthy_replica"
    # the SDKs wait this long before their retry (no breaker open: the next health check)
    assert resp.headers["Retry-After"] == "1"


async def test_hanging_engine_times_out_with_504(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    hung = await start_fake("m", hang=True)
    timeouts = {"connect_s": 1, "first_token_s": 0.3, "total_s": 0.3}
    p = await start_proxy([engine_config("e", "m", [hung.url], timeouts=timeouts)])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert resp.status == 504


async def test_failure_mid_stream_ends_with_error_event_and_done(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    flaky = await start_fake("m", abort_after_chunks=3, completion_tokens=20)
    p = await start_proxy([engine_config("e", "m", [flaky.url])])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert resp.status == 200
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    assert payloads[-1] == b"[DONE]"
    error = orjson.loads(payloads[-2])["error"]
    assert error["type"] == "upstream_error"
    assert len(payloads) >= 4  # chunks before the cut were relayed


@pytest.mark.parametrize("fail", [{"abort_after_chunks": 3}, {"end_after_chunks": 3}])
async def test_a_stream_broken_mid_answer_names_its_replica_in_the_log_only(
    start_fake: StartFake, start_proxy: StartProxy, fail: dict[str, int]
) -> None:
    flaky = await start_fake("m", completion_tokens=20, **fail)
    p = await start_proxy([engine_config("e", "m", [flaky.url])])
    with structlog.testing.capture_logs() as logs:
        resp = await p.client.post(
            "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
        )
        payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    message = orjson.loads(payloads[-2])["error"]["message"]
    assert message.startswith("engine e ") or message.startswith("the engine"), message
    # (not aiohttp's words about transfer lengths, nor the replica's address)
    assert "127.0.0.1" not in message and "<" not in message and ":" not in message, message
    failed = [e for e in logs if e["event"] == "engine.replica_failed"]
    assert [e["replica"] for e in failed] == [flaky.url], logs


@pytest.mark.parametrize("stream", [True, False])
async def test_an_engine_that_compresses_what_it_may_is_relayed_readable(
    aiohttp_server: Any, start_proxy: StartProxy, stream: bool
) -> None:
    """An engine (or a gateway in front of it) compresses its answer when the request accepts
    gzip; the proxy relays bytes as they come, so it must not accept what it would pass on
    compressed. (Not streamed, through aiohttp: an https engine's path.)"""
    events = [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
    ]  # fmt: skip
    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                           "finish_reason": "stop"}]}  # fmt: skip

    async def chat(request: web.Request) -> web.StreamResponse:
        gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        if not (await request.json()).get("stream"):
            resp = web.json_response(answer)
            if gzip:
                resp.enable_compression(web.ContentCoding.gzip)
            return resp
        sse = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if gzip:
            sse.enable_compression(web.ContentCoding.gzip)
        await sse.prepare(request)
        for event in events:
            await sse.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await sse.write(b"data: [DONE]\n\n")
        await sse.write_eof()
        return sse

    p, _ = await _behind_an_engine(
        aiohttp_server, start_proxy, chat, server={"lean_engine_client": False}
    )
    resp = await p.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "m", "stream": stream}
    )
    assert resp.status == 200
    if stream:
        payloads = parse_all(await resp.read())
        assert payloads == [orjson.dumps(events[0]), b"[DONE]"], payloads
    else:
        assert await resp.json() == answer


async def _behind_an_engine(
    aiohttp_server: Any,
    start_proxy: StartProxy,
    chat: Callable[[web.Request], Awaitable[web.StreamResponse]],
    **sections: Any,
) -> tuple[Any, Replica]:
    """A proxy before one "engine" whose chat completions ``chat`` answers, and its replica."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    engine = await aiohttp_server(app)
    url = str(engine.make_url("")).rstrip("/")
    p = await start_proxy(
        [engine_config("e", "m", [url], version="v1")],
        health={"interval_s": 3600, "timeout_s": 1.0},
        **sections,
    )
    replica = p.services.engines[0].replicas[0]
    replica.healthy = True  # (this engine has no /health)
    return p, replica


def _canned(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An engine's chat handler that answers every request with ``body``."""

    async def chat(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    return chat


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"this is not json", "application/json"),
        (b'{"id": "c", "object": "chat.completion", "choi', "application/json"),  # cut short
        (b"<html><body>Welcome to nginx</body></html>", "text/html"),
        (b'["not", "an", "answer"]', "application/json"),
    ],
)
async def test_a_non_streamed_answer_that_is_not_a_json_object_is_a_502(
    aiohttp_server: Any, start_proxy: StartProxy, body: bytes, content_type: str, lean: bool
) -> None:
    """A 200 whose body is no answer (a gateway's page, a body cut short but framed whole) is the
    replica's failure: a 502 the SDKs can read and retry, and its breaker is told."""
    chat = _canned(body, content_type)
    server = {"lean_engine_client": lean}
    p, replica = await _behind_an_engine(aiohttp_server, start_proxy, chat, server=server)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    # (before: a 200 application/json whose body was the engine's garbage)
    assert resp.status == 502, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_error"
    assert replica.breaker.failures == 1 and replica.inflight == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>Welcome to nginx</body></html>", "text/html"),
        (b'{"id": "c", "object": "chat.completion", "choices": []}', "application/json"),
    ],
)
async def test_a_stream_answered_with_no_event_stream_is_a_502_before_a_byte(
    aiohttp_server: Any, start_proxy: StartProxy, body: bytes, content_type: str
) -> None:
    """A 200 to a stream request that is no event stream (a gateway's page, an engine that
    ignored ``stream``) has nothing to relay: a failure before the first byte, retried
    elsewhere, not a 200 whose stream is only an error event."""
    p, replica = await _behind_an_engine(aiohttp_server, start_proxy, _canned(body, content_type))
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    # (before: a 200 whose stream was one error event)
    assert resp.status == 502, await resp.text()
    assert (await resp.json())["error"]["type"] == "upstream_error"
    assert replica.breaker.failures == 1 and replica.inflight == 0


async def test_a_stream_the_engine_ends_early_and_cleanly_is_a_failure_not_an_answer(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    """Two events, then a clean end with no finish_reason and no [DONE] (a load balancer closing
    the stream early): the client must not take the half answer for a whole one."""
    cut = await start_fake("m", end_after_chunks=2, completion_tokens=20)
    p = await start_proxy([engine_config("e", "m", [cut.url])])
    replica = p.services.engines[0].replicas[0]
    failures = replica.breaker.failures
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert resp.status == 200
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    # (before: the two events, then a [DONE] the proxy added, as if the answer were whole)
    assert payloads[-1] == b"[DONE]"
    error = orjson.loads(payloads[-2])["error"]
    assert error["type"] == "upstream_error" and "ended before the answer" in error["message"]
    assert len(payloads) == 4  # the two events came first
    assert replica.breaker.failures == failures + 1 and replica.inflight == 0
    whole = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert whole.status == 200  # a non-streamed answer is whole


async def test_a_stream_the_engine_ends_before_its_first_byte_is_retried_elsewhere(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    """Headers, then the end with no event: nothing was relayed, so it is a failure before the
    first byte like a 5xx: retried on another replica, and a 502 (which the SDKs retry) when
    there is none, not a 200 whose stream is only an error."""
    empty = await start_fake("m", end_after_chunks=0)
    good = await start_fake("m")
    p = await start_proxy([engine_config("e", "m", [empty.url, good.url])])
    replicas = {r.url: r for r in p.services.engines[0].replicas}
    breaker = replicas[empty.url].breaker
    sent = 0
    # Conversations are spread over the replicas by a hash: send new ones until one was sent to
    # the empty replica first (each has an even chance).
    while breaker.failures == 0 and breaker.state == "closed" and sent < 40:
        messages = [{"role": "user", "content": f"question {sent}"}]
        body = {**CHAT, "messages": messages, "model": "m", "stream": True}
        resp = await p.client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
        assert payloads[-1] == b"[DONE]" and not any(b'"error"' in x for x in payloads)
        sent += 1
    assert breaker.failures == 1, sent  # (before: a 200 whose stream was only an error)
    alone = await start_proxy([engine_config("e", "m", [empty.url])])
    resp = await alone.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
    )
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["type"] == "upstream_error" and "before a byte" in error["message"]


async def test_engine_failures_do_not_tell_the_client_the_replica_s_address(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    """The client hears which engine failed; the replica's address and the engine's own error
    body stay in the proxy's log."""
    failing = await start_fake("m2", fail_status=500, fail_fraction=1.0)
    p = await start_proxy(
        [
            engine_config("down", "m", ["http://127.0.0.1:1"]),
            engine_config("bad", "m2", [failing.url]),
        ],
        health={"interval_s": 3600, "timeout_s": 1.0},
    )
    for engine, model in ((p.services.engines[0], "m"), (p.services.engines[1], "m2")):
        engine.replicas[0].healthy = True  # as if its last health check had passed
        resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": model})
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
        assert message.startswith(f"engine {engine.name} "), message
        assert "127.0.0.1" not in message and "{" not in message, message


@pytest.mark.parametrize(
    ("path", "body", "events"),
    [
        # 2 role events, 3 tokens x 2 choices, then choice 0's finish: choice 1's never comes
        ("/v1/chat/completions", {**CHAT, "n": 2}, 9),
        # completions have no role events: 3 tokens x 2 choices, then choice 0's finish
        ("/v1/completions", {"model": "m", "prompt": "Say hi", "n": 2}, 7),
    ],
)
async def test_a_stream_cut_after_one_of_several_choices_finished_is_an_error(
    start_fake: StartFake,
    start_proxy: StartProxy,
    path: str,
    body: dict[str, Any],
    events: int,
) -> None:
    """With several choices, one finish_reason is not the end of the answer: a stream the engine
    ends there (no [DONE]) leaves the other choices unfinished, which the client must be told."""
    cut = await start_fake("m", end_after_chunks=events, completion_tokens=3)
    p = await start_proxy([engine_config("e", "m", [cut.url])])
    request = {**body, "model": "m", "stream": True, "max_tokens": 3}
    resp = await p.client.post(path, json=request)
    assert resp.status == 200
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    # (before: a [DONE] the proxy added after choice 0's finish, choice 1 left unfinished)
    assert payloads[-1] == b"[DONE]"
    error = orjson.loads(payloads[-2])["error"]
    assert error["type"] == "upstream_error" and "ended before the answer" in error["message"]
    # the same stream left whole still ends cleanly
    cut.configure(end_after_chunks=None)
    resp = await p.client.post(path, json=request)
    payloads = parse_all(await resp.read())
    assert payloads[-1] == b"[DONE]" and not any(b'"error"' in x for x in payloads)


async def test_a_relay_failure_mid_stream_ends_the_stream_and_frees_the_replica(
    start_fake: StartFake, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await start_fake("m", completion_tokens=20, tokens_per_s=400)  # chunk by chunk
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    caller = p.services.caller
    transport = caller._transport

    class BreaksAfterFirstChunk:
        """The engine's answer, whose reading raises a bug after its first chunk."""

        def __init__(self, response: Any) -> None:
            self._response = response
            self.status, self.headers = response.status, response.headers
            self.read, self.release, self.close = response.read, response.release, response.close

        async def chunks(self) -> AsyncIterator[bytes]:
            async for chunk in self._response.chunks():
                yield chunk
                raise RuntimeError("a bug in the relay")

    async def breaking_transport(request: Any) -> Any:
        return BreaksAfterFirstChunk(await transport(request))

    # A bug (or an engine stream the relay cannot read) after the first chunk was sent. (Put in
    # below the pipeline, whose compiled build cannot be patched.)
    monkeypatch.setattr(caller, "_transport", breaking_transport)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    assert payloads[-1] == b"[DONE]"
    assert orjson.loads(payloads[-2])["error"]["code"] == "relay_failed"
    replica = p.services.engines[0].replicas[0]
    assert replica.inflight == 0  # the replica was released, not leaked


async def test_client_disconnect_aborts_the_engine_request(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    slow = await start_fake("m", tokens_per_s=20, completion_tokens=200)
    p = await start_proxy([engine_config("e", "m", [slow.url])])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert resp.status == 200
    await resp.content.readany()  # the stream has begun
    resp.close()  # the client leaves
    await wait_until(lambda: slow.state.counters.aborted == 1)
    assert slow.state.counters.aborted == 1
    assert p.services.engines[0].replicas[0].inflight == 0


async def test_a_client_that_stops_reading_does_not_hold_the_engine_past_the_deadline(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # A long answer, all of it ready at once: the relay's writes soon wait on the client.
    engine = await start_fake("m", completion_tokens=100_000)
    # (a first token later than first_token_s on a loaded box would be a 504 and a breaker
    # failure, not the stalled relay this is about: so a generous one, and a short deadline)
    timeouts = {"connect_s": 5, "first_token_s": 10, "total_s": 4}
    p = await start_proxy([engine_config("e", "m", [engine.url], timeouts=timeouts)])
    body = orjson.dumps({**CHAT, "model": "m", "stream": True})
    reader, writer = await _raw_chat_post(p, body, receive_buffer=4096)
    try:
        await reader.readexactly(64)  # the stream has begun; then the client reads no more
        # (before: the engine kept the request until the client read again or its TCP gave up)
        await wait_until(lambda: engine.state.counters.aborted == 1, timeout_s=20)
        assert engine.state.counters.aborted == 1
        assert p.services.engines[0].replicas[0].inflight == 0
        assert p.services.engines[0].replicas[0].breaker.failures == 0  # not the replica's fault
    finally:
        writer.close()


async def test_client_disconnect_before_first_token_aborts_too(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    slow = await start_fake("m", ttft_ms=3000)
    p = await start_proxy([engine_config("e", "m", [slow.url])])
    task = asyncio.create_task(p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}))
    await wait_until(lambda: slow.state.in_flight == 1)
    task.cancel()
    await wait_until(lambda: slow.state.counters.aborted == 1)
    assert slow.state.counters.aborted == 1
    assert p.services.engines[0].replicas[0].inflight == 0


async def test_a_client_leaving_an_older_stream_does_not_let_a_second_probe_through(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", tokens_per_s=10, completion_tokens=100)
    # (a second probe would wait first_token_s for its first token, then get a 504)
    timeouts = {"connect_s": 1, "first_token_s": 10, "total_s": 60}
    p = await start_proxy([engine_config("e", "m", [engine.url], timeouts=timeouts)])
    replica = p.services.engines[0].replicas[0]
    body = {**CHAT, "model": "m", "stream": True}
    older = await p.client.post("/v1/chat/completions", json=body)  # sent while closed
    assert older.status == 200
    await older.content.readany()
    replica.breaker._open(time.monotonic() - replica.breaker.open_s)  # open, and due a probe
    engine.configure(hang=True)  # the probe gets no first token
    probe = asyncio.ensure_future(p.client.post("/v1/chat/completions", json=body))
    await wait_until(lambda: engine.state.in_flight == 2)
    older.close()  # the older stream's client leaves
    await wait_until(lambda: engine.state.counters.aborted == 1)
    # The probe is still out: nothing else reaches the replica meanwhile.
    resp = await p.client.post("/v1/chat/completions", json=body)
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_healthy_replica"
    assert engine.state.counters.requests == 2
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe


async def test_conversation_sticks_to_one_replica(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    replicas = [await start_fake("m") for _ in range(3)]
    # A generous health timeout: on a loaded machine a slow /health must not take a replica out
    # of rotation mid-conversation (that move is right, but not what this test is about).
    p = await start_proxy(
        [engine_config("e", "m", [r.url for r in replicas])],
        health={"interval_s": 0.2, "timeout_s": 10.0},
    )
    for convo in range(6):
        first = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"conversation {convo}"},
        ]
        before = [r.state.counters.requests for r in replicas]
        for turn in range(3):
            messages = first + [{"role": "user", "content": f"turn {turn}"}] * turn
            resp = await p.client.post(
                "/v1/chat/completions", json={"model": "m", "messages": messages}
            )
            assert resp.status == 200
        grew = [r.state.counters.requests - b for r, b in zip(replicas, before, strict=True)]
        assert sorted(grew) == [0, 0, 3], grew
    # Different conversations spread over the replicas.
    assert sum(1 for r in replicas if r.state.counters.requests) >= 2


async def test_large_and_chunked_bodies_arrive_whole(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    text = "word " * 200_000  # ~1 MB: many TCP segments
    body = {**CHAT, "messages": [{"role": "user", "content": text}]}
    resp = await p.client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()

    async def chunks():  # type: ignore[no-untyped-def]
        raw = orjson.dumps(body)
        for i in range(0, len(raw), 65536):
            yield raw[i : i + 65536]

    resp = await p.client.post(
        "/v1/chat/completions", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200, await resp.text()
    assert orjson.loads(small.state.log[-1].body)["messages"][0]["content"] == text


async def test_chunked_body_over_the_limit_is_413(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy, server={"max_body_bytes": 1000})

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b" " * 500

    resp = await p.client.post(
        "/v1/chat/completions", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_a_body_that_does_not_arrive_in_time_is_408_and_reaches_no_engine(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small, large, p = await _two_engines(start_fake, start_proxy, server={"body_timeout_s": 0.5})
    # (before: the proxy waited for the rest of the body for as long as the client liked)
    reader, writer = await _raw_chat_post(p, b'{"model":', length=100)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        assert head.startswith(b"HTTP/1.1 408 ")
        length = int(next(
            line.split(b":", 1)[1] for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ))  # fmt: skip
        error = orjson.loads(await reader.readexactly(length))["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        assert "0.5 s" in error["message"]
    finally:
        writer.close()
    assert small.state.counters.requests == large.state.counters.requests == 0
    # a body sent whole is not held to the bound at all (it came with the head)
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "small-model"})
    assert resp.status == 200, await resp.text()


async def test_engine_slower_than_its_whole_request_timeout_mid_stream_ends_the_stream(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    slow = await start_fake("m", tokens_per_s=5, completion_tokens=50)
    # first_token_s well above the 0.2 s between tokens: an event-loop stall of a loaded machine
    # must not look like a replica's silence
    timeouts = {"connect_s": 1, "first_token_s": 3, "total_s": 1.0}
    p = await start_proxy([engine_config("e", "m", [slow.url], timeouts=timeouts)])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert resp.status == 200
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    assert payloads[-1] == b"[DONE]"
    error = orjson.loads(payloads[-2])["error"]
    assert error["code"] == "upstream_timeout"
    await wait_until(lambda: slow.state.counters.aborted == 1)  # the engine was told to stop
    replica = p.services.engines[0].replicas[0]
    assert replica.inflight == 0
    # a token every 0.2 s: the replica was answering, the request's own time ran out
    # (before: a breaker failure, and three such long answers took the replica out of rotation)
    assert replica.breaker.failures == 0 and replica.breaker.state == "closed"


async def test_a_replica_that_stalls_mid_stream_until_the_deadline_is_a_breaker_failure(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    stalled = await start_fake("m", tokens_per_s=0.2, completion_tokens=50)  # 5 s a token
    # The first token comes at once and must beat first_token_s even on a loaded machine; then
    # the replica is silent (2 s > first_token_s) until the deadline.
    timeouts = {"connect_s": 1, "first_token_s": 1.0, "total_s": 2.0}
    p = await start_proxy([engine_config("e", "m", [stalled.url], timeouts=timeouts)])
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert resp.status == 200
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    assert orjson.loads(payloads[-2])["error"]["code"] == "upstream_timeout"
    await wait_until(lambda: stalled.state.counters.aborted == 1)
    replica = p.services.engines[0].replicas[0]
    assert replica.inflight == 0 and replica.breaker.failures == 1  # silent past first_token_s


def _constant_encoder(texts: list[str]) -> np.ndarray:
    """A stand-in embedding model: the same unit vector for every text."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    out[:, 0] = 1.0
    return out


async def _proxy_with_embedder(start_fake: StartFake, aiohttp_client: Any, tmp_path: Path) -> Any:
    """The proxy with the semantic cache and a stand-in embedder: the last user turn is read."""
    engine = await start_fake("small-model")
    settings = Settings.model_validate(
        {
            "engines": [engine_config("small", "small-model", [engine.url])],
            "policies": None,
            "data_dir": str(tmp_path / "data"),
            "cache": {"enabled": True, "semantic": True},
            "routing": {"enabled": False},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    return engine, await aiohttp_client(
        create_app(settings, encode=_constant_encoder, access_log=False)
    )


@pytest.mark.parametrize("text", [5, None])
async def test_a_text_part_that_is_not_a_string_is_a_400(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path, text: object
) -> None:
    engine, client = await _proxy_with_embedder(start_fake, aiohttp_client, tmp_path)
    content = [{"type": "text", "text": text}]
    body = {**CHAT, "messages": [{"role": "user", "content": content}], "temperature": 0}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[0].content[0].text"
    assert engine.state.counters.requests == 0
    metrics = await (await client.get("/metrics")).text()
    assert 'status="400"' in metrics and 'status="200"' not in metrics


def _access_lines(p: Any) -> io.BytesIO:
    """Send the proxy's access lines (JSON) to a buffer the test reads."""
    buffer = io.BytesIO()
    p.services.access_log = AccessLog(json=True, stream=buffer)
    return buffer


async def test_an_unexpected_error_is_an_openai_500_logged_once_and_counted(
    start_fake: StartFake,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, p = await _two_engines(start_fake, start_proxy)
    access = _access_lines(p)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    # (through the engine client's transport: the compiled build's functions can't be patched)
    monkeypatch.setattr(p.services.caller, "_transport", broken)
    with structlog.testing.capture_logs() as logs:
        resp = await p.client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-bug"}
        )
    assert resp.status == 500
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-request-id"] == "req-bug"
    error = (await resp.json())["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "a bug" not in error["message"]  # the details are for the log, not the client
    (logged,) = [e for e in logs if e["event"] == "unexpected error"]
    assert logged["request_id"] == "req-bug"
    assert isinstance(logged["exc_info"], RuntimeError)
    # not logged twice (aiohttp's own "Error handling request"); its access lines may show
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= 30]
    await asyncio.sleep(0)  # the access line is written a loop turn after the response
    assert orjson.loads(access.getvalue())["status"] == 500
    metrics = await (await p.client.get("/metrics")).text()
    assert 'status="500"' in metrics and 'status="200"' not in metrics

    # Outside the completion path too (here /healthz), a bug is an OpenAI-shaped 500. (Put in
    # through the thin handlers' module, which stays Python in the compiled build.)
    monkeypatch.setattr(handlers, "_json", broken)
    resp = await p.client.get("/healthz")
    assert resp.status == 500
    assert (await resp.json())["error"]["code"] == "internal_error"


async def _bare_proxy_app(start_fake: StartFake, tmp_path: Path) -> web.Application:
    engine = await start_fake("small-model")
    settings = Settings.model_validate(
        {
            "engines": [engine_config("small", "small-model", [engine.url])],
            "policies": None,
            "data_dir": str(tmp_path / "data"),
            "cache": {"enabled": False},
            "embeddings": {"enabled": False},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    return create_app(settings, access_log=False)


async def test_an_exception_escaping_the_error_middleware_is_the_same_openai_500(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    app = await _bare_proxy_app(start_fake, tmp_path)

    @web.middleware
    async def outermost(request: web.Request, handler: Any) -> web.StreamResponse:
        raise RuntimeError("a bug outside the error middleware")

    app.middlewares.insert(0, outermost)  # runs before, so outside, the error middleware
    client = await aiohttp_client(ProxyServer(app))
    with structlog.testing.capture_logs() as logs:
        # (aiohttp's own 500 was text/plain, or text/html for a client that accepts it)
        resp = await client.get("/healthz", headers={"Accept": "text/html"})
    assert resp.status == 500
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.read() == InternalError().to_json()  # the middleware's own 500
    assert resp.headers["Connection"] == "close"  # as aiohttp closes it
    (logged,) = [e for e in logs if e["event"] == "unexpected error"]
    assert isinstance(logged["exc_info"], RuntimeError)
    assert logged["path"] == "/healthz"


async def test_a_bug_after_a_response_began_drops_the_connection_and_is_logged_once(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    app = await _bare_proxy_app(start_fake, tmp_path)

    async def half_then_bug(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"half")
        raise RuntimeError("a bug mid-response")

    app.router.add_get("/half", half_then_bug)
    client = await aiohttp_client(ProxyServer(app))
    with structlog.testing.capture_logs() as logs:
        resp = await client.get("/half")
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):  # cut, not followed by an error body
            await resp.read()
    (logged,) = [e for e in logs if e["event"] == "unexpected error"]
    assert isinstance(logged["exc_info"], RuntimeError)
    assert logged["path"] == "/half"


async def test_a_body_that_cannot_be_decoded_is_a_400(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    resp = await p.client.post(
        "/v1/chat/completions",
        data=b'{"model": "small-model"}',
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "could not be decoded" in error["message"]
    assert small.state.counters.requests == 0


async def _raw_post(p: Any, path: str, body: bytes, headers: bytes) -> bytes:
    """A request written byte for byte: header values no HTTP client library would send."""
    server = p.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n" + headers
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    await writer.drain()
    response = await reader.read()
    writer.close()
    return response


@pytest.mark.parametrize(
    "request_id", [b"caf\xe9", b"\xff\xfe", b"tab\there", b"x" * 500, "caf\u00e9".encode()]
)
async def test_a_request_id_that_is_not_printable_ascii_is_replaced(
    start_fake: StartFake, start_proxy: StartProxy, request_id: bytes
) -> None:
    small, _, p = await _two_engines(start_fake, start_proxy)
    access = _access_lines(p)
    response = await _raw_post(
        p, "/v1/chat/completions", orjson.dumps(CHAT), b"x-request-id: " + request_id + b"\r\n"
    )
    head, _, _ = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    [sent] = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
    generated = sent.split(b":", 1)[1].strip().decode("ascii")
    assert generated and generated.isprintable() and len(generated) <= 128
    assert dict((k.lower(), v) for k, v in small.state.log[-1].headers)["x-request-id"] == generated
    await asyncio.sleep(0)  # the access line is written a loop turn after the response
    assert orjson.loads(access.getvalue())["request_id"] == generated


async def test_a_retry_does_not_restart_the_total_timeout(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # Both replicas hang: a non-streamed call has only total_s, whichever replica it tries.
    # (2 s; a second total_s would make it at least 4 s. Stalls only add time: the bound leaves
    # them 1.5 s.)
    hung = [await start_fake("m", hang=True) for _ in range(2)]
    timeouts = {"connect_s": 1, "first_token_s": 2.0, "total_s": 2.0}
    p = await start_proxy([engine_config("e", "m", [h.url for h in hung], timeouts=timeouts)])
    started = time.monotonic()
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    took = time.monotonic() - started
    assert resp.status == 504
    assert took < 3.5, f"{took:.2f}s: the retry started a second total_s"


async def test_a_streamed_retry_ends_at_the_first_attempts_deadline(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # Both replicas hang, so the first attempt waits first_token_s; then the hang is lifted and
    # the retry's replica streams slowly. The stream must end at total_s from the request's
    # start (3 s), not first_token_s + total_s (at least 4.5 s). The retry has first_token_s to
    # see its first token, and the bound leaves a loaded machine's event-loop stalls 1 s.
    replicas = [await start_fake("m", hang=True, tokens_per_s=10, completion_tokens=100)
                for _ in range(2)]  # fmt: skip
    timeouts = {"connect_s": 1, "first_token_s": 1.5, "total_s": 3.0}
    p = await start_proxy([engine_config("e", "m", [r.url for r in replicas], timeouts=timeouts)])
    started = time.monotonic()
    task = asyncio.create_task(
        p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    )
    # the first attempt gave up and the retry is on its way
    await wait_until(lambda: sum(r.state.counters.aborted for r in replicas) == 1)
    await wait_until(lambda: sum(r.state.counters.requests for r in replicas) == 2)
    for r in replicas:
        r.configure(hang=False)
    resp = await task
    assert resp.status == 200
    payloads = parse_all(await asyncio.wait_for(resp.read(), 5))
    took = time.monotonic() - started
    assert orjson.loads(payloads[-2])["error"]["code"] == "upstream_timeout"
    assert took < 4.0, f"{took:.2f}s: the retry had a total_s of its own"


async def test_an_engine_serving_a_hugging_face_id(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    name = "Qwen/Qwen2.5-0.5B-Instruct"  # vLLM's default served-model name
    engine = await start_fake(name)
    p = await start_proxy([engine_config("e", name, [engine.url])])  # open mode: no policies
    resp = await p.client.post("/v1/chat/completions", json={**CHAT, "model": name})
    assert resp.status == 200
    card = await (await p.client.get(f"/v1/models/{name}")).json()
    assert card["id"] == name


async def test_requests_in_flight_are_on_metrics_while_they_run(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # 3 s answers: both are still streaming when /metrics is read, even on a loaded machine
    slow = await start_fake("m", tokens_per_s=10, completion_tokens=30)
    p = await start_proxy([engine_config("e", "m", [slow.url])])

    async def in_flight() -> float | None:
        text = await (await p.client.get("/metrics")).text()
        for line in text.splitlines():
            if line.startswith('frugal_requests_in_flight{tier="open"}'):
                return float(line.split()[-1])
        return None

    streams = [
        await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
        for _ in range(2)
    ]
    assert [s.status for s in streams] == [200, 200]
    assert await in_flight() == 2  # (before: the gauge had no samples at all)
    for stream in streams:
        await stream.read()
    bad = await p.client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert bad.status in (400, 404)

    async def drained() -> bool:
        return await in_flight() == 0

    await wait_until(drained)  # (decremented just after each response is written)
    assert await in_flight() == 0


async def test_a_half_open_probe_streaming_a_long_answer_does_not_hold_the_replica_back(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m", tokens_per_s=10, completion_tokens=30)  # a 3 s answer
    p = await start_proxy([engine_config("e", "m", [engine.url])])
    replica = p.services.engines[0].replicas[0]
    replica.breaker._open(time.monotonic() - replica.breaker.open_s)  # open, and due a probe
    probe = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    assert probe.status == 200
    await probe.content.readany()  # its first token: the replica answers
    other = await p.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": True})
    # (before: 503 no_healthy_replica until the probe's whole answer was done)
    assert other.status == 200
    assert replica.breaker.state == "closed"
    other.close()
    probe.close()


async def test_a_replica_too_busy_for_first_token_s_is_not_taken_out_of_rotation(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    # Every stream's first token takes 3 s, first_token_s is 1 s: an overloaded engine.
    slow = await start_fake("m", ttft_ms=3000)
    timeouts = {"connect_s": 1, "first_token_s": 1.0, "total_s": 5}
    breaker = {"failure_threshold": 1, "open_s": 60}
    p = await start_proxy([engine_config("e", "m", [slow.url], timeouts=timeouts, breaker=breaker)])
    replica = p.services.engines[0].replicas[0]
    await wait_until(lambda: replica.healthy is True)
    body = {**CHAT, "model": "m", "stream": True}

    async def burst(answering_others: bool) -> list[int]:
        posts = [
            asyncio.ensure_future(p.client.post("/v1/chat/completions", json=body))
            for _ in range(4)
        ]
        await wait_until(lambda: replica.inflight == 4)
        if answering_others:
            # Another client's answer began while these waited (what a slow, working replica
            # does; this fake engine answers nobody within first_token_s).
            replica.answered_at = time.monotonic()
        return [r.status for r in await asyncio.gather(*posts)]

    # Timed out together, queued behind each other, while the replica answered others: slow.
    assert await burst(answering_others=True) == [504] * 4
    assert replica.breaker.state == "closed" and replica.breaker.failures == 0
    # The same, but the replica answered nobody meanwhile: hung, however busy.
    assert await burst(answering_others=False) == [504] * 4
    assert replica.breaker.state == "open"
    resp = await p.client.post("/v1/chat/completions", json=body)
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_healthy_replica"
    # Alone, a timeout is the replica's fault too (the breaker opens at once: threshold 1).
    replica.breaker.on_success()
    await wait_until(lambda: replica.load.running == 0)  # polled again since the others left
    replica.answered_at = time.monotonic() + 60  # even one that "answers": nobody was ahead
    assert (await p.client.post("/v1/chat/completions", json=body)).status == 504
    assert replica.breaker.state == "open"
