"""The request path of a completion, top to bottom.

    authenticate ─▶ read + parse body ─▶ tier policy, max_tokens cap ─▶ concurrency, rate, tokens
    ─▶ exact lookup for the strongest allowed engine ─▶ embed the last user turn once ─▶ route
    (difficulty, stickiness, load) ─▶ cache lookup (exact, then semantic) ─▶ single-flight
    ─▶ budget reservation ─▶ admission queue ─▶ engine call (replica choice, retry, breaker)
    ─▶ relay ─▶ cache store ─▶ headers, metrics, access log

Each step is a call into a small module with one job (policy/, routing/, cache/, engines/); this
file orders them and carries the per-request facts in an :class:`Exchange`.

Routing comes before the cache lookup because every cache entry belongs to one engine version: the
lookup needs to know which engines' answers are good enough for this request (the routed engine,
or a stronger one the tier may use).

When the route needs no embedding (a named model) and the engine would take the request at once,
the embedding and the semantic lookup run beside the single-flight, reservation and engine call
(``cache.lookup_beside_engine``): the answer is relayed once the lookup has missed, and a hit
closes the engine's request and is served instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Collection, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson
import structlog
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_exceptions import HttpProcessingError, TransferEncodingError

from proxy.cache.keys import (
    CacheKeys,
    Endpoint,
    KeyMaterial,
    Partition,
    Scope,
    key_material,
    keys_from_material,
)
from proxy.cache.modes import CacheMode, request_mode
from proxy.cache.service import CacheHit, LookupTally, follow_as_sse
from proxy.cache.singleflight import Follower, Leader, LeaderFailed
from proxy.cache.stream_codec import StreamAssembler, replay_sse, replayed_identity
from proxy.embeddings.worker import EncoderUnavailable
from proxy.engines.client import Upstream
from proxy.engines.pool import Engine
from proxy.errors import (
    AnswerOutlastedRequest,
    FrugalError,
    InternalError,
    InvalidRequest,
    MalformedHttp,
    ModelNotFound,
    NoHealthyReplica,
    PayloadTooLarge,
    PermissionDenied,
    ProxyStopping,
    RequestTimeout,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.observability.savings import split_savings
from proxy.policy.admission import Slot
from proxy.policy.errors import EngineOverloaded, LimitsUnavailable, PolicyError
from proxy.policy.keys import bearer_token
from proxy.policy.limits import prompt_token_bound, prompt_token_estimate, worst_case_usd
from proxy.policy.policyset import Principal, cap_max_tokens, resolve_model
from proxy.policy.schema import TierPolicy
from proxy.rollout.manager import Selection
from proxy.routing.decision import EngineLoad, EngineNotAllowedError, RouteDecision
from proxy.services import Services
from proxy.settings import VIRTUAL_MODEL
from proxy.sse import DONE_PAYLOAD, SSEParser, frame
from proxy.stopping import is_stop
from proxy.wire import (
    CompletionRequest,
    Kind,
    conversation_prefix,
    expected_choices,
    generated_sequences,
    last_user_text,
    parse_request,
)

log = structlog.get_logger("frugal.access")

PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
ENDPOINTS: dict[Kind, Endpoint] = {"chat": Endpoint.CHAT, "completion": Endpoint.COMPLETIONS}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError)


@dataclass(slots=True)
class Exchange:
    """What one request did: fills as the request moves down the path; read at the end."""

    request_id: str
    started: float
    kind: str = ""  # chat or completion: which endpoint was asked
    tier: str = "-"
    tenant: str = "-"
    model: str = ""
    engine: Engine | None = None  # the engine whose answer the client got
    version: str | None = None  # the version that answered (stable, canary, or a cache entry's)
    instead_of: str | None = None  # the version the canary split chose, down: ``version`` answered
    routed: Engine | None = None  # the engine the router chose
    cache: str = "bypass"
    cache_similarity: float | None = None
    cache_age_s: float | None = None
    coalesced: bool = False
    route_reason: str = ""
    route_detail: str = ""  # the decision's own words, e.g. the load estimate that moved it
    route_score: float | None = None
    max_tokens_clamped: int | None = None
    status: int = 200
    upstream_status: int | None = None  # what the engine answered, when it answered
    stream: bool = False
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_s: float | None = None
    upstream_s: float = 0.0  # time spent waiting on the engine, for the proxy's own overhead
    # time a coalesced follower waited on its leader's engine call: not the proxy's overhead
    # either, but kept apart from upstream_s, which teaches the router the engine's service time
    shared_wait_s: float = 0.0
    slot: Slot | None = None  # the engine slot it queued for (its waited_s is not overhead)
    baseline: Engine | None = None  # what the request would have used with no routing
    error: str | None = None
    latency_s: float = 0.0  # set when the handler returns
    conversation: CompletionRequest | None = None  # a chat answered by the routed engine
    # the encoder was too far behind to embed the last user turn: no semantic lookup or
    # difficulty score; the answer is embedded for the cache later, in the background
    embedding_shed: bool = False
    counted_in_flight: bool = False  # in frugal_requests_in_flight (from authentication on)

    def headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.request_id, "x-frugal-cache": self.cache}
        if self.engine is not None:
            headers["x-frugal-engine"] = self.engine.name
            headers["x-frugal-model-version"] = self.version or self.engine.version or "unknown"
        if self.routed is not None:
            headers["x-frugal-route"] = self.routed.name
            headers["x-frugal-route-reason"] = self.route_reason
            if self.route_detail:
                headers["x-frugal-route-detail"] = self.route_detail
            if self.route_score is not None:
                headers["x-frugal-route-score"] = f"{self.route_score:.4f}"
        if self.cache_similarity is not None:
            headers["x-frugal-cache-similarity"] = f"{self.cache_similarity:.4f}"
        if self.cache_age_s is not None:
            headers["x-frugal-cache-age"] = str(int(self.cache_age_s))
        if self.coalesced:
            headers["x-frugal-cache-coalesced"] = "1"
        if self.max_tokens_clamped is not None:
            headers["x-frugal-max-tokens-clamped"] = str(self.max_tokens_clamped)
        return headers


@dataclass(slots=True)
class CachePlan:
    """How this request uses the cache: its mode and the keys to look up, best engine first."""

    mode: CacheMode
    lookups: list[CacheKeys] = field(default_factory=list)  # [0] is the routed engine's
    semantic: bool = False
    ttl_s: float | None = None
    scope: Scope = Scope.TENANT
    partition: Partition | None = None
    _keys: dict[str, CacheKeys] = field(default_factory=dict)
    # the body's canonical form, serialised once for every engine (routing and the upstream body
    # change only fields the keys exclude: model, stream_options)
    _material: KeyMaterial | None = None
    exact_missed: str | None = None  # an exact key already looked up without a hit
    # the lookups before and after routing, counted in the cache's stats as one outcome
    tally: LookupTally = field(default_factory=LookupTally)

    @property
    def keys(self) -> CacheKeys | None:
        return self.lookups[0] if self.lookups else None

    def keys_for(self, req: CompletionRequest, engine: Engine) -> CacheKeys | None:
        """The request's keys for one engine version, hashed once per request and engine."""
        if self.partition is None or engine.version is None:
            return None  # an engine whose weights are unknown can neither serve nor store
        memo = f"{engine.name}\0{engine.version}"  # a canary shares its engine's name
        keys = self._keys.get(memo)
        if keys is None:
            if self._material is None:
                self._material = key_material(ENDPOINTS[req.kind], req.body, semantic=self.semantic)
            keys = keys_from_material(
                self._material,
                engine=engine.name,
                version=engine.version,
                partition=self.partition,
            )
            self._keys[memo] = keys
        return keys


async def complete(request: web.Request, kind: Kind, services: Services) -> web.StreamResponse:
    with services.streams.answering():  # a stop answers it 503 if it has sent nothing yet
        return await _complete(request, kind, services)


