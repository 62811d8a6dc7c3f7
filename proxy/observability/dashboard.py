"""The live dashboard: one HTML page, its JS/CSS, and a JSON snapshot endpoint.

    app.add_routes(dashboard_routes(metrics.snapshot))

``GET /dashboard`` serves the page; it polls ``GET /dashboard/data`` every 2 s and turns the
cumulative counts into rates itself. The assets ship inside the package (``static/``), so the page
works with no internet; there is no build step.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import web

STATIC_FILES: Final = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def _read_static(name: str) -> bytes:
    return resources.files("proxy.observability").joinpath("static", name).read_bytes()


def dashboard_routes(
    get_snapshot: Callable[[], dict[str, Any]], *, prefix: str = "/dashboard"
) -> list[web.RouteDef]:
    """Routes for the dashboard page, its assets and its data, under ``prefix``."""
    # The page names its data and asset URLs through this placeholder, so any prefix works.
    page = _read_static("dashboard.html").replace(b"__PREFIX__", prefix.encode())
    assets = {name: (_read_static(name), ctype) for name, ctype in STATIC_FILES.items()}

    async def dashboard_page(request: web.Request) -> web.Response:
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def dashboard_asset(request: web.Request) -> web.Response:
        asset = assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound()
        body, content_type = asset
        return web.Response(
            body=body, content_type=content_type, headers={"Cache-Control": "no-cache"}
        )

    async def dashboard_data(request: web.Request) -> web.Response:
        body = orjson.dumps(get_snapshot(), option=orjson.OPT_NON_STR_KEYS)
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    return [
        web.get(prefix, dashboard_page),
        web.get(f"{prefix}/data", dashboard_data),
        web.get(prefix + "/static/{name}", dashboard_asset),
    ]
