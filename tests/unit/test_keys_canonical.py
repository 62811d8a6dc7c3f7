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


class _Tag(str):
    """A str subclass (orjson would write it as a str): the fast path must leave it to
    canonical()."""


bodies = st.dictionaries(
    st.sampled_from(["messages", "temperature", "max_tokens", "tools", "user", "echo", "x"]),
    values,
    max_size=5,
)
chat_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant"]),
            "content": st.text(max_size=6)
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}))
            | st.tuples(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})),
        }
    ),
    max_size=3,
).flatmap(lambda m: st.sampled_from([m, tuple(m)]))
odd = st.sampled_from([_Tag("a"), {1: "x"}, {"k": {2: 3}}, 2**70, float("nan"), (1, 2.0)])


def reference_material(endpoint: Any, body: Mapping[str, Any]) -> Any:
    """key_material as it was before its fast path: every field through canonical()."""
    from proxy.cache.keys import KeyMaterial, keyed_fields, split_query

    fields = keyed_fields(body)
    split = split_query(endpoint, fields)
    if split is None:
        return KeyMaterial(endpoint, canonical_json(fields), None, None)
    blanked, query = split
    return KeyMaterial(endpoint, canonical_json(fields), canonical_json(blanked), query)


@settings(max_examples=400, deadline=None)
@given(bodies, chat_messages, st.none() | odd, st.sampled_from(["chat", "completions"]))
def test_key_material_fast_path_gives_the_canonical_bytes(
    body: dict[str, Any], messages: Any, extra: Any, kind: str
) -> None:
    from proxy.cache.keys import Endpoint, key_material

    endpoint = Endpoint(kind)
    body = {**body, "messages": messages, "prompt": "p" if kind == "completions" else 3}
    if extra is not None:
        body["extra"] = extra
    assert key_material(endpoint, body) == reference_material(endpoint, body)
    exact_only = key_material(endpoint, body, semantic=False)
    assert exact_only.fields_json == reference_material(endpoint, body).fields_json