async def _complete(request: web.Request, kind: Kind, services: Services) -> web.StreamResponse:
    exchange = Exchange(
        request_id=services.request_ids.accept(request.headers.get("x-request-id")),
        started=time.perf_counter(),
        kind=kind,
    )
    lookup: asyncio.Future[tuple[CacheHit | None, np.ndarray | None]] | None = None
    try:
        # The key first: a caller without a valid one learns nothing about its body (and the
        # proxy reads no body for it).
        principal = authenticate(request, services)
        exchange.tier, exchange.tenant = principal.tier, principal.tenant
        services.metrics.in_flight(tier=principal.tier, delta=1)
        exchange.counted_in_flight = True
        policy = principal.policy

        req = parse_request(await _read_body(request, services), kind)
        exchange.model, exchange.stream = req.model, req.stream
        _check_model_exists(services, req.model, policy.models)
        requested = resolve_model(policy, req.model)
        allowed = _allowed_engines(services, requested)
        _cap_max_tokens(req, policy, exchange)
        prompt_bound = _prompt_bound(req, policy)

        async with services.limiter.admit(principal, prompt_tokens=prompt_bound) as ticket:
            plan = _cache_plan(request, req, principal, services)
            exchange.baseline = allowed[-1]
            # The cheapest hit first: an exact answer from the strongest engine this request may
            # use is good enough whatever the router would say, and it needs no embedding.
            prefix = _memo(lambda: conversation_prefix(req))
            rollouts = services.rollouts
            hit = await _exact_lookup(services, plan, req, rollouts.select(allowed[-1], prefix))
            if hit is not None:
                return _respond_from_cache(request, req, hit, exchange, services)
            beside = _lookup_beside_engine(services, requested, allowed, plan, policy)
            embedding = (
                None if beside else await _embed(services, req, requested, allowed, plan, exchange)
            )
            # Each allowed engine's canary answers the conversations in its share (sticky per
            # conversation); the other version answers them while every replica of their own is
            # down. The router judges each engine by the replica set that would answer.
            selections = {e.name: rollouts.choose(e, prefix) for e in allowed}
            decision = _route(services, req, requested, allowed, principal, embedding, selections)
            engine = _answer_with(exchange, selections[decision.engine])
            exchange.route_reason, exchange.route_score = decision.reason, decision.score
            exchange.route_detail = decision.detail
            if exchange.embedding_shed and decision.reason == "difficulty":
                exchange.route_detail = f"encoder busy: {decision.detail}"
            services.metrics.route_decision(
                tier=principal.tier, engine=engine.name, reason=decision.reason
            )
            _prepare_upstream_body(req, engine)

            stable = rollouts.stable_of(engine)
            stronger = (
                [selections[e.name].engine for e in allowed[allowed.index(stable) + 1 :]]
                if requested == VIRTUAL_MODEL
                else []
            )
            _plan_keys(plan, req, [engine, *stronger])
            cutoff = _cutoff(services, plan, principal)
            refused: list[CacheHit] | None = (
                []
                if services.tuner is not None and services.tuner.wants_counterfactual(policy.cache)
                else None
            )
            if beside and services.admissions[engine.name].free:
                # The route needed no embedding, and the engine takes the request at once: the
                # question is embedded and looked up by meaning while the engine is asked, so a
                # miss waits for no encoder. (Behind the engine's queue, a hit is served first.)
                lookup = asyncio.ensure_future(
                    _embed_and_lookup(services, req, requested, allowed, plan, exchange, cutoff)
                )
                hit = None
            else:
                if beside:  # (the engine has a queue: looked up first after all)
                    embedding = await _embed(services, req, requested, allowed, plan, exchange)
                hit = await _lookup(services, plan, embedding, exchange, cutoff, refused)
            if hit is not None:
                _audit_hit(services, principal, req, hit, cutoff)
                return _respond_from_cache(request, req, hit, exchange, services)

            flight = (
                services.flights.join(plan.keys.exact, streaming=req.stream)
                if (plan.keys is not None)
                else None
            )
            if flight is not None and not isinstance(flight, Leader):
                followed = time.perf_counter()
                try:
                    with contextlib.suppress(LeaderFailed):
                        return await _follow(request, req, flight, exchange, services)
                finally:
                    exchange.shared_wait_s += time.perf_counter() - followed
                # The leader failed before this request was sent a byte: ask the engine ourselves
                # (and say so: this answer is not a shared one).
                flight = None
                exchange.coalesced, exchange.cache = False, "miss"

            # every sequence the engine generates (max(n, best_of) per prompt) may use all of
            # max_tokens, the ones best_of discards too
            max_output = (req.max_tokens or policy.limits.max_tokens) * generated_sequences(req)
            worst_case = worst_case_usd(engine.settings.cost, prompt_bound, max_output)
            exchange.slot = services.admissions[engine.name].slot(
                priority=policy.priority,
                max_wait_s=policy.queue.max_wait_ms / 1000,
                tier=principal.tier,
            )
            try:
                async with (
                    flight if flight is not None else contextlib.nullcontext(),
                    ticket.budget(worst_case) as spend,
                    exchange.slot,
                ):
                    answered = (
                        services.auditor.counterfactual(
                            tier=principal.tier,
                            cache_policy=policy.cache,
                            engine=engine,
                            refused=refused,
                            cutoff=cutoff,
                        )
                        if refused and services.auditor is not None
                        else None
                    )
                    try:
                        response = await _answer_from_engine(
                            request, req, engine, exchange, services, plan, embedding, flight,
                            answered, lookup,
                        )  # fmt: skip
                    finally:
                        # also what a stream the client left (or the engine broke) had sent:
                        # the tokens counted in it and its prompt's estimate, when its usage
                        # chunk never came (the other version's price, when it answered in place
                        # of this one); nothing for a hit found while the engine was asked
                        answering = exchange.engine or engine
                        spend.record(
                            answering.settings.cost.usd(exchange.tokens_in, exchange.tokens_out)
                        )
                        if exchange.tokens_in or exchange.tokens_out:  # (nothing known: no change)
                            ticket.record_usage(exchange.tokens_in, exchange.tokens_out)
            except PolicyError:
                # Refused before the engine was asked (the budget, the engine's queue): a hit
                # found by meaning meanwhile is served, as it would have been without the overlap.
                found = (await lookup)[0] if lookup is not None else None
                if found is None:
                    raise
                response = found
            if isinstance(response, CacheHit):  # found by meaning while the engine was asked
                _audit_hit(services, principal, req, response, cutoff)
                return _respond_from_cache(request, req, response, exchange, services)
            if req.kind == "chat":
                exchange.conversation = req  # the router remembers it once the answer is out
            return response
    except EngineNotAllowedError as not_allowed:
        # (a name of its own for each clause's error: the compiled build types a name once)
        services.metrics.policy_rejected(tier=exchange.tier, reason="model_not_allowed")
        raise _refusal(exchange, PermissionDenied(str(not_allowed), param="model")) from None
    except FrugalError as err:
        if isinstance(err, PolicyError) and not isinstance(err, _NOT_A_POLICY_REFUSAL):
            services.metrics.policy_rejected(tier=exchange.tier, reason=err.reason)
        raise _refusal(exchange, err) from None
    except asyncio.CancelledError as cancelled:
        if not is_stop(cancelled) or request.writer.output_size > 0:
            exchange.status = 499  # the client closed the connection
            raise
        # The proxy is stopping and the answer is not ready at its last deadline: a 503 the
        # client can read and retry elsewhere, not a connection closed without a response.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        stopped = ProxyStopping("the proxy stopped before the answer was ready")
        raise _refusal(exchange, stopped) from None
    except _CLIENT_GONE:
        exchange.status = 499  # the client closed the connection
        raise
    except web.HTTPException as refused:  # aiohttp's own refusal; the middleware renders it
        exchange.status = refused.status
        raise
    except Exception as exc:
        # A bug: the error middleware logs it and answers 500; metrics and the access line
        # record that 500, not the 200 the exchange started with.
        raise _refusal(exchange, InternalError(bug=exc)) from exc
    finally:
        if lookup is not None and not lookup.done():  # (a follower, a refusal, a client gone)
            lookup.cancel()
        # Metrics and the access line run just after the response is written (the next turn of
        # the loop), so their cost is not added to every answer's latency.
        exchange.latency_s = time.perf_counter() - exchange.started
        asyncio.get_running_loop().call_soon(_finish, exchange, services)


