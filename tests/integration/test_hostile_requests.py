"""Requests a tenant could send to hurt the proxy: each is a bounded OpenAI-shaped 4xx, never a
500, a hang, or an echo as large as what was sent. The engine sees none of them."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web_protocol
from aiohttp.http_parser import HttpRequestParserPy

from proxy.observability.access import AccessLog
from proxy.observability.metrics import iter_samples
from tests.integration.conftest import Proxy, StartFake, StartProxy, engine_config, wait_until
from tests.integration.test_policy_pipeline import FREE_KEY, auth, tier, write_policies


async def _budgeted_proxy(start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path) -> Any:
    # A budget makes the proxy write the body again (it sends the tier's max_tokens cap) and
    # bound the prompt's tokens: the steps that re-encode what the client sent.
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 5.0}))
    engine = await start_fake("small-model")
    proxy = await start_proxy(
        [engine_config("small", "small-model", [engine.url])], policies=str(folder)
    )
    return engine, proxy


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "body",
    [
        # a field the proxy passes through untouched, and a content part's extra field
        '{"model":"small-model","messages":[{"role":"user","content":"hi"}],"metadata":{"x":%s}}',
        '{"model":"small-model","messages":[{"role":"user","content":'
        '[{"type":"text","text":"hi","x":%s}]}]}',
    ],
)
async def test_a_body_nested_deeper_than_the_proxy_can_write_is_a_400(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, body: str
) -> None:
    engine, proxy = await _budgeted_proxy(start_fake, start_proxy, tmp_path)
    resp = await proxy.client.post(
        "/v1/chat/completions",
        data=body % _nested(300),
        headers={**auth(FREE_KEY), "Content-Type": "application/json"},
    )
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "nest" in error["message"]
    assert engine.state.counters.requests == 0
    # shallower nesting passes on to the engine as before
    ok = await proxy.client.post(
        "/v1/chat/completions",
        data=body % _nested(100),
        headers={**auth(FREE_KEY), "Content-Type": "application/json"},
    )
    assert ok.status == 200


async def test_an_unknown_model_s_name_is_not_echoed_whole(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await _budgeted_proxy(start_fake, start_proxy, tmp_path)
    name = "m" * 1_000_000
    resp = await proxy.client.post(
        "/v1/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(FREE_KEY),
    )
    assert resp.status == 404
    body = await resp.read()
    assert len(body) < 1000
    assert "1000000 characters" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("n", 129), ("n", 100_000), ("best_of", 129), ("best_of", 100_000)]
)
async def test_n_beyond_openai_s_maximum_is_a_400(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, field: str, value: int
) -> None:
    # n multiplies the engine's work; max_tokens: 1 made 100,000 choices fit any budget. best_of
    # (vLLM's: that many sampled, the n best returned) multiplies it as well.
    engine, proxy = await _budgeted_proxy(start_fake, start_proxy, tmp_path)
    resp = await proxy.client.post(
        "/v1/chat/completions",
        json={
            "model": "small-model",
            "messages": [{"role": "user", "content": "hi"}],
            field: value,
            "max_tokens": 1,
        },
        headers=auth(FREE_KEY),
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == field
    assert "128" in error["message"]
    assert engine.state.counters.requests == 0


# -- requests aiohttp's HTTP parser refuses before the app sees them ---------------------------

CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
CHAT_BODY = b'{"model":"small-model","messages":[{"role":"user","content":"hi"}]}'


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def _connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = proxy.client.server
    return await asyncio.open_connection(server.host, server.port)


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in lines:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return RawResponse(int(status_line.split()[1]), headers, body)


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 10) == b""


def _chat(body: bytes = CHAT_BODY) -> bytes:
    return CHAT_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


MALFORMED = {
    "bad request line": (b"GET /healthz HTTP/1.1 x\r\nHost: x\r\n\r\n", "status line"),
    "bad URL": (b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n", "url"),
    "method the parser refuses": (b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    "invalid header name": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", "header"),
    "control character in a header value": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
        "header value",
    ),
    "header line over the limit": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9_000 + b"\r\n\r\n",
        "8190 bytes",
    ),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        + b"\r\n",
        "too many headers",
    ),
    "bad Content-Length": (CHAT_HEAD + b"Content-Length: abc\r\n\r\n{}", "content-length"),
    "two Content-Lengths": (
        CHAT_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "content-length",
    ),
    "Content-Length and Transfer-Encoding": (
        CHAT_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "transfer-encoding",
    ),
    "broken chunked body": (
        CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "chunk size",
    ),
    "garbage bytes": (b"\x00\x01\x02\xff\xfe garbage \r\n\r\n", "method"),
    "TLS on the plain port": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40,
        "https",
    ),
}


@pytest.mark.parametrize(("sent", "named"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_request_the_http_parser_refuses_is_an_openai_shaped_400(
    start_fake: StartFake,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    named: str,
) -> None:
    engine = await start_fake("small-model")
    proxy = await start_proxy([engine_config("small", "small-model", [engine.url])])
    reader, writer = await _connect(proxy)
    try:
        with structlog.testing.capture_logs() as logs:
            writer.write(sent)
            resp = await _read_response(reader)
            assert await _closed(reader)  # as aiohttp does: the rest cannot be trusted
    finally:
        writer.close()
    assert resp.status == 400, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    error = orjson.loads(resp.body)["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "malformed_http",
    )
    assert named in error["message"].lower()
    assert len(error["message"]) <= 200  # names the fault; never echoes what was sent
    assert b"aaaaaaaaaa" not in resp.body
    assert engine.state.counters.requests == 0
    # One line saying why, not aiohttp's "Error handling request" and a traceback.
    (logged,) = [e for e in logs if e["event"] == "malformed request"]
    assert logged["error"] == error["message"]
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= 30]


@pytest.mark.parametrize("parser", ["c", "pure-python"])
async def test_a_chunked_body_that_breaks_after_its_first_chunk_is_a_400_at_once(
    start_fake: StartFake,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    parser: str,
) -> None:
    if parser == "pure-python":  # (what aiohttp parses with where its C extension is missing)
        monkeypatch.setattr(web_protocol, "HttpRequestParser", HttpRequestParserPy)
    engine = await start_fake("small-model")
    # A short bound, so a proxy that waits for the rest of the body shows it as a 408.
    proxy = await start_proxy(
        [engine_config("small", "small-model", [engine.url])], server={"body_timeout_s": 2.0}
    )

    def reading_the_body() -> bool:  # (counted in flight just before the body is read)
        return any(
            s.name == "frugal_requests_in_flight" and s.value == 1
            for s in iter_samples(proxy.services.metrics.registry)
        )

    first = CHAT_BODY[:20]
    reader, writer = await _connect(proxy)
    try:
        writer.write(
            CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(first), first)
        )
        await wait_until(reading_the_body)
        assert reading_the_body()
        # The next chunk-size line is not one: the break comes on a later read, not the first.
        writer.write(b"zz\r\n" + CHAT_BODY[20:] + b"\r\n0\r\n\r\n")
        resp = await _read_response(reader)
        # (before: 408 once body_timeout_s had passed with the C parser, 500 with the pure-Python
        # one)
        assert resp.status == 400, resp.body
        error = orjson.loads(resp.body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "malformed_http")
        assert "chunked" in error["message"]
        assert resp.headers["connection"] == "close"
        assert await _closed(reader)  # one answer, then the connection ends
    finally:
        writer.close()
    assert engine.state.counters.requests == 0
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= 30]


async def test_requests_before_a_malformed_one_on_the_connection_are_served_and_counted(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("small-model")
    proxy = await start_proxy([engine_config("small", "small-model", [engine.url])])
    buffer = io.BytesIO()
    proxy.services.access_log = AccessLog(json=True, stream=buffer)
    reader, writer = await _connect(proxy)
    try:
        for _ in range(2):  # keep-alive: both on the one connection
            writer.write(_chat())
            ok = await _read_response(reader)
            assert ok.status == 200, ok.body
            assert ok.headers["content-type"].startswith("application/json")
            assert orjson.loads(ok.body)["object"] == "chat.completion"
        writer.write(b"\x00\x01 garbage\r\n\r\n")
        refused = await _read_response(reader)
        assert await _closed(reader)
    finally:
        writer.close()
    assert refused.status == 400
    assert orjson.loads(refused.body)["error"]["code"] == "malformed_http"
    assert engine.state.counters.requests == 2
    # The refused request never reached the pipeline: no tenant, no model, so neither an access
    # line nor a count of its own (as a path that does not exist).
    await wait_until(lambda: buffer.getvalue().count(b"\n") >= 2)
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["status"] for line in lines] == [200, 200]
    counted = {
        sample.labels["status"]: sample.value
        for family in proxy.services.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "frugal_requests_total"
    }
    assert counted == {"200": 2.0}
