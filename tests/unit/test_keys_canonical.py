"""``canonical``'s exact-type fast paths give what the general rules give, for any JSON value;
``canonical_field`` folds integral floats into ints at the top level only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.keys import canonical, canonical_field, canonical_json


def reference(value: Any) -> Any:
    """The rules alone, in their plain order (no fast paths)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return {"$bigint": str(value)}
    if isinstance(value, Mapping):
        return {str(k): reference(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [reference(v) for v in value]
    return value


leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_fast_paths_agree_with_the_rules(value: Any) -> None:
    assert canonical(value) == reference(value)
    assert canonical_json(canonical(value)) == canonical_json(reference(value))


def test_big_ints_and_nested_floats() -> None:
    assert orjson.dumps(canonical({"t": 1.0, "n": [2**70, True, None]})) == (
        b'{"t":1.0,"n":[{"$bigint":"1180591620717411303424"},true,null]}'
    )


@settings(max_examples=300, deadline=None)
@given(values)
def test_canonical_field_folds_only_a_top_level_integral_float(value: Any) -> None:
    folded = canonical_field(value)
    if (
        isinstance(value, float)
        and math.isfinite(value)
        and value.is_integer()
        and abs(value) <= 2**53
    ):
        assert folded == value and type(folded) is int
        return
    assert folded == reference(value)
