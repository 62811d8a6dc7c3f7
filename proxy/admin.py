"""Admin endpoints: cache statistics and invalidation, policy reload, engine state.

They need an admin key (``admin.keys`` in the config, stored hashed) sent as a bearer token.
With no admin key configured they answer only to clients on the loopback interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy.cache.keys import Endpoint, Partition, Scope
from proxy.cache.service import InvalidationFilter
from proxy.engines.pool import Engine
from proxy.errors import AuthenticationFailed, InvalidRequest, PermissionDenied, ServiceUnavailable
from proxy.policy.default import OPEN_TIER
from proxy.policy.keys import bearer_token, verify_key
from proxy.policy.policyset import ANONYMOUS_TENANT
from proxy.rollout.http import add_rollout_routes
from proxy.services import Services

AdminHandler = Callable[[web.Request], Awaitable[web.Response]]

log = structlog.get_logger("frugal.admin")


def add_routes(app: web.Application, services: Services) -> None:
    def guarded(handler: AdminHandler) -> AdminHandler:
        async def check(request: web.Request) -> web.Response:
            _authorize(request, services)
            return await handler(request)

        return check

    async def cache_stats(request: web.Request) -> web.Response:
        cache = _cache(services)
        stats = (await cache.stats()).to_json()
        if services.tuner is not None:
            stats["audits"] = services.tuner.report()  # per tier: rate, bounds, tuned cut-off
        return _json(stats)

    async def cache_invalidate(request: web.Request) -> web.Response:
        cache = _cache(services)
        body = await _json_body(request)
        where = _invalidation_filter(body)
        removed = await cache.invalidate(where)
        # an operator's action on every user's answers: it leaves a trace
        log.info("cache invalidated", where=body, removed=removed, peer=request.remote)
        return _json({"invalidated": removed})

    async def cache_import(request: web.Request) -> web.Response:
        cache = _cache(services)
        body = await _json_body(request)
        engine = services.by_name.get(str(body.get("engine")))
        if engine is None:
            raise InvalidRequest(
                f"engine must be one of {sorted(services.by_name)}", param="engine"
            )
        version = body.get("version")
        if version is not None and not (isinstance(version, str) and version):
            raise InvalidRequest("version must be a non-empty string", param="version")
        version = version or engine.version
        if version is None:
            raise ServiceUnavailable(f"engine {engine.name!r} has no known version yet")
        if not services.rollouts.serves(engine.name, version):
            # stored under it, the entries would never be looked up (and purged at start-up)
            served = sorted(v for name, v in services.rollouts.served() if name == engine.name)
            raise InvalidRequest(
                f"engine {engine.name!r} does not serve version {version!r}; it serves: "
                f"{', '.join(served) or 'no known version yet'}",
                param="version",
            )
        # Entries land in one partition; with no scope given, the one requests use by default.
        scope = body.get("scope")
        partition = _partition(
            services.settings.cache.scope if scope is None else scope, body.get("owner")
        )
        endpoint = body.get("endpoint", Endpoint.CHAT.value)
        if not _names_one(endpoint, Endpoint):
            raise InvalidRequest(
                f"endpoint must be one of {[e.value for e in Endpoint]}", param="endpoint"
            )
        rows = body.get("rows")
        if not isinstance(rows, list):
            raise InvalidRequest("rows must be a list of import rows", param="rows")
        # The request fields the entries are keyed with: greedy, and the max_tokens the requests
        # to hit will carry (a budgeted tier's cap reaches the engine, and so the key).
        template: dict[str, Any] = {"temperature": 0}
        max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
            template["max_tokens"] = max_tokens
        # import_rows checks every row (400 naming the row and field) before it stores any
        stored = await cache.import_rows(
            rows,
            engine=engine.name,
            version=version,
            partition=partition,
            endpoint=Endpoint(endpoint),
            template=template,
            encode=services.encode,
            model=engine.model,  # the name clients ask for and see in answers
        )
        log.info(
            "cache import",
            engine=engine.name,
            version=version,
            scope=partition.scope.value,
            owner=list(partition.owner),
            rows=len(rows),
            stored=stored,
            peer=request.remote,
        )
        return _json(
            {
                "stored": stored,
                "rows": len(rows),
                "version": version,
                "scope": partition.scope.value,
                "owner": list(partition.owner),
            }
        )

    async def policies_reload(request: web.Request) -> web.Response:
        errors = services.policies.reload()
        current = services.policies.current
        result = {"applied": not errors, "errors": errors, "tiers": sorted(current.tiers)}
        if not errors:
            return _json(result)
        # OpenAI-shaped like every other error, with the full list beside it
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        refused = InvalidRequest(
            f"the policy files are invalid; the previous policies stay in force: {errors[0]}{more}",
            code="invalid_policies",
        )
        return _json({**refused.body(), **result}, status=422)

    def replicas(engine: Engine) -> list[dict[str, Any]]:
        return [
            {
                "url": r.url,
                "healthy": r.healthy,
                "breaker": r.breaker.state,
                "inflight": r.inflight,
                "running": r.load.running,
                "waiting": r.load.waiting,
                "kv_usage": r.load.kv_usage,
            }
            for r in engine.replicas
        ]

    def canary(engine: Engine) -> dict[str, Any] | None:
        # A canary's replicas are the engine's too: an operator checks them before promoting.
        rollout = services.rollouts.by_name.get(engine.name)
        if rollout is None or rollout.canary is None:
            return None
        c = rollout.canary
        return {"version": c.version, "model": c.wire_model, "replicas": replicas(c)}

    async def engines(request: web.Request) -> web.Response:
        return _json(
            {
                e.name: {
                    "model": e.model,
                    "version": e.version,
                    "replicas": replicas(e),
                    "canary": canary(e),
                    "queue": services.admissions[e.name].waiting,
                }
                for e in services.engines
            }
        )

    app.router.add_get("/admin/cache/stats", guarded(cache_stats))
    app.router.add_post("/admin/cache/invalidate", guarded(cache_invalidate))
    app.router.add_post("/admin/cache/import", guarded(cache_import))
    app.router.add_post("/admin/policies/reload", guarded(policies_reload))
    app.router.add_get("/admin/engines", guarded(engines))
    add_rollout_routes(app, services.rollouts, guarded)


def _authorize(request: web.Request, services: Services) -> None:
    hashes = services.settings.admin.keys
    if not hashes:
        if _from_loopback(request):
            return
        raise PermissionDenied(
            "admin endpoints need an admin key; none is configured (admin.keys)",
            code="admin_disabled",
        )
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not verify_key(token, hashes):
        raise AuthenticationFailed("a valid admin key is required", code="invalid_admin_key")


def _from_loopback(request: web.Request) -> bool:
    peer = request.remote
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def _cache(services: Services) -> Any:
    if services.cache is None:
        raise ServiceUnavailable("the response cache is disabled", code="cache_disabled")
    return services.cache


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


# Who owns a partition under each scope, as Partition.for_request names it for a request.
_OWNERS: dict[Scope, str] = {
    Scope.GLOBAL: "no owner",
    Scope.TIER: f"owner [TIER] (the tier is {OPEN_TIER!r} without policy files)",
    Scope.TENANT: f"owner [TENANT] (every request is tenant {ANONYMOUS_TENANT!r} without API keys)",
    Scope.USER: "owner [TENANT, USER]: a request's user partition is its tenant and its 'user' "
    f'field ("" for requests without one; the tenant is {ANONYMOUS_TENANT!r} without API keys)',
}
_OWNER_SIZES = {Scope.GLOBAL: 0, Scope.TIER: 1, Scope.TENANT: 1, Scope.USER: 2}


def _names_one(value: Any, choices: type[Scope] | type[Endpoint]) -> bool:
    """Whether ``value`` is the name of one of ``choices`` (a list or an object is not: a set
    membership test of one would raise, and answer 500)."""
    return isinstance(value, str) and value in {c.value for c in choices}


def _partition(scope: Any, owner: Any) -> Partition:
    """The partition ``scope`` and ``owner`` name; 400 unless a request can be in it (an import
    to ``tenant`` with no tenant was stored where no request ever looks)."""
    if not _names_one(scope, Scope):
        raise InvalidRequest(f"scope must be one of {[s.value for s in Scope]}", param="scope")
    kind = Scope(scope)
    owner = [] if owner is None else owner
    if not isinstance(owner, list) or not all(isinstance(o, str) for o in owner):
        raise InvalidRequest("owner must be a list of strings", param="owner")
    # (a tier or tenant name is never empty; a user name is, for requests without a 'user')
    if len(owner) != _OWNER_SIZES[kind] or (owner and not owner[0]):
        raise InvalidRequest(f"scope {scope!r} takes {_OWNERS[kind]}, not {owner}", param="owner")
    return Partition(kind, tuple(owner))


_FILTER_FIELDS = {"engine", "version", "scope", "owner", "older_than_seconds"}


def _invalidation_filter(body: dict[str, Any]) -> InvalidationFilter:
    unknown = set(body) - _FILTER_FIELDS - {"all"}
    if unknown:
        raise InvalidRequest(
            f"unknown field {sorted(unknown)[0]!r}; use any of {sorted(_FILTER_FIELDS)}",
            param=sorted(unknown)[0],
        )
    # Every user's answers go with an empty filter: that must be asked for by name, as the CLI's
    # --all asks (an empty body, a client's bug or a stray curl, wiped the whole cache).
    wants_all = body.get("all")
    if wants_all is not None and not isinstance(wants_all, bool):
        raise InvalidRequest("all must be true or false", param="all")
    filters = {k for k, v in body.items() if k in _FILTER_FIELDS and v is not None}
    if not filters and wants_all is not True:
        raise InvalidRequest(
            f'no filter given: send any of {sorted(_FILTER_FIELDS)}, or {{"all": true}} to'
            " invalidate every entry",
            param="all",
        )
    if filters and wants_all:
        raise InvalidRequest('"all": true with a filter: send one or the other', param="all")
    scope = body.get("scope")
    if scope is not None and not _names_one(scope, Scope):
        raise InvalidRequest(f"scope must be one of {[s.value for s in Scope]}", param="scope")
    # A scope alone is every partition of it (every tenant's); an owner narrows it to one.
    partition = None
    if body.get("owner") is not None:
        if scope is None:
            raise InvalidRequest("owner needs a scope: whose partition of which", param="owner")
        partition = _partition(scope, body["owner"])
    age = body.get("older_than_seconds")
    if age is not None and (not isinstance(age, int | float) or isinstance(age, bool) or age < 0):
        raise InvalidRequest("older_than_seconds must be a number >= 0", param="older_than_seconds")
    for name in ("engine", "version"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidRequest(f"{name} must be a string", param=name)
    return InvalidationFilter(
        engine=body.get("engine"),
        version=body.get("version"),
        scope=Scope(scope) if scope is not None else None,
        partition=partition,
        older_than_seconds=float(age) if age is not None else None,
    )


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")
