"""``frugal serve`` and ``frugal fake-engine`` failing to start: a config that only building
the app finds wrong, a bad --port (exit 2), a port in use (exit 1); one line, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy import server
from proxy.cache.store import DirectoryLock
from proxy.cli import main
from proxy.demo import up
from proxy.engines import fake

ENGINE = "engines:\n  - {name: small, model: m, urls: ['http://127.0.0.1:9']}\n"
OFF = "cache: {enabled: false}\nembeddings: {enabled: false}\n"


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    # serve configures process-wide logging; the test leaves it as it found it.
    monkeypatch.setattr(server, "configure_logging", lambda **_: None)


def _serve(
    tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str], port: int = 0
) -> tuple[int, str]:
    path = tmp_path / "frugal.yaml"
    path.write_text(config)
    code = main(["serve", "--config", str(path), "--port", str(port)])
    return code, capsys.readouterr().err


def test_open_access_on_a_public_host_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _serve(tmp_path, "server: {host: 0.0.0.0}\n" + ENGINE + OFF, capsys)
    assert code == 2
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith(f"{tmp_path / 'frugal.yaml'}: server.host: 0.0.0.0 ")
    assert "server.allow_open" in line


def test_an_invalid_policy_folder_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiers").mkdir()
    (tmp_path / "tiers" / "free.yaml").write_text("tier: free\nbogus: 1\n")
    code, err = _serve(tmp_path, "policies: tiers\n" + ENGINE + OFF, capsys)
    assert code == 2
    assert "Traceback" not in err
    first, *issues = err.splitlines()
    assert first.endswith(f"policies: {tmp_path / 'tiers'}: invalid tier policies")
    assert any("free.yaml:2 bogus" in issue for issue in issues)


def test_a_policy_folder_named_in_the_config_but_missing_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (before: a warning, and the proxy ran open: keyless on loopback)
    code, err = _serve(tmp_path, "policies: tiers\n" + ENGINE + OFF, capsys)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(f"{tmp_path / 'frugal.yaml'}: policies: {tmp_path / 'tiers'} is not a")


@pytest.mark.parametrize("field", ["data_dir", "cache.data_dir"])
def test_a_data_folder_that_cannot_be_made_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    sections = (
        f"data_dir: {blocker}\ncache: {{semantic: false}}\n"
        if field == "data_dir"
        else f"data_dir: {tmp_path / 'data'}\ncache: {{semantic: false, data_dir: {blocker}}}\n"
    )
    config = ENGINE + sections + "embeddings: {enabled: false}\npolicies: null\n"
    # (before: a NotADirectoryError traceback out of the cache's start-up)
    code, err = _serve(tmp_path, config, capsys)
    assert code == 1
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith(f"frugal: {field}: cannot use {blocker}")
    assert "Not a directory" in line
    code, err = _serve(tmp_path, config.replace(str(blocker), str(blocker / "sub")), capsys)
    assert code == 1
    assert err.startswith(f"frugal: {field}: cannot use {blocker / 'sub'}: Not a directory")


def test_a_cache_folder_another_proxy_uses_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cache"
    other = DirectoryLock(folder)  # held as another proxy process would hold it
    config = (
        ENGINE + f"data_dir: {tmp_path / 'data'}\ncache: {{semantic: false, data_dir: {folder}}}\n"
    )
    try:
        code, err = _serve(
            tmp_path, config + "embeddings: {enabled: false}\npolicies: null\n", capsys
        )
    finally:
        other.release()
    assert code == 1
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith(f"frugal: cache.data_dir: cannot use {folder}: in use by another proxy")
    assert f"pid {os.getpid()}" in line


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "fake-engine", "up"])
@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_outside_0_to_65535_is_a_usage_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    port: str,
) -> None:
    def started(*_: object, **__: object) -> None:
        raise AssertionError("started a server")  # 99999 used to bind some free port instead

    monkeypatch.setattr(server, "run_proxy", started)
    monkeypatch.setattr(fake, "run_fake_engine", started)
    # (before: `up --port 99999` was taken, and the demo engines started before it failed)
    monkeypatch.setattr(up, "run_up", started)
    config = tmp_path / "frugal.yaml"
    config.write_text(ENGINE + OFF)
    argv = [command, "--port", port] + (["--config", str(config)] if command == "serve" else [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument --port: not a port number (0-65535): '{port}'" in capsys.readouterr().err


def test_serve_on_a_port_in_use_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], taken_port: int
) -> None:
    code, err = _serve(tmp_path, ENGINE + OFF, capsys, taken_port)
    assert code == 1
    assert err == f"frugal: cannot listen on 127.0.0.1:{taken_port}: Address already in use\n"


def test_fake_engine_on_a_port_in_use_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], taken_port: int
) -> None:
    assert main(["fake-engine", "--port", str(taken_port)]) == 1
    message = f"cannot listen on 127.0.0.1:{taken_port}: Address already in use\n"
    assert capsys.readouterr().err == f"frugal: {message}"
    with pytest.raises(SystemExit) as exit_:  # python -m proxy.engines.fake
        fake.main(["--port", str(taken_port)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"fake-engine: {message}"


async def test_fake_engine_on_port_0_says_the_port_it_took(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(fake.serve_fake_engine(fake.FakeEngineOptions(), "127.0.0.1", 0))
    try:
        for _ in range(200):
            if found := re.search(r"http://127\.0\.0\.1:(\d+)", capsys.readouterr().out):
                break
            await asyncio.sleep(0.01)
        assert found and found[1] != "0"
        async with aiohttp.ClientSession() as session, session.get(f"{found[0]}/health") as resp:
            assert resp.status == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _serving(
    tmp_path: Path,
    engine: fake.FakeEngineOptions,
    shutdown_timeout_s: float,
    server_extra: str = "",
) -> AsyncIterator[tuple[asyncio.Task[None], str]]:
    """``serve`` (the real entry point, with its signal handling) in front of a fake engine:
    its task and its URL, once it answers /healthz."""
    from proxy.settings import parse_settings

    engine_port, port = _free_port(), _free_port()
    engine_task = asyncio.create_task(fake.serve_fake_engine(engine, "127.0.0.1", engine_port))
    settings = parse_settings(
        f"engines:\n  - {{name: small, model: m, version: v1, urls: ['http://127.0.0.1:{engine_port}']}}\n"
        + OFF
        + f"policies: null\ndata_dir: {tmp_path / 'data'}\n"
        + f"server: {{shutdown_timeout_s: {shutdown_timeout_s}{server_extra}}}\n"
    )
    proxy = asyncio.create_task(server.serve(settings, host="127.0.0.1", port=port))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
        yield proxy, url
    finally:
        proxy.cancel()
        engine_task.cancel()
        await asyncio.gather(proxy, engine_task, return_exceptions=True)


STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_stop_signal_ends_requests_in_flight_within_the_shutdown_timeout(
    tmp_path: Path,
) -> None:
    hung = fake.FakeEngineOptions(model="m", hang=True)
    async with _serving(tmp_path, hung, 1) as (proxy, url), aiohttp.ClientSession() as session:

        async def call() -> None:
            async with session.post(f"{url}/v1/chat/completions", json=STREAM) as resp:
                await resp.read()

        calls = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.5)  # both wait on the hung engine
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler takes it
        # (before: aiohttp's 60 s, twice: the stop took 2 minutes)
        await asyncio.wait_for(proxy, timeout=10)
        assert time.monotonic() - started < 5
        await asyncio.gather(*calls, return_exceptions=True)


async def test_a_stream_cut_by_the_stop_ends_with_an_error_event_and_done(tmp_path: Path) -> None:
    """A stream still running when the stop's grace period runs out is told it was cut (an
    error event, then [DONE]) while its connection is open, as any broken stream is."""
    slow = fake.FakeEngineOptions(model="m", completion_tokens=200, tokens_per_s=10)
    async with _serving(tmp_path, slow, 2) as (proxy, url), aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=STREAM) as resp:
            assert resp.status == 200
            received = await resp.content.readuntil(b"\n\n")  # streaming has begun
            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler takes it
            # (before: the connection closed mid-stream, a payload error here)
            received += await asyncio.wait_for(resp.content.read(), 10)
        await asyncio.wait_for(proxy, timeout=10)
        assert time.monotonic() - started < 8  # the stop still ends (loose: CI machines stall)
    events = [e for e in received.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    assert b'"code":"shutting_down"' in events[-2], events[-2]
    assert len(events) > 3  # the answer's tokens came first


async def test_a_request_not_yet_answered_at_the_stop_gets_a_503_not_an_empty_reply(
    tmp_path: Path,
) -> None:
    """Non-streamed requests, and streams still waiting for their first token, that outlast
    the stop's grace period are answered 503 shutting_down just before aiohttp's deadline."""
    hung = fake.FakeEngineOptions(model="m", hang=True)
    async with _serving(tmp_path, hung, 2) as (proxy, url), aiohttp.ClientSession() as session:

        async def call(body: dict[str, object]) -> tuple[int, dict[str, object]]:
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                return resp.status, await resp.json()

        calls = [asyncio.create_task(call(b)) for b in (STREAM, {**STREAM, "stream": False})]
        await asyncio.sleep(0.5)  # both wait on the hung engine
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler takes it
        # (before: the connection closed with no response at all, logged as a 499)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
        await asyncio.wait_for(proxy, timeout=10)
        assert time.monotonic() - started < 8
    for status, body in answers:
        assert status == 503, body
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "shutting_down"


async def test_a_connection_that_never_finishes_its_request_head_is_closed(tmp_path: Path) -> None:
    engine = fake.FakeEngineOptions(model="m")
    async with _serving(tmp_path, engine, 1, ", keepalive_timeout_s: 0.5") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n")
        try:
            # (before: aiohttp's default through an AppRunner held it for an hour)
            assert await asyncio.wait_for(reader.read(), timeout=30) == b""  # closed, unanswered
        finally:
            writer.close()


# Requests aiohttp cannot parse: a control character in a header, a request line over its 8 KB
# limit, a header line without a colon. Each used to be an ERROR with the offending bytes.
MALFORMED = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: " + b"\x01" * 3000 + b"\r\n\r\n",
    b"GET /" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColon" + b"Z" * 4000 + b"\r\n\r\n",
)


async def test_requests_aiohttp_cannot_parse_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any client may send malformed requests at will: each is answered a 400 in OpenAI JSON and
    logged as one short info line (proxy/protocol.py), as a refused key is, never an error with
    a traceback and the bytes sent."""
    engine = fake.FakeEngineOptions(model="m")
    async with _serving(tmp_path, engine, 1) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        for i in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(MALFORMED[i % len(MALFORMED)])
            answer = await asyncio.wait_for(reader.read(), timeout=10)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b"\r\n", 1)[0].split()[1] == b"400", answer[:100]
            assert json.loads(body)["error"]["code"] == "malformed_http"
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # (before: 30 ERRORs "Error handling request", each with its traceback and up to 15 KB)
    assert logged == [], [r.getMessage()[:100] for r in logged]


