"""Cross-origin requests from browser frontends (CORS), when the config allows their origins.

A chat frontend that runs in the browser and calls the proxy itself needs the proxy to say which
origins may read its answers. Off unless ``server.cors.allow_origins`` lists some (``"*"`` for
any): then a preflight ``OPTIONS`` is answered before routing, and every answer to an allowed
origin carries ``Access-Control-Allow-Origin`` and exposes the ``x-frugal-*`` headers. API keys
travel in the Authorization header, never in cookies, so credentials are not allowed.

The decisions are pure functions; :func:`install` adds the middleware and the signal only when
CORS is on, so the request path of a proxy without it is unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from proxy.errors import PermissionDenied
from proxy.settings import CorsSettings

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
# What a browser script may read of an answer besides the CORS-safe headers.
EXPOSE_HEADERS = ", ".join(
    [
        "x-request-id",
        "Retry-After",
        "x-should-retry",  # the OpenAI SDKs read it: whether a retry can help
        *(
            f"x-frugal-{name}"
            for name in (
                "engine", "model-version", "cache", "cache-age", "cache-similarity",
                "cache-coalesced", "route", "route-reason", "route-score", "route-detail",
                "max-tokens-clamped",
            )
        ),
    ]
)  # fmt: skip


def allowed_origin(origin: str | None, allow: Sequence[str]) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or None."""
    if not origin or not allow:
        return None
    if "*" in allow:
        return "*"
    return origin if origin in allow else None


def answer_headers(allowed: str) -> dict[str, str]:
    headers = {
        "Access-Control-Allow-Origin": allowed,
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
    }
    if allowed != "*":
        headers["Vary"] = "Origin"  # the answer differs by origin: caches must key on it
    return headers


def preflight_headers(
    allowed: str, requested_headers: str | None, max_age_s: int
) -> dict[str, str]:
    headers = {
        "Access-Control-Allow-Origin": allowed,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Max-Age": str(max_age_s),
    }
    if requested_headers:
        # Any request header may be sent (the SDKs add their own x-stainless-* ones); what the
        # proxy accepts is decided by the key, not by a header list.
        headers["Access-Control-Allow-Headers"] = requested_headers
    if allowed != "*":
        headers["Vary"] = "Origin"
    return headers


def install(app: web.Application, settings: CorsSettings) -> None:
    """Answer preflights and mark answers for allowed origins (nothing when CORS is off)."""
    allow = tuple(settings.allow_origins)
    if not allow:
        return

    @web.middleware
    async def preflight(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            allowed = allowed_origin(request.headers.get("Origin"), allow)
            if allowed is None:
                # (rendered as OpenAI error JSON by the error middleware, which runs outside)
                raise PermissionDenied(
                    f"the origin {request.headers.get('Origin')!r} may not call this API",
                    code="origin_not_allowed",
                )
            requested = request.headers.get("Access-Control-Request-Headers")
            return web.Response(
                status=204, headers=preflight_headers(allowed, requested, settings.max_age_s)
            )
        return await handler(request)

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        allowed = allowed_origin(request.headers.get("Origin"), allow)
        if allowed is not None:
            response.headers.update(answer_headers(allowed))

    app.middlewares.append(preflight)
    app.on_response_prepare.append(mark)