# -- admission and policy ---------------------------------------------------------------------


def authenticate(request: web.Request, services: Services) -> Principal:
    """The caller behind the request's API key (401 without a valid one; the open tier when no
    policy defines keys)."""
    return services.policies.current.authenticate(
        bearer_token(request.headers.get("Authorization"))
    )


# The body types a browser sends to another origin without asking it first (a CORS "simple
# request"). Refused, so no web page can spend engine time through a proxy that answers without
# a key; vLLM refuses them too (it reads a body as JSON only when it says so, or says nothing).
FORM_CONTENT_TYPES: Final = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)


async def _read_body(request: web.Request, services: Services) -> bytes:
    declared = request.headers.get("Content-Type")
    # (JSON, nearly every request, without parsing the header: that cost ~3 µs a request)
    if (
        declared is not None
        and not declared.startswith("application/json")
        and request.content_type in FORM_CONTENT_TYPES
    ):
        raise UnsupportedMediaType(
            f"The request body must be JSON, sent with 'Content-Type: application/json' "
            f"(this one says {request.content_type!r})."
        )
    limit = services.settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    try:
        # The whole body (a chunked one too); the app's client_max_size stops it past the limit.
        if request.content.is_eof():
            body = await request.read()  # (nearly always: it came with the head)
        else:
            # A client sending its body slowly, or not at all, would hold the connection and
            # this task for as long as it liked.
            async with asyncio.timeout(services.settings.server.body_timeout_s):
                body = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {services.settings.server.body_timeout_s:g} s."
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The request body is larger than the limit of {limit} bytes."
        ) from None
    except HttpProcessingError:
        # The chunked encoding broke after the head (proxy/protocol.py hands the parser's refusal
        # to the body): answered at once, not after body_timeout_s.
        raise _broken_chunking() from None
    except web.RequestPayloadError as exc:
        if isinstance(exc.__cause__, TransferEncodingError):  # (the pure-Python parser's form)
            raise _broken_chunking() from None
        # e.g. Content-Encoding: gzip on a body that is not gzip
        raise InvalidRequest(f"The request body could not be decoded: {exc}") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    return body


def _broken_chunking() -> MalformedHttp:
    return MalformedHttp(
        "Malformed HTTP request: the request body's chunked transfer encoding is malformed or "
        "incomplete."
    )


def _check_model_exists(services: Services, model: str, usable: Collection[str]) -> None:
    """404 for a model no engine serves (before the policy's 403: it cannot exist for anyone).
    The message offers the models this key may use, as /v1/models lists them: not the names of
    models kept for other tiers."""
    if model != VIRTUAL_MODEL and model not in services.by_model:
        offered = [m for m in (VIRTUAL_MODEL, *services.by_model) if m in usable]
        raise ModelNotFound(
            f"The model '{_loggable_model(model)}' does not exist. Available: "
            + (", ".join(offered) if offered else "none for this key"),
            param="model",
        )


def _allowed_engines(services: Services, requested: str) -> list[Engine]:
    """The engines this request may use, weak to strong."""
    if requested != VIRTUAL_MODEL:
        return [services.by_model[requested]]
    # `auto` may reach every engine: the tier's routing settings (strong_share or threshold)
    # decide how much of it goes to the stronger ones, not its list of nameable models.
    return services.router.weak_to_strong


def _cap_max_tokens(req: CompletionRequest, policy: TierPolicy, exchange: Exchange) -> None:
    # The field the engine reads: chat's newer name when the body has it; a completion has only
    # max_tokens (vLLM's completion request does not know max_completion_tokens).
    newer = req.kind == "chat" and "max_completion_tokens" in req.body
    key = "max_completion_tokens" if newer else "max_tokens"
    capped = cap_max_tokens(policy, req.max_tokens, key)
    if capped.clamped:
        exchange.max_tokens_clamped = capped.value
        req.set(key, capped.value)
        req.max_tokens = capped.value
    elif capped.defaulted and policy.budget.usd_per_day is not None:
        # A budgeted tier bounds what a request may cost, so the engine must be told the cap.
        req.set(key, capped.value)
        req.max_tokens = capped.value


def _prompt_bound(req: CompletionRequest, policy: TierPolicy) -> int:
    """The prompt's token bound, for the limits that count tokens (0 when none does: the
    bound serialises every message, a cost the open path need not pay)."""
    budget = policy.budget
    if (
        policy.limits.tokens_per_minute is None
        and budget.usd_per_day is None
        and budget.usd_per_day_per_tenant is None
    ):
        return 0
    return prompt_token_bound(_prompt_texts(req))


def _prompt_texts(req: CompletionRequest) -> list[str]:
    if req.kind == "completion":
        prompt = req.body["prompt"]
        return [prompt] if isinstance(prompt, str) else [orjson.dumps(prompt).decode()]
    return [orjson.dumps(m.get("content")).decode() for m in req.body["messages"]]


def _memo(compute: Callable[[], bytes]) -> Callable[[], bytes]:
    """``compute`` run at most once (the conversation prefix, only if a canary asks for it)."""
    cell: list[bytes] = []

    def get() -> bytes:
        if not cell:
            cell.append(compute())
        return cell[0]

    return get


def _answer_with(exchange: Exchange, selection: Selection) -> Engine:
    """The replica set the request goes to, noted with the version the split chose when that
    one is down and the other answers in its place (the header, figures and judge read it)."""
    engine = selection.engine
    exchange.routed = exchange.engine = engine
    exchange.version = engine.version
    if selection.instead_of is not None:
        exchange.instead_of = selection.instead_of.version or "unknown"
    return engine


# Refusals counted elsewhere: a full engine queue in frugal_admission_rejected_total, an
# unreachable limits backend in frugal_limits_errors_total. The rest of the policy errors (keys,
# models, max_tokens, rates, concurrency, budget) are frugal_policy_rejected_total.
_NOT_A_POLICY_REFUSAL = (EngineOverloaded, LimitsUnavailable)


def _refusal(exchange: Exchange, err: FrugalError) -> FrugalError:
    exchange.status, exchange.error = err.status, err.reason
    err.headers.update(exchange.headers())
    return err


# -- embedding and routing --------------------------------------------------------------------


async def _embed(
    services: Services,
    req: CompletionRequest,
    requested: str,
    allowed: list[Engine],
    plan: CachePlan,
    exchange: Exchange,
) -> np.ndarray | None:
    """One embedding of the last user turn serves both the router and the semantic cache.

    None when there is nothing to embed for, or when the encoder is further behind than
    ``embeddings.max_queue_ms``: the request then goes on as a cache miss routed without a
    difficulty score, rather than queueing behind the model."""
    if services.embedder is None:
        return None
    routing = requested == VIRTUAL_MODEL and len(allowed) > 1 and services.router.scores
    if not (routing or (plan.semantic and plan.mode.read)):
        return None
    text = last_user_text(req)
    if not text:
        return None
    if not routing and (
        services.cache is None or not services.cache.semantic_fits(text, count=False)
    ):
        return None  # matched exactly only: a pass over it would serve nothing
    try:
        return await services.embedder.embed(text)
    except EncoderUnavailable:  # too far behind, or its process lost: go on without it
        exchange.embedding_shed = True
        services.metrics.embedding_shed(purpose="routing" if routing else "cache")
        return None


