"""The runtime, immutable set of tier policies: authenticate a key, authorize a model, cap tokens.

Build it with :func:`proxy.policy.loader.load_policy_dir`; a reload builds a new one and swaps it
in whole (see :class:`proxy.policy.store.PolicyStore`), so a request sees one consistent set.

Per request::

    principal = policies.authenticate(bearer_token(request.headers.get("Authorization")))
    model = resolve_model(principal.policy, body.get("model"))
    max_tokens = cap_max_tokens(principal.policy, body.get("max_tokens"))
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from proxy.policy.errors import MaxTokensTooLarge, MissingKey, ModelNotAllowed, UnknownKey
from proxy.policy.keys import hash_key
from proxy.policy.schema import TierPolicy

ANONYMOUS_TENANT = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: the tier whose policy applies and the tenant (the key's owner)."""

    tier: str
    tenant: str
    policy: TierPolicy
    key_hash: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.key_hash is None


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in the policy files, located as precisely as the YAML allows."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class _KeyOwner:
    key_hash: str
    tier: str
    tenant: str


@dataclass(frozen=True)
class PolicySet:
    """Tier name -> policy, plus the key index. Immutable; build with :meth:`build`."""

    tiers: Mapping[str, TierPolicy]
    sources: Mapping[str, Path] = field(default_factory=dict)
    _owners: Mapping[str, _KeyOwner] = field(default_factory=dict, repr=False)
    _open_tier: str | None = None

    @classmethod
    def build(cls, policies: Mapping[str, TierPolicy], sources: Mapping[str, Path]) -> PolicySet:
        """Index already cross-checked policies (the loader checks; this only builds)."""
        owners = {
            entry.hash: _KeyOwner(entry.hash, tier, entry.tenant_id)
            for tier, policy in policies.items()
            for entry in policy.keys
        }
        return cls(
            tiers=MappingProxyType(dict(policies)),
            sources=MappingProxyType(dict(sources)),
            _owners=MappingProxyType(owners),
            _open_tier=choose_open_tier(policies),
        )

    @property
    def is_open(self) -> bool:
        """No tier defines a key: every request is served anonymously with the open tier."""
        return not self._owners

    @property
    def open_tier(self) -> str | None:
        return self._open_tier

    @property
    def key_count(self) -> int:
        return len(self._owners)

    def anonymous(self) -> Principal:
        if self._open_tier is None:
            raise MissingKey("no tier policy is loaded", param=None)
        return Principal(self._open_tier, ANONYMOUS_TENANT, self.tiers[self._open_tier])

    def authenticate(self, raw_key: str | None) -> Principal:
        """The principal for a presented key; raises MissingKey / UnknownKey (401)."""
        if self.is_open:
            return self.anonymous()
        if not raw_key:
            raise MissingKey(
                "missing API key: send it as 'Authorization: Bearer <key>'", param=None
            )
        digest = hash_key(raw_key)
        # The lookup is keyed by SHA-256 of the secret, which an attacker cannot steer towards a
        # stored hash byte by byte; the final compare is constant time anyway.
        owner = self._owners.get(digest)
        if owner is None or not hmac.compare_digest(owner.key_hash, digest):
            raise UnknownKey("invalid API key", param=None)
        return Principal(owner.tier, owner.tenant, self.tiers[owner.tier], owner.key_hash)


def choose_open_tier(policies: Mapping[str, TierPolicy]) -> str | None:
    """The tier for keyless requests: the one marked open_access, else the least privileged."""
    marked = [t for t, p in policies.items() if p.open_access]
    if marked:
        return sorted(marked)[0]
    if not policies:
        return None
    # Least privilege by default: the lowest priority, ties broken by name for determinism.
    return min(policies, key=lambda t: (policies[t].priority, t))


def resolve_model(policy: TierPolicy, requested: object) -> str:
    """The model asked for, if the tier may use it; else 403. (A request without a model is a
    400 before this: the OpenAI API requires one.)"""
    if not isinstance(requested, str) or requested not in policy.models:
        raise ModelNotAllowed(
            f"the {policy.tier!r} tier may not use model {requested!r}; "
            f"allowed: {', '.join(policy.models)}",
            param="model",
        )
    return requested


@dataclass(frozen=True, slots=True)
class MaxTokens:
    value: int
    clamped: bool  # the caller asked for more; say so in a response header
    defaulted: bool  # the caller did not ask; send value upstream so the worst case is bounded


def cap_max_tokens(
    policy: TierPolicy, requested: int | None, field: str = "max_tokens"
) -> MaxTokens:
    """Apply the tier's max_tokens cap: clamp or refuse (400, naming ``field``: the name the
    request gave it), as the policy says."""
    cap = policy.limits.max_tokens
    if requested is None:
        return MaxTokens(cap, clamped=False, defaulted=True)
    if requested <= cap:
        return MaxTokens(requested, clamped=False, defaulted=False)
    if policy.limits.on_max_tokens == "reject":
        raise MaxTokensTooLarge(
            f"{field} {requested} is above the {policy.tier!r} tier's limit of {cap}",
            param=field,
        )
    return MaxTokens(cap, clamped=True, defaulted=False)
