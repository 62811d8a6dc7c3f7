"""A lean HTTP/1.1 client for the engine calls that are not streamed.

aiohttp's ``ClientSession`` spends about 55 µs of CPU on a small POST on this machine (request
object, cookie jar, tracing hooks, a body-writer task that on Python 3.11 costs a turn of the
loop, response object, stream reader); the proxy's whole request path costs about as much. This
client does only what a non-streamed engine call needs (one POST, the whole answer read, the
connection kept alive for the next call) in about 15 µs, and ``AiohttpTransport`` uses it for
plain-``http`` engine calls that are not streamed. Streams, ``https`` engines, and anything out of
the ordinary stay on aiohttp.

Contract, as for the aiohttp transport (``engines/client.py``): the answer is returned once it is
complete (status, headers, body); ``release()`` gives the connection back for reuse, ``close()``
closes it (what makes an engine abort); a cancelled call closes its connection. Failures raise
``OSError`` subclasses (connection refused, reset, closed before the answer was complete, a
malformed answer), a connect timeout ``TimeoutError``: the engine caller maps them exactly as it
maps aiohttp's errors.

Framing: ``Content-Length``, ``Transfer-Encoding: chunked`` (trailers skipped) or, for an answer
with neither, read until the engine closes. A connection is reused only after a complete framed
answer without ``Connection: close`` on HTTP/1.1; idle connections the engine closes are dropped
when it closes them, and one idle for over ``MAX_IDLE_S`` is closed rather than reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy
from mypy_extensions import mypyc_attr

MAX_HEAD_BYTES = 64 * 1024  # status line and headers together
# An idle connection older than this is closed, not reused: uvicorn (vLLM's server) closes idle
# keep-alive connections after 5 s, and a request sent just as it does would fail the replica.
MAX_IDLE_S = 4.0


@mypyc_attr(native_class=False)  # (the compiled build's classes derive from Exception alone)
class MalformedAnswer(ConnectionError):
    """The engine's answer is not HTTP/1.x as this client reads it."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; reads one answer at a time."""

    __slots__ = (
        "_body_end",
        "_buffer",
        "_chunk_at",
        "_chunked",
        "_head_end",
        "_length",
        "_pool",
        "_waiter",
        "closed",
        "head",
        "idle_since",
        "transport",
    )

    def __init__(self, pool: list[_Connection]) -> None:
        self._pool = pool  # the idle list this connection returns to
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._head_end = -1
        self._length = -1  # body length; -1 chunked or until close
        self._chunked = False
        self._body_end = -1
        self._chunk_at = -1  # where the next unread chunk-size line starts (chunked bodies)
        self.head: bytes = b""
        self.idle_since = 0.0  # monotonic time it was given back

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass: no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return  # bytes nobody asked for: the next request() refuses this connection
        try:
            if self._answer_complete():
                self._waiter.set_result(None)
        except MalformedAnswer as exc:
            self._waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        with contextlib.suppress(ValueError):
            self._pool.remove(self)  # an idle connection the engine closed
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None and self._head_end >= 0 and self._length < 0 and not self._chunked:
                waiter.set_result(None)  # an answer delimited by the (clean) end of the connection
            else:
                waiter.set_exception(
                    ConnectionResetError("the engine closed the connection before answering")
                )

    # -- one exchange -----------------------------------------------------------------------

    async def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Send a request; (status, head, body) once the whole answer is in."""
        assert self.transport is not None
        if self._buffer:
            raise ConnectionResetError("unexpected bytes on an idle connection")
        self._head_end = self._length = self._body_end = -1
        self._chunked = False
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        await waiter
        status = _status(self.head)
        if self._chunked:
            body = _dechunk(self._buffer, self._head_end, self._body_end)
        elif self._length >= 0:
            body = bytes(self._buffer[self._head_end : self._head_end + self._length])
        else:
            body = bytes(self._buffer[self._head_end :])
        del self._buffer[: self._body_end if self._body_end >= 0 else len(self._buffer)]
        self._waiter = None
        return status, self.head, body

    def reusable(self) -> bool:
        if self.closed or self._buffer or (self._length < 0 and not self._chunked):
            return False
        head = self.head
        if not head.startswith(b"HTTP/1.1"):
            return False
        connection = _header(head, b"connection")
        return connection is None or connection.strip().lower() != b"close"

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _answer_complete(self) -> bool:
        buffer = self._buffer
        if self._head_end < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise MalformedAnswer("the engine's answer headers are too large")
                return False
            self.head = bytes(buffer[:end])
            self._head_end = end + 4
            status = _status(self.head)
            if 100 <= status < 200:
                # An interim answer (we never send Expect): skip it, read the real one.
                del buffer[: self._head_end]
                self._head_end = -1
                return self._answer_complete()
            encoding = _header(self.head, b"transfer-encoding")
            if encoding is not None and encoding.strip().lower() == b"chunked":
                self._chunked = True
                self._chunk_at = self._head_end
            else:
                length = _header(self.head, b"content-length")
                if length is not None:
                    try:
                        self._length = int(length)
                    except ValueError:
                        raise MalformedAnswer("bad Content-Length from the engine") from None
                elif status in (204, 304):
                    self._length = 0
        if self._chunked:
            end, self._chunk_at = _chunked_end(buffer, self._chunk_at)
            if end < 0:
                return False
            self._body_end = end
            return True
        if self._length >= 0 and len(buffer) >= self._head_end + self._length:
            self._body_end = self._head_end + self._length
            return True
        return False  # more to come (or, with no length, the end of the connection)


def _status(head: bytes) -> int:
    # "HTTP/1.1 200 OK"
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise MalformedAnswer("the engine did not answer with HTTP/1.x")
    try:
        return int(head[9:12])
    except ValueError:
        raise MalformedAnswer("bad status line from the engine") from None


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of the first header called ``name`` (lower case), or None."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _headers(head: bytes) -> CIMultiDictProxy[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep:
            headers.add(key.strip().decode("latin-1"), value.strip().decode("latin-1"))
    return CIMultiDictProxy(headers)


def _chunked_end(buffer: bytearray, start: int) -> tuple[int, int]:
    """(where a complete chunked body ends, after its trailers, or -1; where to resume the scan
    when more bytes arrive), scanning chunks from ``start``."""
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return -1, at
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MalformedAnswer("bad chunk size from the engine") from None
        if size == 0:
            if buffer[line_end : line_end + 4] == b"\r\n\r\n":
                return line_end + 4, at  # no trailers
            trailers_end = buffer.find(b"\r\n\r\n", line_end)
            return (-1 if trailers_end < 0 else trailers_end + 4), at
        following = line_end + 2 + size + 2
        if len(buffer) < following:
            return -1, at
        at = following


def _dechunk(buffer: bytearray, start: int, end: int) -> bytes:
    out = bytearray()
    at = start
    while at < end:
        line_end = buffer.find(b"\r\n", at)
        size = int(bytes(buffer[at:line_end]).split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        out += buffer[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2
    return bytes(out)


class LeanResponse:
    """A complete engine answer (``UpstreamResponse``)."""

    __slots__ = ("_body", "_clock", "_connection", "_head", "_headers", "_pool", "status")

    def __init__(
        self,
        status: int,
        head: bytes,
        body: bytes,
        connection: _Connection,
        pool: list[_Connection],
        clock: Callable[[], float],
    ) -> None:
        self.status = status
        self._head = head
        self._body = body
        self._headers: CIMultiDictProxy[str] | None = None
        self._connection: _Connection | None = connection
        self._pool = pool
        self._clock = clock

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            self._headers = _headers(self._head)  # parsed only when someone asks
        return self._headers

    async def read(self) -> bytes:
        return self._body

    def chunks(self) -> AsyncIterator[bytes]:
        return _Once(self._body)

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reusable():
            connection.idle_since = self._clock()
            self._pool.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class _Once(AsyncIterator[bytes]):
    """The whole body as the one chunk of a stream (none if empty). A class, not a generator,
    so the module compiles (setup.py)."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __anext__(self) -> bytes:
        body, self._body = self._body, b""
        if not body:
            raise StopAsyncIteration
        return body