def _route(
    services: Services,
    req: CompletionRequest,
    requested: str,
    allowed: list[Engine],
    principal: Principal,
    embedding: np.ndarray | None,
    selections: Mapping[str, Selection],
) -> RouteDecision:
    """``selections``: the replica set of each allowed engine that would answer this request."""
    router = services.router
    if requested != VIRTUAL_MODEL:
        return router.decide(
            requested=allowed[0].name,
            allowed=allowed,
            score=None,
            threshold=1.0,
            conversation=None,
            loads=None,
            ttft_target_ms=None,
        )
    routing = principal.policy.routing
    score = None
    if embedding is not None and router.scores and req.kind == "chat" and len(allowed) > 1:
        score = router.score(req.body["messages"], embedding)
        router.observe_score(principal.tier, routing.strong_share, score)
    target = router.budget.share(
        principal.tier, routing, principal.policy.budget.usd_per_day, time.monotonic()
    )
    threshold = router.threshold(
        principal.tier, share=routing.strong_share, fixed=routing.score_threshold, target=target
    )
    follow_up = req.kind == "chat" and any(
        m.get("role") == "assistant" for m in req.body["messages"]
    )
    return router.decide(
        requested=VIRTUAL_MODEL,
        allowed=allowed,
        score=score,
        threshold=threshold,
        conversation=(
            sticky_key(principal.tier, principal.tenant, conversation_prefix(req))
            if follow_up
            else None
        ),
        loads=_Loads(services, selections),
        ttft_target_ms=principal.policy.latency.ttft_p95_ms,
        unavailable=_Unavailable(selections),
    )


def sticky_key(tier: str, tenant: str, prefix: bytes) -> bytes:
    """What the router remembers a conversation by: its prefix, within its tenant. Another
    tenant's conversation that starts alike (a greeting, a shared system prompt) is not held on
    the engine this one used: that engine may be beyond what the other's tier routes to."""
    return b"\0".join((tier.encode(), tenant.encode(), prefix))


class _Unavailable(Container[str]):
    """The engines that cannot answer: the version chosen for this request is another's
    fallback already, so an engine is out only when neither its stable nor its canary can.
    Worked out per engine when the router asks (it asks about its choice first, and about the
    others only when that one is out)."""

    __slots__ = ("_known", "_now", "_selections")

    def __init__(self, selections: Mapping[str, Selection]) -> None:
        self._selections = selections
        self._now = time.monotonic()
        self._known: dict[str, bool] = {}

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        out = self._known.get(name)
        if out is None:
            selection = self._selections.get(name)
            out = selection is not None and not selection.engine.can_take(self._now)
            self._known[name] = out
        return out


class _Loads(Mapping[str, EngineLoad]):
    """Each engine's load as this request would meet it: the proxy's queue and slots in front
    of the engine (shared by its versions), and vLLM's own queue on the replica set that would
    answer. Not the busier of the two versions: a conversation sticks to its version, so a
    swamped canary holding a small share must not move the stable's conversations off the
    engine, nor an idle stable hide the canary's queue from those in the canary's share.
    Worked out per engine when the router reads it: it reads its choice's first, and the others
    only when that one would break the latency target."""

    __slots__ = ("_known", "_selections", "_services")

    def __init__(self, services: Services, selections: Mapping[str, Selection]) -> None:
        self._services = services
        self._selections = selections
        self._known: dict[str, EngineLoad] = {}

    def __getitem__(self, name: str) -> EngineLoad:
        load = self._known.get(name)
        if load is None:
            selection = self._selections[name]
            gate = self._services.admissions[name]
            load = self._known[name] = self._services.router.load(
                selection.engine, gate.waiting, gate.active, gate.queue_delay()
            )
        return load

    def __iter__(self) -> Iterator[str]:
        return iter(self._selections)

    def __len__(self) -> int:
        return len(self._selections)


def _prepare_upstream_body(req: CompletionRequest, engine: Engine) -> None:
    if req.model != engine.wire_model:
        req.set("model", engine.wire_model)
    if req.stream and not req.include_usage:
        # Ask the engine for usage so tokens and cost are counted (and a cached stream can replay
        # it); the client, who did not ask for it, never sees that chunk.
        options = dict(req.body.get("stream_options") or {})
        options["include_usage"] = True
        req.set("stream_options", options)


# -- cache ------------------------------------------------------------------------------------


def _cache_plan(
    request: web.Request, req: CompletionRequest, principal: Principal, services: Services
) -> CachePlan:
    cache = services.cache
    policy = principal.policy.cache
    if cache is None:
        return CachePlan(CacheMode.OFF)
    header = request.headers.get("Cache-Control")
    if header and not policy.allow_no_cache:
        header = None  # this tier may not skip the cache; the header is ignored, not an error
    mode = request_mode(
        policy.tier_mode,
        cache_control=header,
        body=req.body,
        allow_sampled=policy.cache_sampled,
    )
    scope = policy.scope_kind
    return CachePlan(
        mode,
        semantic=policy.semantic and services.settings.cache.semantic,
        ttl_s=float(policy.ttl_seconds),
        scope=scope,
        partition=Partition.for_request(
            scope, tier=principal.tier, tenant=principal.tenant, user=req.user
        ),
    )


def _plan_keys(plan: CachePlan, req: CompletionRequest, engines: list[Engine]) -> None:
    if plan.mode is CacheMode.OFF:
        return
    for engine in engines if plan.mode.read else engines[:1]:
        keys = plan.keys_for(req, engine)
        if keys is not None:
            plan.lookups.append(keys)
    if not plan.lookups or plan.lookups[0].engine != engines[0].name:
        plan.lookups.clear()
        plan.mode = CacheMode.OFF


async def _exact_lookup(
    services: Services, plan: CachePlan, req: CompletionRequest, engine: Engine
) -> CacheHit | None:
    cache = services.cache
    keys = plan.keys_for(req, engine) if plan.mode.read else None
    if cache is None or keys is None:
        return None
    hit = await cache.lookup(
        keys, embedding=None, mode=plan.mode, semantic=False, max_age=plan.ttl_s, tally=plan.tally
    )
    if hit is not None:
        cache.count_lookups(plan.tally)
        services.metrics.cache_lookup(kind="exact", scope=plan.scope.value, hit=True)
    else:
        plan.exact_missed = keys.exact
    return hit


def _cutoff(services: Services, plan: CachePlan, principal: Principal) -> float | None:
    """The tier's verifier cut-off for semantic lookups (its policy's, or the tuned one)."""
    if services.tuner is None or not plan.semantic:
        return None
    return services.tuner.cutoff(principal.tier, principal.policy.cache)


async def _lookup(
    services: Services,
    plan: CachePlan,
    embedding: np.ndarray | None,
    exchange: Exchange,
    cutoff: float | None = None,
    refused: list[CacheHit] | None = None,
) -> CacheHit | None:
    cache = services.cache
    if cache is None:
        exchange.cache = "bypass"
        return None
    if plan.mode is CacheMode.OFF:
        exchange.cache = "bypass"
        cache.count_lookups(plan.tally)  # the lookup before routing, if it made one, missed
        return None
    exchange.cache = "miss" if plan.mode.read else "bypass"
    if not plan.mode.read:
        return None
    semantic = plan.semantic and embedding is not None
    for keys in plan.lookups:
        # Looked up before routing, a moment ago: one store read per key is enough.
        exact = keys.exact != plan.exact_missed
        if not exact and not semantic:
            continue
        hit = await cache.lookup(
            keys,
            embedding=embedding,
            mode=plan.mode,
            semantic=plan.semantic,
            cutoff=cutoff,
            refused=refused,
            max_age=plan.ttl_s,
            exact=exact,
            tally=plan.tally,
        )
        if hit is not None:
            cache.count_lookups(plan.tally)
            services.metrics.cache_lookup(
                kind=hit.kind, scope=plan.scope.value, hit=True, similarity=hit.similarity
            )
            return hit
    cache.count_lookups(plan.tally)
    services.metrics.cache_lookup(kind="exact", scope=plan.scope.value, hit=False)
    if plan.semantic and embedding is not None:
        services.metrics.cache_lookup(kind="semantic", scope=plan.scope.value, hit=False)
    if plan.semantic and services.embedder is not None and plan.lookups:
        text = plan.lookups[0].query_text
        reason = cache.exact_only_reason(text) if text is not None else None
        if reason is not None:
            services.metrics.cache_exact_only(reason)
    return None


