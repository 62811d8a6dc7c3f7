"""aiohttp's HTTP connection handler, answering what it refuses as the proxy answers errors.

A request aiohttp's parser refuses (a malformed request line, a bad character in a header, a
line or header section over its limits, a bad Content-Length or Transfer-Encoding, a broken
chunked body, bytes that are not HTTP), and an exception that escapes the middlewares, never
reach ``error_middleware``: aiohttp answers them itself in ``RequestHandler.handle_error``, as
text/plain (or text/html), which OpenAI SDKs cannot parse. aiohttp has no hook for that answer
(aio-libs/aiohttp#3287), so :class:`ProxyRunner` serves through a handler that renders it as
OpenAI error JSON, through ``proxy.app.error_response``.

A chunked body that breaks after the request was handed to the app (a later chunk-size line that
is not one) is refused by the parser too, but aiohttp's C parser never tells the body's reader:
the handler would wait for the rest until ``server.body_timeout_s`` and answer 408. The handler
here hands the parser's refusal to that body, so the read fails at once (a 400, in
``proxy.pipeline``).
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from proxy.app import error_response
from proxy.errors import FrugalError, InternalError, MalformedHttp

log = structlog.get_logger("frugal.server")

MAX_REASON_CHARS = 120


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are handled by :class:`ProxyRequestHandler`."""

    async def _make_server(self) -> web.Server:
        # aiohttp's Server hard-codes its handler class; rebuilt from the one AppRunner made,
        # every argument the runner was given (timeouts, cancellation) still holds.
        made = await super()._make_server()
        try:
            return _Server(made)
        except AttributeError:  # another aiohttp's internals: serve, with its own error pages
            log.warning("malformed requests get aiohttp's plain-text errors with this aiohttp")
            return made


class _Server(web.Server):
    def __init__(self, made: web.Server) -> None:
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )

    def __call__(self) -> web.RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRequestHandler(web.RequestHandler):
    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            # (an _ErrInfo: what the parser refused, queued to be answered as a request)
            refused = getattr(self._messages[-1][0], "exc", None)
            if isinstance(refused, HttpProcessingError):
                self._refuse_open_body(refused)

    def _refuse_open_body(self, refused: HttpProcessingError) -> None:
        # The parser stops at its first error, so only the last request before the refusal can
        # have a body still arriving: queued behind it, or the one being handled.
        if len(self._messages) > 1:
            body = self._messages[-2][1]
        elif self._current_request is not None:
            body = self._current_request.content
        else:
            return
        if body.is_eof():
            return  # (complete, or no body: the refusal is about what came after it)
        if body.exception() is None:  # (the pure-Python parser has told it already)
            body.set_exception(refused)
        # At its end: aiohttp reads no more of it after the answer (that read would raise
        # the refusal again, logged as an unhandled exception).
        body.feed_eof()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        err = _answer(status, exc)
        if not isinstance(exc, HttpProcessingError):
            # A bug outside error_middleware, or one it leaves to aiohttp once a response has
            # begun: aiohttp's own log of it is replaced, so it is logged here.
            log.error("unexpected error", method=request.method, path=request.path, exc_info=exc)
        elif isinstance(exc, BadHttpMethod):
            # Mostly not HTTP at all (TLS, scanners): routine on a public port.
            log.debug("malformed request", peer=request.remote, error=err.message)
        else:
            log.info("malformed request", peer=request.remote, error=err.message)
        if request.writer.output_size > 0:
            # Part of a response is out: no error response can follow; aiohttp's caller takes
            # this as the end of the connection.
            raise ConnectionError("a response was partly sent; no error response can follow")
        response = error_response(err)
        response.force_close()  # as aiohttp: what follows on the connection cannot be trusted
        return response


def _answer(status: int, exc: BaseException | None) -> FrugalError:
    # (a bug: InternalError, as error_middleware answers one)
    err: FrugalError = (
        MalformedHttp(_reason(exc)) if isinstance(exc, HttpProcessingError) else InternalError()
    )
    err.status = status  # aiohttp's: 400 for all its parser refuses (size limits too), 500, 504
    return err


def _reason(exc: HttpProcessingError) -> str:
    if isinstance(exc, LineTooLong):  # (its message quotes the line's first 100 bytes)
        return (
            "A line of the request head (the request line or a header) is longer than "
            f"{exc.args[1]} bytes."
        )
    # The parser's reason; after a blank line come the offending bytes, quoted: left out.
    head = exc.message.split("\n\n", 1)[0]
    reason = ": ".join(part.strip().rstrip(":") for part in head.splitlines() if part.strip())
    if not reason:
        return "Malformed HTTP request."
    if len(reason) > MAX_REASON_CHARS:  # (the pure-Python parser quotes what it refuses)
        reason = reason[:MAX_REASON_CHARS] + "..."
    return f"Malformed HTTP request: {reason}."
