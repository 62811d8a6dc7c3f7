"""The request path of a completion, top to bottom.

    read + parse body ─▶ authenticate, tier policy ─▶ limits + budget ─▶ embed last turn ─▶ route
    ─▶ cache lookup ─▶ admission queue ─▶ engine call (retry, breaker) ─▶ relay ─▶ cache store
    ─▶ headers, metrics, one access log line

Each step is a call into a small module that does one job (policy/, cache/, routing/, engines/);
this file only orders them and carries the per-request facts in an :class:`Exchange`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from proxy.engines.client import Upstream
from proxy.engines.pool import Engine
from proxy.errors import FrugalError, InvalidRequest, ModelNotFound, PayloadTooLarge
from proxy.services import Services
from proxy.settings import VIRTUAL_MODEL
from proxy.sse import DONE_PAYLOAD, SSEParser, frame
from proxy.wire import CompletionRequest, Kind, conversation_prefix, parse_request

log = structlog.get_logger("frugal.access")

PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(slots=True)
class Exchange:
    """What one request did: fills as the request moves down the path; read at the end."""

    request_id: str
    started: float
    tier: str = "open"
    model: str = ""
    engine: Engine | None = None
    cache: str = "bypass"
    route_reason: str = ""
    route_score: float | None = None
    status: int = 200
    stream: bool = False
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_s: float | None = None
    upstream_s: float = 0.0  # time spent waiting on the engine, for the proxy's own overhead
    error: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.request_id, "x-frugal-cache": self.cache}
        if self.engine is not None:
            headers["x-frugal-engine"] = self.engine.name
            headers["x-frugal-model-version"] = self.engine.version or "unknown"
            headers["x-frugal-route"] = self.engine.name
            headers["x-frugal-route-reason"] = self.route_reason
            if self.route_score is not None:
                headers["x-frugal-route-score"] = f"{self.route_score:.4f}"
        return headers


async def complete(request: web.Request, kind: Kind, services: Services) -> web.StreamResponse:
    exchange = Exchange(
        request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
        started=time.perf_counter(),
    )
    try:
        req = parse_request(await _read_body(request, services), kind)
        exchange.model, exchange.stream = req.model, req.stream

        engine, reason = _route(req, services)
        exchange.engine, exchange.route_reason = engine, reason
        _prepare_upstream_body(req, engine)

        upstream = await _call_engine(request, req, engine, exchange, services)
        if req.stream and upstream.status == 200:
            return await _relay_stream(request, req, upstream, exchange)
        return _relay_body(req, upstream, exchange)
    except FrugalError as err:
        exchange.status = err.status
        exchange.error = err.code
        err.headers.update(exchange.headers())
        raise
    except asyncio.CancelledError:
        exchange.status = 499  # the client closed the connection
        raise
    finally:
        _finish(exchange, services)


# -- the steps ------------------------------------------------------------------------------


async def _read_body(request: web.Request, services: Services) -> bytes:
    limit = services.settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    return body


def _route(req: CompletionRequest, services: Services) -> tuple[Engine, str]:
    if req.model == VIRTUAL_MODEL:
        # Until the difficulty router decides, the virtual model means the first engine.
        return services.engines[0], "default"
    engine = services.by_model.get(req.model) or services.by_name.get(req.model)
    if engine is None:
        raise ModelNotFound(
            f"The model '{req.model}' does not exist. Available: "
            + ", ".join([VIRTUAL_MODEL, *services.by_model]),
            param="model",
        )
    return engine, "explicit_model"


def _prepare_upstream_body(req: CompletionRequest, engine: Engine) -> None:
    if req.model != engine.model:
        req.set("model", engine.model)
    if req.stream and not req.include_usage:
        # Ask the engine for usage so tokens and cost are counted; the client, who did not ask
        # for it, never sees that chunk.
        options = dict(req.body.get("stream_options") or {})
        options["include_usage"] = True
        req.set("stream_options", options)


async def _call_engine(
    request: web.Request,
    req: CompletionRequest,
    engine: Engine,
    exchange: Exchange,
    services: Services,
) -> Upstream:
    headers = {"Content-Type": "application/json", "x-request-id": exchange.request_id}
    if engine.settings.api_key:
        headers["Authorization"] = f"Bearer {engine.settings.api_key}"
    t0 = time.perf_counter()
    try:
        return await services.caller.open(
            engine,
            PATHS[req.kind],
            req.encoded(),
            headers,
            affinity=conversation_prefix(req),
            stream=req.stream,
        )
    finally:
        exchange.upstream_s += time.perf_counter() - t0
        exchange.ttft_s = time.perf_counter() - exchange.started


def _relay_body(req: CompletionRequest, upstream: Upstream, exchange: Exchange) -> web.Response:
    exchange.status = upstream.status
    body = upstream.body
    ok = upstream.status < 400
    upstream.finish(ok=True)
    if ok:
        usage = _usage_of(body)
        if usage is not None:
            exchange.tokens_in, exchange.tokens_out = usage
    else:
        body = openai_error_body(body, upstream.status)
    return web.Response(
        body=body,
        status=upstream.status,
        content_type="application/json",
        headers=exchange.headers(),
    )


async def _relay_stream(
    request: web.Request, req: CompletionRequest, upstream: Upstream, exchange: Exchange
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **exchange.headers()})
    relay = _StreamRelay(include_usage=req.include_usage)
    try:
        await response.prepare(request)
        await response.write(relay.feed(upstream.first_chunk))
        t0 = time.perf_counter()
        async for chunk in upstream.rest():
            out = relay.feed(chunk)
            if out:
                await response.write(out)
        exchange.upstream_s += time.perf_counter() - t0
        tail = relay.close()
        if tail:
            await response.write(tail)
        upstream.finish(ok=True)
    except FrugalError as err:
        # Headers are gone: the failure becomes the stream's last event, never a hang.
        upstream.finish(ok=False)
        exchange.status, exchange.error = err.status, err.code
        await _write_quietly(response, err.to_sse())
    except (ConnectionResetError, ClientConnectionResetError, asyncio.CancelledError):
        upstream.finish(ok=False, aborted=True)
        exchange.status = 499
        raise
    if relay.usage is not None:
        exchange.tokens_in, exchange.tokens_out = relay.usage
    await _write_eof_quietly(response)
    return response


class _StreamRelay:
    """Passes SSE events on as they come, holding back only the usage chunk the client did not
    ask for, and closes a stream the engine ended without ``[DONE]``."""

    __slots__ = ("done", "include_usage", "parser", "usage")

    def __init__(self, *, include_usage: bool) -> None:
        self.parser = SSEParser()
        self.include_usage = include_usage
        self.usage: tuple[int, int] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for payload in self.parser.feed(chunk):
            if payload == DONE_PAYLOAD:
                self.done = True
            elif b'"usage"' in payload and self._take_usage(payload):
                continue
            out.append(frame(payload))
        return b"".join(out)

    def _take_usage(self, payload: bytes) -> bool:
        """Record usage; True when the event is the usage-only chunk to hold back."""
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        usage = event.get("usage") if isinstance(event, dict) else None
        if not isinstance(usage, dict):
            return False
        self.usage = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        return not self.include_usage and not event.get("choices")

    def close(self) -> bytes:
        rest = b"".join(frame(p) for p in self.parser.flush() if p != DONE_PAYLOAD)
        if not self.done:
            rest += frame(DONE_PAYLOAD)
        return rest


def openai_error_body(body: bytes, status: int) -> bytes:
    """An engine's error as OpenAI's ``{"error": {...}}`` (older vLLM sends a flat object)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    flat = parsed if isinstance(parsed, dict) else {}
    message = flat.get("message") or body[:500].decode(errors="replace") or f"engine error {status}"
    code = flat.get("code")
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": flat.get("type") or "upstream_error",
                "param": flat.get("param"),
                "code": code if isinstance(code, str) or code is None else str(code),
            }
        }
    )