def _lookup_beside_engine(
    services: Services,
    requested: str,
    allowed: list[Engine],
    plan: CachePlan,
    policy: TierPolicy,
) -> bool:
    """Whether this request's semantic lookup can run while the engine is asked: there is one,
    and neither the route (a difficulty score) nor a counterfactual audit (the refused hits) needs
    its outcome before the engine is asked."""
    return (
        services.embedder is not None
        and plan.semantic
        and plan.mode.read
        and services.settings.cache.lookup_beside_engine
        and not (requested == VIRTUAL_MODEL and len(allowed) > 1 and services.router.scores)
        and not (services.tuner is not None and services.tuner.wants_counterfactual(policy.cache))
    )


async def _embed_and_lookup(
    services: Services,
    req: CompletionRequest,
    requested: str,
    allowed: list[Engine],
    plan: CachePlan,
    exchange: Exchange,
    cutoff: float | None,
) -> tuple[CacheHit | None, np.ndarray | None]:
    embedding = await _embed(services, req, requested, allowed, plan, exchange)
    return await _lookup(services, plan, embedding, exchange, cutoff), embedding


def _audit_hit(
    services: Services,
    principal: Principal,
    req: CompletionRequest,
    hit: CacheHit,
    cutoff: float | None,
) -> None:
    if hit.kind == "semantic" and services.auditor is not None:
        services.auditor.consider(
            tier=principal.tier,
            cache_policy=principal.policy.cache,
            # The version that stored the answer is the one to ask again.
            engine=services.rollouts.replica_set(hit.meta.engine, hit.meta.version),
            kind=req.kind,
            body=req.body,
            hit=hit,
            cutoff=cutoff,
        )


def _respond_from_cache(
    request: web.Request,
    req: CompletionRequest,
    hit: CacheHit,
    exchange: Exchange,
    services: Services,
) -> web.StreamResponse:
    exchange.cache = f"hit-{hit.kind}"
    exchange.engine = services.by_name.get(hit.meta.engine, exchange.engine)
    exchange.version = hit.meta.version  # the version that stored the answer
    exchange.cache_age_s = hit.age_seconds
    if hit.kind == "semantic":
        exchange.cache_similarity = hit.similarity
    body = hit.json()
    usage = body.get("usage") or {}
    exchange.tokens_in = int(usage.get("prompt_tokens") or 0)
    exchange.tokens_out = int(usage.get("completion_tokens") or 0)
    endpoint = ENDPOINTS[req.kind]
    # The request's own id, as vLLM forms a miss's id from the x-request-id the proxy sends it:
    # the answer's id then names the access line of the request it was served to.
    identity = replayed_identity(endpoint, token=exchange.request_id, created=int(time.time()))
    exchange.ttft_s = time.perf_counter() - exchange.started
    if not req.stream:
        body.update(identity)  # in place: the stored fields keep their order
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers=exchange.headers()
        )
    events = replay_sse(endpoint, body, include_usage=req.include_usage, overrides=identity)
    return _sse_response(events, exchange)


def _sse_response(events: list[bytes], exchange: Exchange) -> web.Response:
    # The whole replay is known up front: one write, no chunked trickle.
    return web.Response(body=b"".join(events), headers={**_SSE_HEADERS, **exchange.headers()})


async def _follow(
    request: web.Request,
    req: CompletionRequest,
    follower: Follower[bytes, bytes],
    exchange: Exchange,
    services: Services,
) -> web.StreamResponse:
    """An identical request is already on its way to the engine: share its answer."""
    exchange.coalesced = True
    exchange.cache = "hit-exact"
    if not req.stream:
        body = await follower.result()
        exchange.ttft_s = time.perf_counter() - exchange.started
        _count_usage(exchange, body)
        return web.Response(body=body, content_type="application/json", headers=exchange.headers())
    # the client's own wish: req.body now asks the engine for usage whatever the client said
    events = follow_as_sse(follower, ENDPOINTS[req.kind], include_usage=req.include_usage)
    first = await anext(events)  # LeaderFailed here means nothing was sent: the caller retries
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **exchange.headers()})
    await response.prepare(request)
    exchange.ttft_s = time.perf_counter() - exchange.started
    try:
        await response.write(first)
        async for event in events:
            await response.write(event)
    except LeaderFailed as err:
        await _write_quietly(response, _upstream_failed(err).to_sse())
    with contextlib.suppress(LeaderFailed, asyncio.CancelledError, *_CLIENT_GONE):
        _count_usage(exchange, await follower.result())
    await _write_eof_quietly(response)
    return response


def _leader_failed(err: FrugalError) -> LeaderFailed:
    """A leader's failure as its followers see it: one that has sent a follower nothing yet
    asks the engine itself; one that is mid-stream ends with this error as its last event."""
    failure = LeaderFailed(err.message)
    failure.__cause__ = err
    return failure


def _upstream_failed(err: BaseException) -> FrugalError:
    cause = err.__cause__
    if isinstance(cause, FrugalError):
        return cause
    return FrugalError("the shared upstream request failed")


# -- engine -----------------------------------------------------------------------------------


async def _answer_from_engine(
    request: web.Request,
    req: CompletionRequest,
    engine: Engine,
    exchange: Exchange,
    services: Services,
    plan: CachePlan,
    embedding: np.ndarray | None,
    flight: Leader[bytes, bytes] | None,
    answered: Callable[[bytes], None] | None = None,
    lookup: asyncio.Future[tuple[CacheHit | None, np.ndarray | None]] | None = None,
) -> web.StreamResponse | CacheHit:
    """The engine's answer relayed; or, with ``lookup`` (the semantic lookup, still running),
    the hit it found while the engine was asked, whose engine request is then closed."""
    try:
        if lookup is None:
            upstream = await _call_engine(req, engine, exchange, services)
        else:
            beside, embedding = await _call_beside(req, engine, exchange, services, lookup)
            if isinstance(beside, CacheHit):
                return beside
            upstream = beside
            if upstream.status == 200:  # its first byte is relayed now, not when it came
                exchange.ttft_s = time.perf_counter() - exchange.started
    except _FAILED_BEFORE_A_BYTE as err:
        # Every replica of the version chosen for it failed before the client had a byte: its
        # canary (or stable) went down before a health poll or its breaker said so. The other
        # version answers, as once this one is known to be down: its model name, cache key,
        # price, header and figures; the judge counts it as this version's failure. One
        # deadline for the whole request: the retry has what the failed call left of it (none,
        # when a non-streamed answer's wait took it all).
        left_s = engine.settings.timeouts.total_s - exchange.upstream_s
        selection = (
            services.rollouts.fallback(engine)
            if exchange.instead_of is None and left_s > 0
            else None
        )
        if selection is None:
            raise
        deadline = time.monotonic() + left_s
        engine = _answer_with(exchange, selection)
        plan.lookups.clear()
        _plan_keys(plan, req, [engine])
        answered = None  # (the audit's candidates are the failed version's answers)
        if flight is not None:
            # Its followers asked for the failed version: each asks again for itself, so that
            # what they are told is what answered them.
            flight.fail(_leader_failed(err))
            flight = None
        upstream = await _call_engine(req, engine, exchange, services, deadline, err)
    if exchange.ttft_s is not None and upstream.status == 200:
        services.router.observe_ttft(engine.name, exchange.ttft_s)
    shadow = (
        services.rollouts.shadow_hook(
            engine, PATHS[req.kind], req.body, lambda: conversation_prefix(req)
        )
        if exchange.instead_of is None  # (answering for a version down: nothing to compare)
        else None
    )
    store = _Store(services, plan, embedding, exchange, flight, shadow, answered)
    if req.stream and upstream.status == 200:
        return await _relay_stream(request, req, upstream, exchange, store)
    return _relay_body(upstream, exchange, store)


