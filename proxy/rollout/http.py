"""Admin endpoints of the rollout (mounted by ``proxy.admin`` behind its admin-key check).

GET  /admin/rollout                      every engine's rollout status
GET  /admin/rollout/{engine}             status and per-version figures
POST /admin/rollout/{engine}/promote     the canary becomes the engine's version
POST /admin/rollout/{engine}/rollback    the canary is removed
POST /admin/rollout/{engine}/share       {"share": 0.25}: the canary's traffic share
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import FrugalError, InvalidRequest, NotFound
from proxy.rollout.manager import Rollouts
from proxy.rollout.state import RolloutConflict

AdminHandler = Callable[[web.Request], Awaitable[web.Response]]


class RolloutConflictError(FrugalError):
    status = 409
    error_type = "invalid_request_error"
    default_code = "rollout_conflict"


def add_rollout_routes(
    app: web.Application, rollouts: Rollouts, guarded: Callable[[AdminHandler], AdminHandler]
) -> None:
    def engine_of(request: web.Request) -> str:
        name = request.match_info["engine"]
        if name not in rollouts.by_name:
            raise NotFound(
                f"no engine {name!r}; engines: {sorted(rollouts.by_name)}", code="engine_not_found"
            )
        return name

    async def status_all(request: web.Request) -> web.Response:
        return _json({name: rollouts.status(name) for name in rollouts.by_name})

    async def status(request: web.Request) -> web.Response:
        return _json(rollouts.status(engine_of(request)))

    async def transition(
        request: web.Request, change: Callable[[str], Awaitable[object]]
    ) -> web.Response:
        name = engine_of(request)
        try:
            await change(name)
        except RolloutConflict as exc:
            raise RolloutConflictError(str(exc)) from None
        return _json(rollouts.status(name))

    async def promote(request: web.Request) -> web.Response:
        return await transition(request, rollouts.promote)

    async def rollback(request: web.Request) -> web.Response:
        return await transition(request, rollouts.rollback)

    async def share(request: web.Request) -> web.Response:
        name = engine_of(request)
        body = await _body(request)
        unknown = sorted(set(body) - {"share"})
        if unknown:  # (a misspelt "shares" must not read as a missing share)
            raise InvalidRequest(
                f'unknown field {unknown[0]!r}; send {{"share": 0.25}}', param=unknown[0]
            )
        value = body.get("share")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise InvalidRequest("share must be a number in [0, 1]", param="share")
        try:
            await rollouts.set_share(name, float(value))
        except RolloutConflict as exc:
            raise RolloutConflictError(str(exc)) from None
        return _json(rollouts.status(name))

    app.router.add_get("/admin/rollout", guarded(status_all))
    app.router.add_get("/admin/rollout/{engine}", guarded(status))
    app.router.add_post("/admin/rollout/{engine}/promote", guarded(promote))
    app.router.add_post("/admin/rollout/{engine}/rollback", guarded(rollback))
    app.router.add_post("/admin/rollout/{engine}/share", guarded(share))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def _json(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")
