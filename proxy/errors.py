"""The one error tree of the proxy, rendered in one place as OpenAI error JSON.

::

    FrugalError                      500 server_error
    ├── InternalError                500 server_error               code=internal_error
    ├── InvalidRequest               400 invalid_request_error      (also ValueError)
    │   ├── PayloadTooLarge          413 invalid_request_error      code=payload_too_large
    │   └── MalformedHttp            400 invalid_request_error      code=malformed_http
    ├── AuthenticationFailed         401 authentication_error       code=invalid_api_key
    ├── PermissionDenied             403 permission_error           code=model_not_allowed
    ├── NotFound                     404 invalid_request_error
    │   └── ModelNotFound            404 invalid_request_error      code=model_not_found
    ├── ServiceUnavailable           503 service_unavailable        (also ConnectionError)
    │   ├── ProxyStopping            503 service_unavailable        code=shutting_down
    │   └── NoHealthyReplica         503 service_unavailable        code=no_healthy_replica
    ├── UpstreamError                502 upstream_error             (also ConnectionError)
    ├── UpstreamTimeout              504 timeout                    (also TimeoutError)
    └── PolicyError                  tier policy refusals (proxy/policy/errors.py): 401 missing
                                     or unknown key, 403 model not allowed, 400 max_tokens, 429
                                     rate/concurrency (+Retry-After), 429 insufficient_quota,
                                     503 engine_overloaded / limits_unavailable

An engine's own error response (a 4xx from vLLM, already OpenAI-shaped) is relayed unchanged and
is not part of this tree. ``to_json`` renders a response body; ``to_sse`` renders the final event
of a stream that fails after its headers were sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.sse import DONE_EVENT, frame


class FrugalError(Exception):
    status: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    # The answer ends the connection: what follows on it cannot be read as requests.
    closes_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def reason(self) -> str:
        """What the access line's ``error`` says: the code, else the type, for an invalid
        request has no code and a 400 logged with ``error: null`` tells an operator nothing."""
        return self.code or self.error_type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())

    def to_sse(self) -> bytes:
        """The closing events of a stream that broke after it began: an error event, then DONE."""
        return frame(self.to_json()) + DONE_EVENT


class InternalError(FrugalError):
    """An exception the proxy did not expect (a bug): the client learns only that it happened;
    the traceback goes to the log."""

    default_code = "internal_error"

    def __init__(
        self,
        message: str = "The server had an error processing your request.",
        *,
        bug: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        # Set here, not only by ``raise ... from bug``: the compiled build's raise sets no cause.
        if bug is not None:
            self.__cause__ = bug


class InvalidRequest(FrugalError, ValueError):
    status = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    default_code = "payload_too_large"


class MalformedHttp(InvalidRequest):
    """A request aiohttp's HTTP parser refused, before the app saw it or in the middle of its
    chunked body (proxy/protocol.py). The connection is closed after the answer."""

    default_code = "malformed_http"
    closes_connection = True


class RequestTimeout(InvalidRequest):
    status = 408
    default_code = "request_timeout"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"


class AuthenticationFailed(FrugalError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(FrugalError):
    status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class NotFound(FrugalError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class ServiceUnavailable(FrugalError, ConnectionError):
    status = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


class ProxyStopping(ServiceUnavailable):
    """The proxy is stopping and a stream outlasted its grace period (proxy/stopping.py)."""

    default_code = "shutting_down"


class NoHealthyReplica(ServiceUnavailable):
    default_code = "no_healthy_replica"


class UpstreamError(FrugalError, ConnectionError):
    status = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(FrugalError, TimeoutError):
    status = 504
    error_type = "timeout"
    default_code = "upstream_timeout"


class AnswerOutlastedRequest(UpstreamTimeout):
    """The request's own time (``total_s``) ran out while the replica was still streaming tokens:
    a long answer, not a failing replica (the engine is told to stop; its breaker is not)."""