async def _call_beside(
    req: CompletionRequest,
    engine: Engine,
    exchange: Exchange,
    services: Services,
    lookup: asyncio.Future[tuple[CacheHit | None, np.ndarray | None]],
) -> tuple[Upstream | CacheHit, np.ndarray | None]:
    """The engine asked while ``lookup`` (the semantic lookup) runs: its answer once the lookup
    has missed, or the hit the lookup found, whose engine request is then closed (vLLM stops
    the generation; its prefill is spent). With the embedding the lookup made.

    The call runs in this task, not in one of its own: a new task takes its first step only
    after every callback already queued, and in a burst of requests that was a turn of the loop
    behind the others' work (1-3 ms before the engine was asked, docs/benchmarks.md
    2026-11-30 15:53). A hit found before the engine's first byte cancels this task's wait for
    it. The engine's time counts as the engine's only if its answer is the one relayed: a hit's
    own time is all the proxy's."""
    task = asyncio.current_task()
    assert task is not None
    asking = True
    cancelled_for_hit = False

    def on_lookup(done: asyncio.Future[tuple[CacheHit | None, np.ndarray | None]]) -> None:
        nonlocal cancelled_for_hit
        # (asking: this task waits inside the call, so the cancellation lands there)
        if (
            asking
            and not done.cancelled()
            and done.exception() is None
            and done.result()[0] is not None
        ):
            cancelled_for_hit = True
            task.cancel()

    lookup.add_done_callback(on_lookup)
    waited: list[float] = []
    upstream: Upstream | None = None
    failed: FrugalError | None = None
    try:
        upstream = await _call_engine(req, engine, exchange, services, waited=waited)
    except asyncio.CancelledError:
        if not cancelled_for_hit:
            raise
        task.uncancel()
    except _FAILED_BEFORE_A_BYTE as err:
        failed = err  # (a hit found meanwhile is served all the same)
    finally:
        asking = False
        lookup.remove_done_callback(on_lookup)
    try:
        hit, embedding = await lookup
    except BaseException:
        if upstream is not None:
            upstream.finish(ok=True, aborted=True)
        raise
    if hit is not None:
        if upstream is not None:
            upstream.finish(ok=True, aborted=True)
        if upstream is not None or cancelled_for_hit:  # (an engine request was under way)
            services.metrics.engine_request_cancelled(engine=engine.name, reason="cache_hit")
        return hit, embedding
    if failed is not None:
        raise failed
    assert upstream is not None
    exchange.upstream_s += sum(waited)
    return upstream, embedding


# How an engine call fails before the client is sent a byte (the request may go elsewhere).
_FAILED_BEFORE_A_BYTE = (UpstreamError, UpstreamTimeout, NoHealthyReplica)


async def _call_engine(
    req: CompletionRequest,
    engine: Engine,
    exchange: Exchange,
    services: Services,
    deadline: float | None = None,
    failed: FrugalError | None = None,
    waited: list[float] | None = None,
) -> Upstream:
    """``deadline``, ``failed``: this call retries a failed one on another version
    (:meth:`~proxy.engines.client.EngineCaller.open`). ``waited``: where the time waited for the
    engine goes instead of ``exchange.upstream_s``."""
    # A promotion while this request waited for its slot handed the engine the canary's
    # replicas: they take their own model name, and their version is the one answering. (The
    # body's name, not the client's: after a canary failed, the stable takes its own back.)
    if req.body["model"] != engine.wire_model:
        req.set("model", engine.wire_model)
    exchange.version = engine.version
    headers = {"Content-Type": "application/json", "x-request-id": exchange.request_id}
    if engine.settings.api_key:
        headers["Authorization"] = f"Bearer {engine.settings.api_key}"
    t0 = time.perf_counter()
    try:
        upstream = await services.caller.open(
            engine,
            PATHS[req.kind],
            req.encoded(),
            headers,
            # Affinity only matters with a choice of replicas; it serialises the messages.
            affinity=conversation_prefix(req) if len(engine.replicas) > 1 else None,
            stream=req.stream,
            deadline=deadline,
            failed=failed,
        )
    finally:
        if waited is None:
            exchange.upstream_s += time.perf_counter() - t0
        else:
            waited.append(time.perf_counter() - t0)
    # Only an answer has a first token: an engine's error (or a client that left before one)
    # in the TTFT series would pull its percentiles down with fast failures.
    if upstream.status == 200:
        exchange.ttft_s = time.perf_counter() - exchange.started
    return upstream


@dataclass(slots=True)
class _Store:
    """Where a fresh answer goes besides the client: single-flight followers and the cache."""

    services: Services
    plan: CachePlan
    embedding: np.ndarray | None
    exchange: Exchange
    flight: Leader[bytes, bytes] | None
    shadow: Callable[[bytes], None] | None = None  # the canary quality check, when sampled
    answered: Callable[[bytes], None] | None = None  # a counterfactual cache audit's callback

    @property
    def wanted(self) -> bool:
        return (
            self.flight is not None
            or self.plan.mode.write
            or self.shadow is not None
            or self.answered is not None
        )

    def publish(self, payload: bytes) -> None:
        if self.flight is not None:
            self.flight.publish(payload)

    def complete(self, status: int, body: bytes, parsed: Mapping[str, Any] | None = None) -> None:
        if self.flight is not None:
            self.flight.finish(body)
        if self.shadow is not None and status == 200:
            self.shadow(body)
        if self.answered is not None and status == 200:
            self.answered(body)
        cache, plan = self.services.cache, self.plan
        keys = plan.keys
        if (
            cache is None
            or keys is None
            or status != 200
            or not plan.mode.write
            # A promote or rollback while this answer was on its way retired its version.
            or not self.services.rollouts.serves(keys.engine, keys.version)
        ):
            return
        embedder = self.services.embedder
        if self.exchange.embedding_shed and embedder is not None and plan.semantic:
            cache.store_when_embedded(
                keys,
                body,
                embedder.embed_background,
                compute_seconds=self.exchange.upstream_s,
                mode=plan.mode,
                ttl=plan.ttl_s,
                parsed=parsed,
            )
        else:
            cache.store_soon(
                keys,
                body,
                embedding=self.embedding,
                compute_seconds=self.exchange.upstream_s,
                mode=plan.mode,
                ttl=plan.ttl_s,
                parsed=parsed,
            )


def _public_model(engine: Engine) -> tuple[bytes, bytes] | None:
    """The answer's ``"model"`` field as the replicas write it, and as the engine's clients are
    to read it, when the two differ (a canary, or a promoted one, serving its own name): clients
    see the name they ask for, whichever version answers. (vLLM's JSON is compact; a string in
    the answer cannot hold this text unescaped.)"""
    served = engine.upstream_model
    if served is None or served == engine.model:
        return None
    return b'"model":' + orjson.dumps(served), b'"model":' + orjson.dumps(engine.model)


def _relay_body(upstream: Upstream, exchange: Exchange, store: _Store) -> web.Response:
    exchange.status = exchange.upstream_status = upstream.status
    body = upstream.body
    upstream.finish(ok=True)
    if upstream.status < 400:
        rename = _public_model(upstream.engine)
        if rename is not None:
            body = body.replace(*rename, 1)
        _take_usage(exchange, upstream.answer)  # (parsed once, when the caller checked it)
        store.complete(upstream.status, body, upstream.answer)
    else:
        body = openai_error_body(body, upstream.status)
    return web.Response(
        body=body,
        status=upstream.status,
        content_type="application/json",
        headers=exchange.headers(),
    )