async def test_bytes_that_are_not_http_get_openai_json_from_the_served_proxy(
    tmp_path: Path,
) -> None:
    engine = fake.FakeEngineOptions(model="m")
    async with _serving(tmp_path, engine, 1) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x01 not http\r\n\r\n")
        try:
            # (before: aiohttp's text/plain 400, which an OpenAI SDK cannot read)
            answer = await asyncio.wait_for(reader.read(), timeout=30)  # then it closes
        finally:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ")
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert json.loads(body)["error"]["code"] == "malformed_http"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _ready(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until /readyz says ready (the first health poll has seen the fake engine)."""
    for _ in range(200):
        async with session.get(f"{url}/readyz") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the proxy never became ready")


async def test_sigterm_first_drains_readyz_503_while_new_requests_are_served(
    tmp_path: Path,
) -> None:
    """For a zero-error rollout: after SIGTERM the proxy keeps serving for server.drain_delay_s
    while /readyz tells its load balancer to take it out of rotation, then stops as before."""
    engine = fake.FakeEngineOptions(model="m")
    delay_s, timeout_s = 2.0, 1.0
    extra = f", drain_delay_s: {delay_s}"
    async with (
        _serving(tmp_path, engine, timeout_s, extra) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        await _ready(session, url)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler takes it
        await asyncio.sleep(0.2)
        # (before: the listener was closed by now, and each of these was connection refused)
        async with session.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body["ready"] is False and body["reason"] == "draining", body
            assert "small" in body["engines"]  # still says how the engines are
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200  # liveness holds: a failing one gets the pod killed
        async with session.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"]
            # A kept-alive client is told to reconnect, so its next request goes to the load
            # balancer (and another replica), not down this connection to a proxy leaving.
            assert resp.headers.get("Connection") == "close"
        # a new connection too, not only the session's kept-alive one
        async with (
            aiohttp.ClientSession() as fresh,
            fresh.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp,
        ):
            assert resp.status == 200
            assert resp.headers.get("Connection") == "close"
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert not proxy.done()
        await asyncio.sleep(max(0.0, started + delay_s - 0.4 - time.monotonic()))
        assert not proxy.done()  # the whole delay is served
        await asyncio.wait_for(proxy, timeout=delay_s + timeout_s + 5)
        stopped = time.monotonic() - started
    assert delay_s - 0.4 <= stopped < delay_s + timeout_s + 1.5, stopped


async def test_a_second_signal_during_the_drain_stops_at_once(tmp_path: Path) -> None:
    engine = fake.FakeEngineOptions(model="m")
    async with (
        _serving(tmp_path, engine, 1, ", drain_delay_s: 30") as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        await _ready(session, url)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with session.get(f"{url}/readyz") as resp:
            assert resp.status == 503  # draining
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # an impatient supervisor, or a person
        await asyncio.wait_for(proxy, timeout=10)
        assert time.monotonic() - started < 2  # not the 30 s left of the delay


async def test_sigint_skips_the_drain(tmp_path: Path) -> None:
    """Ctrl-C is a person at a terminal, who wants the stop now, not a load balancer's delay."""
    engine = fake.FakeEngineOptions(model="m")
    async with (
        _serving(tmp_path, engine, 1, ", drain_delay_s: 30") as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        await _ready(session, url)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # serve's own handler takes it
        await asyncio.wait_for(proxy, timeout=10)
        assert time.monotonic() - started < 2


async def test_without_a_drain_delay_sigterm_closes_the_listener_at_once(tmp_path: Path) -> None:
    """The default (drain_delay_s 0) stops as it always did: no new connection is taken."""
    engine = fake.FakeEngineOptions(model="m")
    async with (
        _serving(tmp_path, engine, 1) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        await _ready(session, url)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(proxy, timeout=10)
        assert time.monotonic() - started < 2
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