def _usage_of(body: bytes) -> tuple[int, int] | None:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    # The client may be gone too; then there is nobody left to tell.
    with contextlib.suppress(ConnectionResetError, ClientConnectionResetError):
        await response.write(data)


async def _write_eof_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionResetError, ClientConnectionResetError):
        await response.write_eof()


def _finish(exchange: Exchange, services: Services) -> None:
    latency = time.perf_counter() - exchange.started
    engine = exchange.engine
    cost = engine.settings.cost.usd(exchange.tokens_in, exchange.tokens_out) if engine else 0.0
    services.metrics.request_done(
        tier=exchange.tier,
        model=exchange.model if engine is not None else "",
        engine=engine.name if engine is not None else "",
        status=exchange.status,
        cache=exchange.cache,
        latency_s=latency,
        ttft_s=exchange.ttft_s,
        overhead_s=max(0.0, latency - exchange.upstream_s) if engine is not None else None,
        tokens_in=exchange.tokens_in,
        tokens_out=exchange.tokens_out,
        cost_usd=cost,
        saved_cache_usd=0.0,
        saved_routing_usd=0.0,
        stream=exchange.stream,
    )
    if services.access_log:
        log.info(
            "request",
            request_id=exchange.request_id,
            tier=exchange.tier,
            model=exchange.model,
            engine=engine.name if engine else None,
            model_version=engine.version if engine else None,
            cache=exchange.cache,
            route_reason=exchange.route_reason,
            route_score=exchange.route_score,
            status=exchange.status,
            stream=exchange.stream,
            tokens_in=exchange.tokens_in,
            tokens_out=exchange.tokens_out,
            latency_ms=round(latency * 1000, 3),
            cost_usd=cost,
            error=exchange.error,
        )