async def _relay_stream(
    request: web.Request,
    req: CompletionRequest,
    upstream: Upstream,
    exchange: Exchange,
    store: _Store,
) -> web.StreamResponse:
    # a stop ends it with an error event; a client that stops reading, at its deadline
    with store.services.streams.streaming(upstream.deadline):
        return await _relay(request, req, upstream, exchange, store)


async def _relay(
    request: web.Request,
    req: CompletionRequest,
    upstream: Upstream,
    exchange: Exchange,
    store: _Store,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **exchange.headers()})
    assembler = StreamAssembler(ENDPOINTS[req.kind]) if store.wanted else None

    def sink(payload: bytes) -> None:
        store.publish(payload)
        if assembler is not None:
            assembler.add_payload(payload)

    relay = _StreamRelay(
        rename=_public_model(upstream.engine),
        include_usage=req.include_usage,
        sink=sink if assembler else None,
        choices=expected_choices(req),
    )
    try:
        await response.prepare(request)
        await response.write(relay.feed(upstream.first_chunk))
        t0 = time.perf_counter()
        try:
            async for chunk in upstream.rest():
                out = relay.feed(chunk)
                if out:
                    await response.write(out)
        finally:
            # Also when the client leaves or the engine breaks off: else the whole stream so far
            # would count as the proxy's own overhead.
            exchange.upstream_s += time.perf_counter() - t0
        tail = relay.close()
        if tail:
            await response.write(tail)
        if not relay.complete:
            raise upstream.ended_early()
        upstream.finish(ok=True)
    except FrugalError as err:
        await _end_broken_stream(response, upstream, exchange, store, err)
    except asyncio.CancelledError as exc:
        if not is_stop(exc):
            _client_left(upstream, relay, assembler, store)
            exchange.status = 499
            raise
        # The proxy is stopping and this stream outlasted the grace period: it ends like any
        # broken stream, while its connection is still open (proxy/stopping.py).
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        await _end_broken_stream(
            response, upstream, exchange, store,
            ProxyStopping("the proxy stopped before the answer ended"),
        )  # fmt: skip
    except _CLIENT_GONE:
        # Nothing is left to write, and raising would only make aiohttp log a traceback for an
        # ordinary disconnect.
        _client_left(upstream, relay, assembler, store)
        exchange.status = 499
        return response
    except Exception:
        # A bug, or an engine stream this relay cannot read: still end the stream with an error
        # event and free the replica (its in-flight count, a half-open probe) and the followers.
        log.exception("stream relay failed", request_id=exchange.request_id)
        broken = FrugalError("the answer's stream could not be relayed", code="relay_failed")
        await _end_broken_stream(response, upstream, exchange, store, broken)
    else:
        _stream_ended(relay, assembler, store)
    finally:
        if relay.usage is None:
            # No usage chunk (the client left, the engine broke off): what was relayed is
            # still spent, at least one token a text-bearing delta; so is the prompt, which the
            # engine read before its first token (an estimate: its count never came).
            exchange.tokens_out = max(exchange.tokens_out, relay.tokens_seen)
            exchange.tokens_in = prompt_token_estimate(_prompt_texts(req))
    if relay.usage is not None:
        exchange.tokens_in, exchange.tokens_out = relay.usage
    await _write_eof_quietly(response)
    return response


# Stream endings that say nothing against the replica (its breaker is not told): the request's own
# time running out while the replica was still answering, and the proxy's own stop.
_NOT_THE_REPLICAS_FAULT = (AnswerOutlastedRequest, ProxyStopping)


def _client_left(
    upstream: Upstream,
    relay: _StreamRelay,
    assembler: StreamAssembler | None,
    store: _Store,
) -> None:
    """The streaming client went away. Alone, its engine request is aborted (vLLM stops
    generating); when other requests follow this one's flight, the answer is read to its end
    for them (and the cache) instead of failing them all for one client's disconnect."""
    flight, cache = store.flight, store.services.cache
    if flight is None or not flight.followers or cache is None:
        upstream.finish(ok=False, aborted=True)
        if flight is not None:
            flight.fail(_leader_failed(FrugalError("the client left before the stream ended")))
        return
    flight.hand_off()
    cache.run_in_background(_finish_for_followers(upstream, relay, assembler, store, flight))


async def _finish_for_followers(
    upstream: Upstream,
    relay: _StreamRelay,
    assembler: StreamAssembler | None,
    store: _Store,
    flight: Leader[bytes, bytes],
) -> None:
    """The rest of a stream whose client left, read for the requests following it: its events
    reach them (and the assembler) through the relay's sink. A stop cuts it as it cuts the
    streams it feeds: else its followers were cut mid-stream with no error event at aiohttp's
    deadline, and the drain waited for the engine's whole answer."""
    with store.services.streams.streaming(upstream.deadline):
        try:
            async for chunk in upstream.rest():
                relay.feed(chunk)
            relay.close()
            if not relay.complete:
                raise upstream.ended_early()
        except FrugalError as err:
            upstream.finish(ok=False, aborted=isinstance(err, _NOT_THE_REPLICAS_FAULT))
            flight.fail(_leader_failed(err))
            return
        except BaseException as exc:  # stopped, or a bug: never leave the followers waiting
            upstream.finish(ok=False, aborted=True)
            stopped = isinstance(exc, asyncio.CancelledError) and is_stop(exc)
            flight.fail(
                _leader_failed(
                    ProxyStopping("the proxy stopped before the answer ended")
                    if stopped
                    else FrugalError("the shared upstream request was stopped")
                )
            )
            raise
    upstream.finish(ok=True)
    _stream_ended(relay, assembler, store)


def _stream_ended(relay: _StreamRelay, assembler: StreamAssembler | None, store: _Store) -> None:
    """The engine's stream is over: a clean, complete answer is stored and given to the
    followers; anything else fails their flight."""
    if assembler is not None and relay.complete and assembler.complete:
        answer = assembler.result()
        store.complete(200, orjson.dumps(answer), answer)  # (the bytes need no parsing back)
    elif store.flight is not None:
        store.flight.fail(_leader_failed(FrugalError("the engine's stream ended early")))


async def _end_broken_stream(
    response: web.StreamResponse,
    upstream: Upstream,
    exchange: Exchange,
    store: _Store,
    err: FrugalError,
) -> None:
    """Headers are gone: the failure becomes the stream's last event, never a hang."""
    upstream.finish(ok=False, aborted=isinstance(err, _NOT_THE_REPLICAS_FAULT))
    exchange.status, exchange.error = err.status, err.reason
    await _write_quietly(response, err.to_sse())
    if store.flight is not None:
        store.flight.fail(_leader_failed(err))


# A choice's finish_reason with a value (vLLM's intermediate chunks carry ``null``).
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
# A delta's non-empty text (content, reasoning_content, a completion's text, tool arguments):
# each is at least one generated token.
_DELTA_TEXT = re.compile(rb'(?:content|text|arguments)"\s*:\s*"(?!")')