class LeanClient:
    """Keep-alive connections per engine address; :meth:`post` one request on one of them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # monotonic seconds: when an idle connection is too old to reuse
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bytes] | None] = {}
        self._open: set[_Connection] = set()

    def handles(self, url: str, headers: Mapping[str, str]) -> bool:
        """Plain http URLs with header values this client can write as they are."""
        if self._target(url) is None:
            return False
        return not any("\r" in v or "\n" in v or "\r" in k or "\n" in k for k, v in headers.items())

    def _target(self, url: str) -> tuple[str, int, bytes] | None:
        if url in self._targets:
            return self._targets[url]
        parts = urlsplit(url)
        target: tuple[str, int, bytes] | None = None
        if parts.scheme == "http" and parts.hostname and not parts.username:
            port = parts.port or 80
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("latin-1")
            target = (host, port, head)
        if len(self._targets) > 1024:
            self._targets.clear()  # URLs come from the config: only a misuse grows this
        self._targets[url] = target
        return target

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], connect_timeout_s: float
    ) -> LeanResponse:
        target = self._target(url)
        if target is None:
            raise ValueError(f"not a plain http URL: {url}")
        host, port, start = target
        idle = self._idle.get((host, port))
        if idle is None:
            idle = self._idle[(host, port)] = []
        connection = None
        if idle:
            fresh = self._clock() - MAX_IDLE_S
            while idle:
                candidate = idle.pop()
                # Not closed meanwhile, nothing unasked-for received, not about to be closed.
                if candidate.idle_since >= fresh and candidate.reusable():
                    connection = candidate
                    break
                candidate.close()
        if connection is None:
            connection = await self._connect(host, port, idle, connect_timeout_s)
        lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        request = b"".join(
            (
                start,
                lines.encode("utf-8", "surrogateescape"),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        try:
            status, head, answer = await connection.exchange(request)
        except BaseException:
            # Failed, timed out or cancelled (the client left): closing is what stops the engine.
            connection.close()
            raise
        return LeanResponse(status, head, answer, connection, idle, self._clock)

    async def _connect(
        self, host: str, port: int, idle: list[_Connection], timeout_s: float
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(lambda: _Connection(idle), host, port)
        except TimeoutError:
            raise TimeoutError(f"connecting to {host}:{port} took over {timeout_s:g}s") from None
        self._open.add(connection)
        if len(self._open) > 256:
            self._open = {c for c in self._open if not c.closed}
        return connection

    def close(self) -> None:
        """Close every connection (at shutdown)."""
        for connection in self._open:
            connection.close()
        self._open.clear()
        self._idle.clear()
