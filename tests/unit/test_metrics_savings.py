from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.observability.savings import Savings, split_savings

prices = st.floats(0, 10, allow_nan=False)


@given(prices, prices, st.booleans())
def test_parts_add_up_to_the_baseline_and_are_never_negative(
    baseline: float, routed: float, from_cache: bool
) -> None:
    s = split_savings(baseline_usd=baseline, routed_usd=routed, served_from_cache=from_cache)
    assert min(s) >= 0
    # When the routed engine is no dearer than the baseline, nothing is lost or invented.
    if routed <= baseline:
        assert sum(s) == pytest.approx(baseline)
    if from_cache:
        assert s.cost_usd == 0
    else:
        assert s.saved_cache_usd == 0 and s.cost_usd == routed


def test_examples() -> None:
    # Routed to the small engine, served by it.
    assert split_savings(baseline_usd=0.004, routed_usd=0.001, served_from_cache=False) == (
        Savings(0.001, 0.0, 0.003)
    )
    # The same request answered from the small engine's cache entry.
    assert split_savings(baseline_usd=0.004, routed_usd=0.001, served_from_cache=True) == (
        Savings(0.0, 0.001, 0.003)
    )
    # Routed to the strongest engine: no routing saving.
    assert split_savings(baseline_usd=0.004, routed_usd=0.004, served_from_cache=False) == (
        Savings(0.004, 0.0, 0.0)
    )
    # A failed request saves nothing but still pays what the engine billed.
    assert split_savings(
        baseline_usd=0.004, routed_usd=0.001, served_from_cache=False, ok=False
    ) == Savings(0.001, 0.0, 0.0)


def test_negative_prices_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        split_savings(baseline_usd=-1, routed_usd=0, served_from_cache=False)
