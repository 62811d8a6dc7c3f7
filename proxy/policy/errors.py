"""Refusals raised by tier policy enforcement, as plain exceptions the pipeline renders.

Each carries what an OpenAI-shaped error body needs (``status``, ``error_type``, ``code``,
``message``, ``param``) and, for the retryable ones (+retry), ``retry_after`` seconds. They are
part of the proxy's one error tree (``PolicyError`` is a ``FrugalError``), so the same single
place renders them as OpenAI error JSON, with ``Retry-After`` set::

    PolicyError                       (base; never raised itself)
    ├── MissingKey                    401 authentication_error   code=missing_api_key
    ├── UnknownKey                    401 authentication_error   code=invalid_api_key
    ├── ModelNotAllowed               403 permission_error       code=model_not_allowed
    ├── MaxTokensTooLarge             400 invalid_request_error  code=max_tokens_too_large
    ├── RateLimitExceeded             429 rate_limit_error       code=rate_limit_exceeded   (+retry)
    │   └── ConcurrencyLimitExceeded  429 rate_limit_error       code=concurrency_limit_exceeded
    ├── BudgetExhausted               429 insufficient_quota     code=insufficient_quota    (+retry)
    ├── EngineOverloaded              503 service_unavailable    code=engine_overloaded     (+retry)
    │   (queue wait bound passed or queue full: capacity, not the caller's usage, is the cause)
    └── LimitsUnavailable             503 service_unavailable    code=limits_unavailable    (+retry)
        (the counters' backend is down and the limiter is set to refuse rather than fail open)
"""

from __future__ import annotations

import math

from proxy.errors import FrugalError


class PolicyError(FrugalError):
    default_code = "policy_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after
        header = self.retry_after_header
        if header is not None:
            self.headers["Retry-After"] = header

    @property
    def retry_after_header(self) -> str | None:
        """Retry-After in whole seconds, rounded up so a client never retries too early."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))


class MissingKey(PolicyError, PermissionError):
    status = 401
    error_type = "authentication_error"
    default_code = "missing_api_key"


class UnknownKey(PolicyError, PermissionError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotAllowed(PolicyError, PermissionError):
    status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class MaxTokensTooLarge(PolicyError, ValueError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "max_tokens_too_large"


class RateLimitExceeded(PolicyError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ConcurrencyLimitExceeded(RateLimitExceeded):
    default_code = "concurrency_limit_exceeded"


class BudgetExhausted(PolicyError):
    status = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class EngineOverloaded(PolicyError, ConnectionError):
    status = 503
    error_type = "service_unavailable"
    default_code = "engine_overloaded"


class LimitsUnavailable(PolicyError, ConnectionError):
    status = 503
    error_type = "service_unavailable"
    default_code = "limits_unavailable"
