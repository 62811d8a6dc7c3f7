"""``canonical``'s exact-type fast paths give what the general rules give, for any JSON value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.keys import canonical, canonical_json


def reference(value: Any) -> Any:
    """The rules alone, in their plain order (no fast paths)."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
            return int(value)
        return value
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


def test_integral_floats_and_big_ints() -> None:
    assert orjson.dumps(canonical({"t": 1.0, "n": [2**70, True, None]})) == (
        b'{"t":1,"n":[{"$bigint":"1180591620717411303424"},true,null]}'
    )
