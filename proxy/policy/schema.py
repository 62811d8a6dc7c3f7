"""The tier policy file: one YAML file per tier, parsed strictly (unknown keys are rejected).

Example (``policies/free.yaml``)::

    tier: free
    keys:
      - "sha256:<hex>"                             # tenant defaults to "key-<first 12 hex>"
      - {hash: "sha256:<hex>", tenant: acme}       # several keys may share one tenant
    models: [auto, smollm2-135m]                   # the first is the default
    limits: {requests_per_minute: 60, tokens_per_minute: 20000, concurrent: 4, max_tokens: 512}
    budget: {usd_per_day: 1.00}
    routing: {strong_share: 0.10}
    latency: {ttft_p95_ms: 3000}
    cache: {scope: tenant, ttl_seconds: 86400, semantic: true, allow_no_cache: false,
            audit: {share: 0.02, target: 0.02}, tune: {enabled: true, min: 0.7, max: 0.99}}
    queue: {max_wait_ms: 2000}
    priority: 1

Limits (requests, tokens, concurrency) apply per tenant: a tier is a plan and every customer on it
gets the plan's limits. The budget is the tier's total daily spend; ``usd_per_day_per_tenant``
adds a per-customer ceiling inside it. ``None`` means unlimited everywhere.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.cache.keys import Scope
from proxy.cache.modes import CacheMode

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_KEY_HASH_RE = re.compile(KEY_HASH_PATTERN)

KeyHash = Annotated[str, Field(pattern=KEY_HASH_PATTERN)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# Model names as engines serve them: also Hugging Face ids ("Qwen/Qwen2.5-0.5B-Instruct", vLLM's
# default served name) and tags ("llama3:8b").
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$"
ModelName = Annotated[str, Field(pattern=MODEL_PATTERN)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyEntry(StrictModel):
    """One API key, stored hashed, and the tenant (the key's owner) it belongs to."""

    hash: KeyHash
    tenant: Name | None = Field(
        default=None, description='default: "key-" + first 12 hex of the hash'
    )
    note: str | None = Field(default=None, max_length=200, description="who/why, for humans")

    @property
    def tenant_id(self) -> str:
        return self.tenant if self.tenant is not None else default_tenant(self.hash)


def default_tenant(key_hash: str) -> str:
    return "key-" + key_hash.removeprefix("sha256:")[:12]


class Limits(StrictModel):
    requests_per_minute: int | None = Field(default=None, ge=1, description="per tenant")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="per tenant; prompt estimate at admission + completion after"
    )
    concurrent: int | None = Field(default=None, ge=1, description="requests in flight per tenant")
    max_tokens: int = Field(ge=1, description="cap on a request's max_tokens; also the default")
    on_max_tokens: Literal["clamp", "reject"] = Field(
        default="clamp", description="clamp: lower it and say so in a header; reject: 400"
    )


class Budget(StrictModel):
    usd_per_day: float | None = Field(default=None, ge=0, description="the tier's total, UTC day")
    usd_per_day_per_tenant: float | None = Field(
        default=None, ge=0, description="each tenant's share"
    )

    @model_validator(mode="after")
    def _tenant_within_tier(self) -> Budget:
        if (
            self.usd_per_day is not None
            and self.usd_per_day_per_tenant is not None
            and self.usd_per_day_per_tenant > self.usd_per_day
        ):
            raise ValueError("usd_per_day_per_tenant cannot exceed usd_per_day")
        return self


class FollowBudget(StrictModel):
    """Lower the strong share while the tier's spend rate would overrun its daily budget."""

    enabled: bool = Field(default=False, description="needs strong_share and budget.usd_per_day")
    min_share: float = Field(default=0.0, ge=0, le=1, description="never below this share")
    step: float = Field(default=0.02, gt=0, le=1, description="one move of the share")
    window_s: float = Field(default=600.0, gt=0, description="spend rate measured over this")
    headroom: float = Field(
        default=0.8, gt=0, le=1, description="raise again when the projection is under this share"
    )


class Routing(StrictModel):
    """How much of this tier's auto traffic may go to the strong engine: a share or a score."""

    strong_share: float | None = Field(
        default=None, ge=0, le=1, description="target share, calibrated"
    )
    score_threshold: float | None = Field(
        default=None, ge=0, le=1, description="score >= it goes strong"
    )
    follow_budget: FollowBudget = Field(default_factory=FollowBudget)

    @model_validator(mode="after")
    def _exactly_one(self) -> Routing:
        if (self.strong_share is None) == (self.score_threshold is None):
            raise ValueError("set exactly one of strong_share or score_threshold")
        if self.follow_budget.enabled and self.strong_share is None:
            raise ValueError("follow_budget moves strong_share: set strong_share")
        if self.strong_share is not None and self.follow_budget.min_share > self.strong_share:
            raise ValueError("follow_budget.min_share cannot exceed strong_share")
        return self


class Latency(StrictModel):
    ttft_p95_ms: int = Field(gt=0, description="target time to first token, 95th percentile")
    total_p95_ms: int | None = Field(default=None, gt=0, description="optional whole-answer target")


