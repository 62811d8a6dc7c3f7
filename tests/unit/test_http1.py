"""The lean HTTP/1.1 client against scripted servers: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engines import http1
from proxy.engines.http1 import LeanClient, MalformedAnswer, _chunked_end, _dechunk

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server answering each connection with ``script``; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        finally:
            writer.close()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()


async def read_request(server: Server, reader: asyncio.StreamReader) -> bytes | None:
    """One request (head + Content-Length body), or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    server.requests.append(head + body)
    return body


def answer(body: bytes, *, status: int = 200, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
        % (status, extra, len(body))
        + body
    )


Serve = Callable[[Script], Awaitable[tuple["Server", str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[Server] = []

    async def start(script: Script) -> tuple[Server, str]:
        server = Server(script)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.stop()


async def echo_keepalive(
    server: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    while (body := await read_request(server, reader)) is not None:
        w.write(answer(b'{"echo":' + body + b"}"))
        await w.drain()


async def test_keep_alive_reuses_one_connection(serve: Serve) -> None:
    server, url = await serve(lambda r, w: echo_keepalive(server, r, w))
    client = LeanClient()
    for i in range(5):
        response = await client.post(url, b"%d" % i, {"Content-Type": "application/json"}, 1.0)
        assert response.status == 200
        assert await response.read() == b'{"echo":%d}' % i
        assert response.headers["content-type"] == "application/json"
        response.release()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 1\r\n" in first
    client.close()


async def test_a_closed_response_is_not_reused(serve: Serve) -> None:
    server, url = await serve(lambda r, w: echo_keepalive(server, r, w))
    client = LeanClient()
    for _ in range(3):
        response = await client.post(url, b"1", {}, 1.0)
        response.close()  # what the caller does on failure or abort
    assert server.connections == 3
    client.close()


async def test_concurrent_calls_use_their_own_connections(serve: Serve) -> None:
    server, url = await serve(lambda r, w: echo_keepalive(server, r, w))
    client = LeanClient()
    responses = await asyncio.gather(*(client.post(url, b"%d" % i, {}, 1.0) for i in range(4)))
    assert sorted([await r.read() for r in responses]) == [b'{"echo":%d}' % i for i in range(4)]
    for r in responses:
        r.release()
    assert server.connections == 4
    again = await client.post(url, b"9", {}, 1.0)  # an idle one is reused
    again.release()
    assert server.connections == 4
    client.close()


async def test_chunked_answer_in_pieces(serve: Serve) -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await read_request(server, reader) is not None:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (
                b"5\r\nhello\r\n",
                b"1;ext=1\r\n ",
                b"\r\n",
                b"5\r\nworld\r\n0\r\n",
                b"\r\n",
            ):
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0.01)

    server, url = await serve(script)
    assert await post_twice(url) == [b"hello world"] * 2
    assert server.connections == 1


async def post_twice(url: str) -> list[bytes]:
    """Two requests in turn through one client (the second may reuse the first's connection)."""
    client = LeanClient()
    bodies: list[bytes] = []
    for _ in range(2):
        response = await client.post(url, b"{}", {}, 1.0)
        bodies.append(await response.read())
        response.release()
    client.close()
    return bodies


async def test_answer_delimited_by_close_and_connection_close(serve: Serve) -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(server, reader)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await w.drain()

    server, url = await serve(script)
    assert await post_twice(url) == [b"until the end"] * 2
    assert server.connections == 2  # not reusable: a new connection the second time


async def test_engine_closing_an_idle_connection_is_not_an_error(serve: Serve) -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(server, reader)
        w.write(answer(b"{}"))
        await w.drain()
        # then close the kept-alive connection (as uvicorn does after its keep-alive timeout)

    server, url = await serve(script)
    client = LeanClient()
    first = await client.post(url, b"{}", {}, 1.0)
    first.release()
    # the close arrives (wait for it: a fixed 50 ms sleep was over first on a loaded machine)
    [idle] = client._idle.values()
    for _ in range(500):
        if not idle or idle[0].closed:
            break
        await asyncio.sleep(0.01)
    assert not idle or idle[0].closed
    second = await client.post(url, b"{}", {}, 1.0)
    assert second.status == 200
    second.release()
    assert server.connections == 2
    client.close()


async def test_a_connection_idle_too_long_is_not_reused(serve: Serve) -> None:
    # The client's clock, moved by hand: with a real 50 ms limit, a stall of a loaded machine
    # between two requests "at once" made the second one a new connection.
    now = [1000.0]
    server, url = await serve(lambda r, w: echo_keepalive(server, r, w))
    client = LeanClient(clock=lambda: now[0])
    first = await client.post(url, b"1", {}, 1.0)
    first.release()
    now[0] += http1.MAX_IDLE_S - 0.01
    second = await client.post(url, b"2", {}, 1.0)  # just inside the limit: the same connection
    second.release()
    assert server.connections == 1
    now[0] += http1.MAX_IDLE_S + 0.01  # past the idle limit: the engine might be closing it
    third = await client.post(url, b"3", {}, 1.0)
    third.release()
    assert server.connections == 2
    client.close()


async def test_close_before_the_whole_answer_is_a_connection_error(serve: Serve) -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(server, reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await w.drain()

    server, url = await serve(script)
    with pytest.raises(ConnectionResetError):
        await LeanClient().post(url, b"{}", {}, 1.0)


async def test_not_http_is_malformed(serve: Serve) -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(server, reader)
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    server, url = await serve(script)
    with pytest.raises(MalformedAnswer):
        await LeanClient().post(url, b"{}", {}, 1.0)
    assert issubclass(MalformedAnswer, OSError)  # the engine caller maps it as a failed replica


async def test_connection_refused_is_an_os_error() -> None:
    with pytest.raises(OSError):
        await LeanClient().post("http://127.0.0.1:9/v1/completions", b"{}", {}, 1.0)


async def test_cancelling_a_call_closes_its_connection(serve: Serve) -> None:
    gone = asyncio.Event()

    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(server, reader)
        await reader.read()  # returns at EOF: the proxy closed the connection
        gone.set()

    server, url = await serve(script)
    call = asyncio.create_task(LeanClient().post(url, b"{}", {}, 1.0))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(gone.wait(), 2)  # the engine saw the close: it aborts the work


async def test_interim_answer_is_skipped(serve: Serve) -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(server, reader)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"ok", status=201))
        await w.drain()

    server, url = await serve(script)
    response = await LeanClient().post(url, b"{}", {}, 1.0)
    assert (response.status, await response.read()) == (201, b"ok")


def test_keep_alive_on_uvloop() -> None:
    """The proxy runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def main() -> list[bytes]:
        server = Server(lambda r, w: echo_keepalive(server, r, w))
        url = await server.start()
        client = LeanClient()
        bodies = []
        for i in range(3):
            response = await client.post(url, b"%d" % i, {}, 1.0)
            bodies.append(await response.read())
            response.release()
        assert server.connections == 1
        client.close()
        await server.stop()
        return bodies

    assert uvloop.run(main()) == [b'{"echo":%d}' % i for i in range(3)]


def test_handles_plain_http_only_and_clean_headers() -> None:
    client = LeanClient()
    assert client.handles("http://127.0.0.1:8000/v1/completions", {"x-request-id": "abc"})
    assert not client.handles("https://engine.example/v1/completions", {})
    assert not client.handles("http://127.0.0.1:8000/v1/completions", {"x-request-id": "a\r\nb: c"})
    assert not client.handles("http://user:pw@127.0.0.1:8000/v1/completions", {})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    st.integers(min_value=1, max_value=7),
)
def test_chunked_framing_round_trips(pieces: list[bytes], cut: int) -> None:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    buffer = bytearray(b"HEAD" + encoded)
    end, _ = _chunked_end(buffer, 4)
    assert end == len(buffer)
    assert _dechunk(buffer, 4, end) == b"".join(pieces)
    # Any proper prefix is incomplete, never mis-framed; scanning on from where a prefix
    # stopped, as bytes arrive, finds the same end.
    resume = 4
    for at in range(4, len(buffer), cut):
        partial = bytearray(buffer[:at])
        assert _chunked_end(partial, 4)[0] == -1
        found, resume = _chunked_end(partial, resume)
        assert found == -1
    assert _chunked_end(buffer, resume)[0] == len(buffer)
