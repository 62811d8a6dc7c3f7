"""Talking to engine replicas: a one-method transport seam, and the call with retry and breaker.

The transport is the only place that opens sockets; tests can pass a plain async function.
``EngineCaller.open`` picks a replica, sends, and waits for the first byte of the answer. A
replica that fails before that byte (connect error, 5xx, timeout) is retried once on another
replica; after the first byte the caller owns the stream and failures end it. ``total_s`` is one
deadline for the whole request, retry included.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

from proxy.engines.http1 import LeanClient
from proxy.engines.pool import Engine, Replica, choose_replica, retry_after_s
from proxy.engines.timelimit import TimeLimit
from proxy.errors import (
    AnswerOutlastedRequest,
    FrugalError,
    NoHealthyReplica,
    UpstreamError,
    UpstreamTimeout,
)

log = structlog.get_logger("frugal.engines")


@dataclass(slots=True)
class UpstreamRequest:
    url: str
    body: bytes
    headers: Mapping[str, str]
    connect_timeout_s: float
    stream: bool = False  # the answer is read as it comes (SSE), not whole


class UpstreamResponse(Protocol):
    status: int

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None:
        """The body was read to its end: the connection may be reused."""

    def close(self) -> None:
        """Abandon the response: closes the connection, which makes vLLM abort the request."""


Transport = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]


class _AiohttpResponse:
    __slots__ = ("_resp", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._resp.headers

    async def read(self) -> bytes:
        return await self._resp.read()

    def chunks(self) -> AsyncIterator[bytes]:
        return self._resp.content.iter_any()

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class AiohttpTransport:
    """The production transport: one shared ClientSession for the whole application, and
    :class:`~proxy.engines.http1.LeanClient` for the non-streamed calls to plain-http engines
    (a third of aiohttp's CPU per call; see that module).

    The session is attached when the application starts (it must be made inside the loop).
    """

    def __init__(self, session: aiohttp.ClientSession | None = None, *, lean: bool = True) -> None:
        self.session = session
        self.lean = LeanClient() if lean else None
        # One ClientTimeout per connect timeout (a handful of engines), not one per request.
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def aclose(self) -> None:
        if self.lean is not None:
            self.lean.close()
        if self.session is not None:
            await self.session.close()

    async def __call__(self, request: UpstreamRequest) -> UpstreamResponse:
        if self.session is None:
            raise RuntimeError("the HTTP client session is not started")
        lean = self.lean
        if not request.stream and lean is not None and lean.handles(request.url, request.headers):
            return await lean.post(
                request.url, request.body, request.headers, request.connect_timeout_s
            )
        timeout = self._timeouts.get(request.connect_timeout_s)
        if timeout is None:
            connect = request.connect_timeout_s
            timeout = aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect)
            self._timeouts[connect] = timeout
        resp = await self.session.post(
            request.url, data=request.body, headers=request.headers, timeout=timeout
        )
        return _AiohttpResponse(resp)


@dataclass(eq=False, slots=True)
class Upstream:
    """An engine answer whose first byte has arrived (or whole body, when not streamed)."""

    engine: Engine
    replica: Replica
    response: UpstreamResponse
    deadline: float  # monotonic time by which the whole answer must be in
    first_chunk: bytes = b""
    body: bytes = b""  # the whole body of a non-streamed answer
    answer: dict[str, Any] | None = None  # that body parsed, when it is an answer (status < 400)
    attempts: int = 1
    probe: bool = False  # it holds its replica's half-open probe (until the replica answers)
    request_id: str | None = None  # for the log line of a failure mid-answer
    _chunks: AsyncIterator[bytes] | None = None
    _finished: bool = field(default=False)
    # when the proxy last began to wait for the engine's next chunk (monotonic): a replica
    # silent for less than first_token_s at the deadline was still answering. (Not when the
    # latest chunk came: the time the client took to be sent it is no silence of the replica.)
    _asked_at: float = field(default_factory=time.monotonic)

    @property
    def status(self) -> int:
        return self.response.status

    def rest(self) -> AsyncIterator[bytes]:
        """The chunks after the first, each bounded by the whole-request deadline."""
        if self._chunks is None:
            self._chunks = aiter(self.response.chunks())
        return _Rest(self, self._chunks)

    def _out_of_time(self) -> UpstreamTimeout:
        message = f"engine {self.engine.name} exceeded its request timeout"
        silent_s = time.monotonic() - self._asked_at
        if silent_s < self.engine.settings.timeouts.first_token_s:
            return AnswerOutlastedRequest(message)
        self._log_failure(f"silent for {silent_s:.3g}s mid-answer at the request's deadline")
        return UpstreamTimeout(message)  # it had stalled: the replica's failure

    def ended_early(self) -> UpstreamError:
        """The failure of a stream the replica ended before its answer was finished."""
        self._log_failure("the stream ended before the answer did")
        return UpstreamError("the engine's stream ended before the answer did")

    def _log_failure(self, detail: str) -> None:
        # Which replica broke a stream: the access line names only the engine.
        _replica_warning("engine.replica_failed", self.engine, self.replica, self.request_id,
                         detail=detail, mid_answer=True)  # fmt: skip

    def finish(self, *, ok: bool, aborted: bool = False) -> None:
        """Give the replica back. ``aborted``: the client left; close so the engine stops."""
        if self._finished:
            return
        self._finished = True
        self.replica.inflight -= 1
        if aborted or not ok:
            self.response.close()
            if aborted:
                self.replica.breaker.release(probe=self.probe)
            else:
                self.replica.breaker.on_failure(time.monotonic())
        else:
            self.response.release()
            self.replica.breaker.on_success()


class _Rest(AsyncIterator[bytes]):
    """``Upstream.rest``: a class, not a generator, so the module compiles (setup.py)."""

    __slots__ = ("_chunks", "_upstream")

    def __init__(self, upstream: Upstream, chunks: AsyncIterator[bytes]) -> None:
        self._upstream = upstream
        self._chunks = chunks

    async def __anext__(self) -> bytes:
        upstream = self._upstream
        upstream._asked_at = now = time.monotonic()
        remaining = upstream.deadline - now
        if remaining <= 0:
            raise upstream._out_of_time()
        try:
            async with TimeLimit(remaining):
                return await anext(self._chunks)
        except TimeoutError:
            raise upstream._out_of_time() from None
        except (aiohttp.ClientError, OSError) as exc:
            # As before the first byte: the client hears which engine failed, the log which
            # replica and how (the transport's words are no part of an OpenAI error).
            upstream._log_failure(str(exc) or type(exc).__name__)
            raise UpstreamError(f"engine {upstream.engine.name} failed mid-answer") from exc


RetryObserver = Callable[[Engine, str], None]


class EngineCaller:
    def __init__(self, transport: Transport, *, on_retry: RetryObserver | None = None) -> None:
        self._transport = transport
        self._on_retry = on_retry

    async def open(
        self,
        engine: Engine,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        affinity: bytes | None,
        stream: bool,
        deadline: float | None = None,
        failed: FrugalError | None = None,
    ) -> Upstream:
        """``deadline`` and ``failed``: this call retries, on another replica set, one that failed
        before its first byte (a canary's engine's other version): it spends what that call left
        of the request's time, and raises that call's error when it has no time left."""
        # One deadline for the whole request: a retry spends what the first attempt left.
        if deadline is None:
            deadline = time.monotonic() + engine.settings.timeouts.total_s
        tried: list[Replica] = []
        error = failed
        while len(tried) < 2:
            now = time.monotonic()
            if now >= deadline:
                break  # the failed attempt used the whole request's time: no retry
            replica = choose_replica(
                engine.replicas,
                affinity=affinity,
                now=now,
                exclude=tried,
                version=engine.required_version,
            )
            if replica is None:
                break
            tried.append(replica)
            if not replica.breaker.acquire(now):
                continue
            probe = replica.breaker.state == "half_open"  # this request is the probe
            if error is not None and self._on_retry is not None:
                self._on_retry(engine, error.code or "error")
            replica.inflight += 1
            try:
                return await self._attempt(
                    engine, replica, path, body, headers, stream, deadline, len(tried), probe
                )
            except _ReplicaFailed as attempt:
                replica.inflight -= 1
                if attempt.broken:
                    replica.breaker.on_failure(time.monotonic())
                else:
                    replica.breaker.release(probe=probe)
                error = attempt.error
            except BaseException:
                # Cancelled (client left) or a bug: give the slot back, tell the breaker nothing.
                replica.inflight -= 1
                replica.breaker.release(probe=probe)
                raise
        if error is not None:
            raise error
        raise NoHealthyReplica(
            f"no healthy replica of engine {engine.name!r} is available",
            headers={"Retry-After": str(retry_after_s(engine.replicas, time.monotonic()))},
        )

    async def _attempt(
        self,
        engine: Engine,
        replica: Replica,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        stream: bool,
        deadline: float,
        attempts: int,
        probe: bool,
    ) -> Upstream:
        timeouts = engine.settings.timeouts
        # A failure's log line names the request, so it can be found from the access line.
        request_id = headers.get("x-request-id")
        sent_at = time.monotonic()
        queued_behind = _busy_with_others(replica)  # others were on it when this one was sent
        # A stream's first byte is the first token, so first_token_s bounds it and a silent
        # replica is left in time for the retry. A non-streamed answer's first byte comes only
        # once the whole answer is done: only the request's deadline bounds it.
        wait = deadline - time.monotonic()
        if stream:
            wait = min(timeouts.first_token_s, wait)
        response: UpstreamResponse | None = None
        try:
            async with TimeLimit(wait):
                response = await self._transport(
                    UpstreamRequest(
                        replica.url + path, body, headers, timeouts.connect_s, stream=stream
                    )
                )
                if response.status >= 500:
                    detail = (await response.read())[:200].decode(errors="replace")
                    # The client hears which engine failed; the replica's address and its own
                    # words stay in the log (internal topology is not the caller's business).
                    _replica_warning("engine.replica_failed", engine, replica, request_id,
                                     status=response.status, detail=detail)  # fmt: skip
                    raise _ReplicaFailed(
                        UpstreamError(f"engine {engine.name} answered {response.status}")
                    )
                upstream = Upstream(engine, replica, response, deadline, attempts=attempts,
                                    probe=probe, request_id=request_id)  # fmt: skip
                if stream and response.status == 200:
                    declared = response.headers.get("Content-Type", "text/event-stream")
                    if not declared.lower().startswith("text/event-stream"):
                        # A gateway's page, or an engine that ignored "stream" (an answer with
                        # no Content-Type is given the benefit of the doubt): nothing in it can
                        # be relayed, and the client would get a 200 that is only an error.
                        _replica_warning("engine.replica_failed", engine, replica, request_id,
                                         detail=f"a stream answered as {declared}")  # fmt: skip
                        raise _ReplicaFailed(
                            UpstreamError(f"engine {engine.name} answered with no event stream")
                        )
                    upstream._chunks = aiter(response.chunks())
                    upstream.first_chunk = await anext(upstream._chunks, b"")
                    if not upstream.first_chunk:
                        # Headers, then the end: nothing was relayed yet, so this is a failure
                        # before the first byte like any other (retried on another replica).
                        _replica_warning("engine.replica_failed", engine, replica, request_id,
                                         detail="empty stream")  # fmt: skip
                        raise _ReplicaFailed(
                            UpstreamError(f"engine {engine.name} ended its stream before a byte")
                        )
                    replica.breaker.on_answering()
                    upstream.probe = False  # answering closed the breaker: no probe is held
                else:
                    upstream.body = await response.read()
                    if response.status < 400:
                        upstream.answer = _answer_object(upstream.body)
                        if upstream.answer is None:
                            # A gateway's page, or a body cut short yet framed whole: relayed as
                            # a 200, no SDK could read it, and the replica would look healthy.
                            detail = upstream.body[:200].decode(errors="replace")
                            _replica_warning("engine.replica_failed", engine, replica, request_id,
                                             status=response.status, detail=detail)  # fmt: skip
                            raise _ReplicaFailed(
                                UpstreamError(f"engine {engine.name} answered with no JSON object")
                            )
                replica.answered_at = time.monotonic()
                return upstream
        except BaseException as exc:
            # Whatever went wrong (including the client leaving), the half-open response must be
            # closed so the engine stops working on it.
            if response is not None:
                response.close()
            if isinstance(exc, TimeoutError):
                # Slow behind other requests is load, not a fault: a replica whose queue made
                # it miss first_token_s would otherwise be taken out of rotation just when it
                # is busiest (seen on a slow CPU host: every request then got a 503 for the
                # breaker's open time). Slow means: others were on it when this request was
                # sent or when it timed out, and it began answering someone meanwhile. The
                # request is still retried elsewhere. Otherwise (idle, or answering nobody: hung)
                # the timeout counts as a failure.
                busy = (queued_behind or _busy_with_others(replica)) and (
                    replica.answered_at >= sent_at  # it answered others meanwhile: not hung
                )
                if busy:
                    _replica_warning("engine.replica_slow", engine, replica, request_id,
                                running=replica.load.running, waiting=replica.load.waiting,
                                inflight=replica.inflight)  # fmt: skip
                raise _ReplicaFailed(
                    UpstreamTimeout(f"engine {engine.name} did not answer within {wait:.3g}s"),
                    broken=not busy,
                ) from None
            if isinstance(exc, aiohttp.ClientError | OSError):
                _replica_warning("engine.replica_failed", engine, replica, request_id,
                                 detail=str(exc) or type(exc).__name__)  # fmt: skip
                raise _ReplicaFailed(UpstreamError(f"engine {engine.name} is unreachable")) from exc
            raise


def _answer_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


class _ReplicaFailed(Exception):
    def __init__(self, error: FrugalError, *, broken: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.broken = broken  # counts at the replica's breaker


def _busy_with_others(replica: Replica) -> bool:
    """Whether the replica had other requests besides this one: this proxy's own others, or
    others running or waiting on it at its last poll (which may count this one)."""
    load = replica.load
    return replica.healthy is True and (
        replica.inflight > 1 or load.waiting > 0 or load.running > 1
    )


def _replica_warning(
    event: str, engine: Engine, replica: Replica, request_id: str | None, **fields: object
) -> None:
    """A replica's failure or slowness, named with the request it met (so the log line can be
    found from the access line) and the replica (which the client is never told)."""
    log.warning(event, request_id=request_id, engine=engine.name, replica=replica.url, **fields)