class CacheAudit(StrictModel):
    """Shadow checks of semantic hits: a share is asked of the engine again and compared."""

    share: float | None = Field(
        default=None, ge=0, le=1, description="share of semantic hits audited; default: config"
    )
    target: float = Field(
        default=0.02, gt=0, lt=1, description="acceptable disagreement (false-hit) rate"
    )


class CacheTune(StrictModel):
    """Bounds and rule of the automatic verifier cut-off (the semantic cache's effective threshold).

    ``rule: evidence`` (default) picks the lowest cut-off whose audited disagreement, among the
    audited candidates scored at or above it, is under ``audit.target`` with ``confidence``;
    counterfactual audits of misses refused only by the cut-off supply the evidence below the
    current value. ``rule: step`` moves one step at a time from the audits at the current value.
    See proxy/shadow/tuner.py.
    """

    enabled: bool = Field(default=False, description="move the cut-off from the audits")
    rule: Literal["evidence", "step"] = Field(
        default="evidence", description="choose from scored audits, or step up and down"
    )
    min: float = Field(default=0.5, ge=0, le=1, description="never looser than this")
    max: float = Field(default=0.99, ge=0, le=1, description="never stricter than this")
    min_audits: int = Field(
        default=30,
        ge=1,
        description="audits between two decisions (evidence: also the least above a cut-off)",
    )
    confidence: float = Field(
        default=0.9,
        gt=0.5,
        lt=1,
        description="evidence rule: one-sided confidence that a chosen cut-off is under target",
    )
    samples: int = Field(
        default=2000, ge=10, description="evidence rule: latest scored audits it chooses from"
    )
    counterfactual: bool = Field(
        default=True,
        description="evidence rule: audit misses refused only by the cut-off (no engine call)",
    )
    step: float = Field(
        default=0.02,
        gt=0,
        le=0.5,
        description="step rule: one move at cut-off 0.5; moves are made in logit space",
    )
    set_point: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="step rule: raise when the observed rate is above target x this",
    )
    relax_below: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="step rule: relax when the rate's upper bound is under target x this",
    )

    @model_validator(mode="after")
    def _ordered(self) -> CacheTune:
        if self.min > self.max:
            raise ValueError("tune.min cannot exceed tune.max")
        return self


class Cache(StrictModel):
    mode: Literal["on", "off", "read_only", "write_only"] = "on"
    scope: Literal["global", "tier", "tenant", "user"] = Field(
        default="tenant",
        description="who shares answers: everyone, this tier, one tenant, or one end user",
    )
    ttl_seconds: int = Field(default=86400, ge=1)
    semantic: bool = Field(default=True, description="paraphrase hits, not only exact ones")
    allow_no_cache: bool = Field(
        default=False, description="may a client bypass the cache per request"
    )
    cache_sampled: bool = Field(
        default=False, description="cache answers sampled with temperature > 0"
    )
    similarity_threshold: float | None = Field(
        default=None, ge=-1, le=1, description="default: config"
    )
    verifier_cutoff: float | None = Field(default=None, ge=0, le=1, description="default: config")
    audit: CacheAudit = Field(default_factory=CacheAudit)
    tune: CacheTune = Field(default_factory=CacheTune)

    @property
    def reads(self) -> bool:
        return self.mode in ("on", "read_only")

    @property
    def writes(self) -> bool:
        return self.mode in ("on", "write_only")

    # The settings as the cache's own types, made once per policy (not per request).
    @cached_property
    def tier_mode(self) -> CacheMode:
        return CacheMode.from_flags(read=self.reads, write=self.writes)

    @cached_property
    def scope_kind(self) -> Scope:
        return Scope(self.scope)


class Queue(StrictModel):
    max_wait_ms: int = Field(default=2000, ge=0, description="past it a queued request gets 503")


class TierPolicy(StrictModel):
    tier: Name
    description: str | None = Field(default=None, max_length=500)
    keys: list[KeyEntry] = Field(default_factory=list, description="a hash string or an entry")
    models: list[ModelName] = Field(
        min_length=1, description="allowed models; the first is the default"
    )
    limits: Limits
    budget: Budget = Field(default_factory=Budget)
    routing: Routing
    latency: Latency
    cache: Cache = Field(default_factory=Cache)
    queue: Queue = Field(default_factory=Queue)
    priority: int = Field(ge=0, le=1000, description="higher is admitted first when saturated")
    open_access: bool = Field(
        default=False,
        description="serve keyless requests with this tier when no tier defines a key",
    )

    @model_validator(mode="after")
    def _budget_to_follow(self) -> TierPolicy:
        if self.routing.follow_budget.enabled and self.budget.usd_per_day is None:
            raise ValueError("routing.follow_budget needs budget.usd_per_day")
        return self

    @field_validator("keys", mode="before")
    @classmethod
    def _bare_hash_is_an_entry(cls, keys: object) -> object:
        # A bare "sha256:..." string is shorthand for {hash: ...}; one shape keeps the error
        # locations free of union tags, so they map back onto YAML lines.
        if isinstance(keys, list):
            return [{"hash": k} if isinstance(k, str) else k for k in keys]
        return keys

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[str]) -> list[str]:
        seen: set[str] = set()
        for model in models:
            if model in seen:
                raise ValueError(f"model {model!r} is listed twice")
            seen.add(model)
        return models


def is_key_hash(value: str) -> bool:
    return _KEY_HASH_RE.match(value) is not None
