"""The policy of a proxy run without policy files: one open tier, no limits, config defaults.

It is what `frugal serve` uses when the config sets ``policies: null`` (or names a folder that
does not exist): every request is served anonymously, every engine and ``auto`` are allowed, and
caching and routing follow the config's ``cache`` and ``routing`` sections.
"""

from __future__ import annotations

from proxy.policy.policyset import PolicySet
from proxy.policy.schema import Cache, Latency, Limits, Routing, TierPolicy

OPEN_TIER = "open"
# No real cap: the engines' own context limit is the only bound when no tier sets one.
_UNCAPPED_MAX_TOKENS = 1 << 20


def open_policies(
    *,
    models: list[str],
    scope: str,
    ttl_seconds: float,
    semantic: bool,
    cache_sampled: bool,
    threshold: float,
) -> PolicySet:
    policy = TierPolicy(
        tier=OPEN_TIER,
        description="built-in: no policy files",
        models=models,
        limits=Limits(max_tokens=_UNCAPPED_MAX_TOKENS),
        routing=Routing(score_threshold=threshold),
        latency=Latency(ttft_p95_ms=60_000),
        cache=Cache(
            scope=scope,
            ttl_seconds=max(1, int(ttl_seconds)),
            semantic=semantic,
            allow_no_cache=True,
            cache_sampled=cache_sampled,
        ),
        priority=0,
        open_access=True,
    )
    return PolicySet.build({OPEN_TIER: policy}, {})


class StaticPolicies:
    """A policy source that never changes (the same ``current`` interface as PolicyStore)."""

    def __init__(self, policies: PolicySet) -> None:
        self._policies = policies

    @property
    def current(self) -> PolicySet:
        return self._policies

    def reload(self) -> list[str]:
        return []
