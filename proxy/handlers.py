"""Thin HTTP handlers: parse, call, render. The request path itself is in ``pipeline.py``."""

from __future__ import annotations

import time
from collections.abc import Collection

import orjson
from aiohttp import web

from proxy import pipeline
from proxy.engines.breaker import CircuitBreaker
from proxy.engines.pool import Engine
from proxy.errors import ModelNotFound
from proxy.services import Services
from proxy.settings import VIRTUAL_MODEL


def add_routes(app: web.Application, services: Services) -> None:
    created = int(time.time())

    async def chat(request: web.Request) -> web.StreamResponse:
        return await pipeline.complete(request, "chat", services)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await pipeline.complete(request, "completion", services)

    def usable(request: web.Request) -> Collection[str]:
        """The models the request's key may use (401 without a valid key, as for completions):
        a client fills its model picker from the list, so it offers none that would be 403."""
        return pipeline.authenticate(request, services).policy.models

    async def models(request: web.Request) -> web.Response:
        allowed = usable(request)
        data = [_model_card(VIRTUAL_MODEL, created, root=None)] if VIRTUAL_MODEL in allowed else []
        data += [
            _model_card(e.model, created, root=e.version)
            for e in services.engines
            if e.model in allowed
        ]
        return _json({"object": "list", "data": data})

    async def model(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        allowed = usable(request)
        engine = services.by_model.get(name)
        if name not in allowed or (name != VIRTUAL_MODEL and engine is None):
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        if engine is None:
            return _json(_model_card(VIRTUAL_MODEL, created, root=None))
        return _json(_model_card(engine.model, created, root=engine.version))

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        now = time.monotonic()
        engines: dict[str, dict[str, object]] = {}
        ready = True
        for e in services.engines:
            # An engine can answer while any version serving it can: during a rollout its canary
            # answers the stable's share when the stable's replicas are all down (and the other
            # way round), so one version down does not take the proxy out of its load balancer.
            versions = services.rollouts.serving(e)
            answering = [v for v in versions if v.ready_at(now)]
            ready = ready and any(v.version is not None for v in answering)
            engines[e.name] = {"ready": bool(answering)}
            engines[e.name].update(_replica_set(e, now))  # the stable's
            if len(versions) > 1:
                engines[e.name]["canary"] = {
                    "ready": versions[1].ready_at(now),
                    **_replica_set(versions[1], now),
                }
        if services.draining:
            # The proxy is stopping, after a delay in which it still serves: the load balancer
            # takes it out of rotation now, so no client is sent to it once its listener closes.
            return _json({"ready": False, "reason": "draining", "engines": engines}, status=503)
        return _json({"ready": ready, "engines": engines}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=services.metrics.render())
        response.headers["Content-Type"] = services.metrics.CONTENT_TYPE
        return response

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # a Hugging Face id has a slash
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def _replica_set(engine: Engine, now: float) -> dict[str, object]:
    return {
        "version": engine.version,
        "replicas": {r.url: r.healthy for r in engine.replicas},
        # healthy at /health yet failing completions: what took a replica out
        "breakers": {r.url: _breaker_state(r.breaker, now) for r in engine.replicas},
    }


def _breaker_state(breaker: CircuitBreaker, now: float) -> str:
    # An open breaker whose probe is due lets the next request through: half-open, as
    # /metrics says (frugal_breaker_state).
    if breaker.state == "open" and breaker.available(now):
        return "half_open"
    return breaker.state


def _model_card(model: str, created: int, *, root: str | None) -> dict[str, object]:
    card: dict[str, object] = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "frugal",
    }
    if root is not None:
        card["root"] = root
    return card


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")
