"""How one request's money splits into cost, cache savings and routing savings (pure).

The baseline is what the request would have cost with no cache and no routing: every request on
the strongest (most expensive) engine. Then, for a request whose answer came from the routed
engine or from that engine's cache entry:

    baseline = cost + saved_by_cache + saved_by_routing

* routing saves ``baseline - routed`` (the routed engine's price for these tokens is lower);
* a cache hit saves the rest, ``routed``, and costs nothing.

    s = split_savings(baseline_usd=0.004, routed_usd=0.0005, served_from_cache=False, ok=True)
    metrics.request_done(..., cost_usd=s.cost_usd, saved_cache_usd=s.saved_cache_usd,
                         saved_routing_usd=s.saved_routing_usd, ...)
"""

from __future__ import annotations

from typing import NamedTuple


class Savings(NamedTuple):
    cost_usd: float
    saved_cache_usd: float
    saved_routing_usd: float


def split_savings(
    *, baseline_usd: float, routed_usd: float, served_from_cache: bool, ok: bool = True
) -> Savings:
    """Split a request's baseline price into what it cost and what cache and routing saved.

    ``baseline_usd``: the strongest engine's price for the request's tokens;
    ``routed_usd``: the routed engine's price for the same tokens;
    ``ok``: False for failed requests, which save nothing (an engine error still costs
    ``routed_usd`` if the engine billed tokens; pass 0 tokens' price otherwise).
    A routed engine dearer than the baseline (a misconfigured price) counts as no routing saving.
    """
    if baseline_usd < 0 or routed_usd < 0:
        raise ValueError("prices are never negative")
    if not ok:
        return Savings(0.0 if served_from_cache else routed_usd, 0.0, 0.0)
    saved_routing = max(0.0, baseline_usd - routed_usd)
    if served_from_cache:
        return Savings(0.0, routed_usd, saved_routing)
    return Savings(routed_usd, 0.0, saved_routing)