class _StreamRelay:
    """Passes SSE events on as they come, holding back only the usage chunk the client did not
    ask for, and closes a stream the engine ended without ``[DONE]`` after a finished answer
    (``complete``: false when it ended before either, which the caller reports as a failure)."""

    __slots__ = (
        "choices",
        "done",
        "finished",
        "finished_choices",
        "include_usage",
        "parser",
        "rename",
        "sink",
        "tokens_seen",
        "usage",
    )

    def __init__(
        self,
        *,
        include_usage: bool,
        sink: Callable[[bytes], None] | None,
        choices: int = 1,
        rename: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.parser = SSEParser()
        self.rename = rename  # (served, public) model fields: see _public_model
        self.include_usage = include_usage
        self.sink = sink
        self.usage: tuple[int, int] | None = None
        self.tokens_seen = 0  # a lower bound on the tokens relayed, until the usage chunk says
        self.done = False
        # The answer has `choices` choices (n, times the prompts of a completion); it is finished
        # when each has given a finish_reason, not at the first one.
        self.choices = choices
        self.finished_choices: set[int] = set()
        self.finished = False  # every choice gave a finish_reason

    @property
    def complete(self) -> bool:
        """Whether the engine ended its answer: ``[DONE]``, or a finish_reason before EOF."""
        return self.done or self.finished

    def feed(self, chunk: bytes) -> bytes:
        return self._relay(self.parser.feed(chunk))

    def _relay(self, payloads: list[bytes]) -> bytes:
        out = []
        for payload in payloads:
            if self.done:
                continue  # nothing follows [DONE]: an engine's stray event is dropped
            if payload == DONE_PAYLOAD:
                self.done = True
                out.append(frame(payload))
                continue
            if self.rename is not None:
                payload = payload.replace(*self.rename, 1)
            if self.sink is not None:
                self.sink(payload)
            if self.usage is None:
                self.tokens_seen += len(_DELTA_TEXT.findall(payload))
            if not self.finished and b'"finish_reason"' in payload:
                self._note_finish(payload)
            if b'"usage"' in payload and self._take_usage(payload):
                continue
            out.append(frame(payload))
        return b"".join(out)

    def _note_finish(self, payload: bytes) -> None:
        if _FINISHED.search(payload) is None:
            return
        if self.choices == 1:
            self.finished = True  # one choice: no need to read the event
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        choices = event.get("choices") if isinstance(event, dict) else None
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                self.finished_choices.add(choice.get("index", position))
        self.finished = len(self.finished_choices) >= self.choices

    def _take_usage(self, payload: bytes) -> bool:
        """Record usage; True when the event is the usage-only chunk to hold back."""
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        usage = event.get("usage") if isinstance(event, dict) else None
        if not isinstance(usage, dict):
            return False
        try:
            self.usage = (
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
            )
        except (TypeError, ValueError):
            return False  # counts that are not numbers: relayed as they came, not counted
        return not self.include_usage and not event.get("choices")

    def close(self) -> bytes:
        # A last event the engine did not close with a blank line is still an event: it goes
        # through the same hold-back, sink and [DONE] bookkeeping as the others.
        rest = self._relay(self.parser.flush())
        if not self.done and self.finished:
            rest += frame(DONE_PAYLOAD)  # a finished answer whose [DONE] the engine left out
        return rest


def openai_error_body(body: bytes, status: int) -> bytes:
    """An engine's error as OpenAI's ``{"error": {...}}`` (older vLLM sends a flat object)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    nested = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(nested, dict):
        code = nested.get("code")
        if code is None or isinstance(code, str):
            return body
        # vLLM's nested errors carry the HTTP status as an integer code; OpenAI's is a string
        return orjson.dumps({"error": {**nested, "code": str(code)}})
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


def _count_usage(exchange: Exchange, body: bytes) -> None:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    _take_usage(exchange, parsed)


def _take_usage(exchange: Exchange, parsed: object) -> None:
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if isinstance(usage, dict):
        exchange.tokens_in = int(usage.get("prompt_tokens") or 0)
        exchange.tokens_out = int(usage.get("completion_tokens") or 0)


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    # The client may be gone too; then there is nobody left to tell.
    with contextlib.suppress(*_CLIENT_GONE):
        await response.write(data)


async def _write_eof_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(*_CLIENT_GONE):
        await response.write_eof()


# -- the end ----------------------------------------------------------------------------------


# A model name no engine serves comes from the client as it is: one request must not make an
# access line, or a 404's message, as long as its body (log shippers split or drop long lines).
MAX_LOGGED_MODEL = 128


def _loggable_model(model: str) -> str:
    if len(model) <= MAX_LOGGED_MODEL:
        return model
    return f"{model[:MAX_LOGGED_MODEL]}... ({len(model)} characters)"


def _finish(exchange: Exchange, services: Services) -> None:
    if exchange.counted_in_flight:
        services.metrics.in_flight(tier=exchange.tier, delta=-1)
    latency = exchange.latency_s
    engine = exchange.engine
    router = services.router
    if (
        exchange.conversation is not None
        and exchange.routed is not None
        and len(router.weak_to_strong) > 1  # with one engine there is nothing to stick to
    ):
        # Its next turn cannot arrive before the client has this answer: remembering it now,
        # off the latency path, is in time for stickiness.
        key = sticky_key(exchange.tier, exchange.tenant, conversation_prefix(exchange.conversation))
        router.remember(key, exchange.routed.name, exchange.route_score)
    ok = exchange.status < 400
    if ok and engine is not None and exchange.upstream_s > 0:
        services.router.observe_service(engine.name, exchange.upstream_s)
    from_cache = exchange.cache.startswith("hit")
    routed_usd = (
        engine.settings.cost.usd(exchange.tokens_in, exchange.tokens_out) if engine else 0.0
    )
    baseline = exchange.baseline or engine
    baseline_usd = (
        baseline.settings.cost.usd(exchange.tokens_in, exchange.tokens_out)
        if baseline is not None and baseline is not engine
        else routed_usd
    )
    money = split_savings(
        baseline_usd=max(baseline_usd, routed_usd),
        routed_usd=routed_usd,
        served_from_cache=from_cache,
        ok=ok,
    )
    if money.cost_usd:
        services.router.budget.observe(exchange.tier, money.cost_usd, time.monotonic())
    queued = exchange.slot.waited_s if exchange.slot is not None else 0.0
    overhead = (
        max(0.0, latency - exchange.upstream_s - exchange.shared_wait_s - queued)
        if engine is not None
        else None
    )
    services.metrics.request_done(
        tier=exchange.tier,
        model=exchange.model if engine is not None else "",
        engine=engine.name if engine is not None else "",
        status=exchange.status,
        cache=exchange.cache,
        latency_s=latency,
        ttft_s=exchange.ttft_s,
        overhead_s=overhead,
        tokens_in=exchange.tokens_in,
        tokens_out=exchange.tokens_out,
        cost_usd=money.cost_usd,
        saved_cache_usd=money.saved_cache_usd,
        saved_routing_usd=money.saved_routing_usd,
        stream=exchange.stream,
    )
    version = exchange.version or (engine.version if engine is not None else None)
    if engine is not None and version is not None:
        services.rollouts.record(
            engine=engine.name,
            version=version,
            from_cache=from_cache,
            status=exchange.status,
            upstream_status=exchange.upstream_status,
            latency_s=latency,
            tokens_out=exchange.tokens_out,
            cost_usd=money.cost_usd,
            instead_of=exchange.instead_of,
        )
    if services.access_log is not None:
        services.access_log.write(
            dict(
                request_id=exchange.request_id,
                endpoint=exchange.kind,
                tier=exchange.tier,
                tenant=exchange.tenant,  # the key's owner: whose request this was
                model=_loggable_model(exchange.model),
                engine=engine.name if engine else None,
                model_version=version,
                # the version the canary split chose for it, with no replica up
                instead_of_version=exchange.instead_of,
                cache=exchange.cache,
                # what a hit was: how close (a wrong semantic answer is traced by this), and
                # whether it was another request's answer shared while in flight
                cache_similarity=exchange.cache_similarity,
                coalesced=exchange.coalesced,
                route=exchange.routed.name if exchange.routed else None,
                route_reason=exchange.route_reason,
                route_score=exchange.route_score,
                embedding_shed=exchange.embedding_shed,
                status=exchange.status,
                stream=exchange.stream,
                tokens_in=exchange.tokens_in,
                tokens_out=exchange.tokens_out,
                latency_ms=round(latency * 1000, 3),
                # A slow answer's line says where its time went: first token, the proxy itself.
                ttft_ms=None if exchange.ttft_s is None else round(exchange.ttft_s * 1000, 3),
                overhead_ms=None if overhead is None else round(overhead * 1000, 3),
                cost_usd=money.cost_usd,
                saved_usd=money.saved_cache_usd + money.saved_routing_usd,
                error=exchange.error,
            )
        )
