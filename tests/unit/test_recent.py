"""The bounded most-recently-used map against a plain list model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.recent import Recent

operations = st.lists(
    st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 6), st.integers()), max_size=60
)


@given(capacity=st.integers(1, 4), ops=operations)
def test_recent_keeps_the_most_recently_used(
    capacity: int, ops: list[tuple[str, int, int]]
) -> None:
    recent: Recent[int, int] = Recent(capacity)
    model: list[tuple[int, int]] = []  # least recent first
    for op, key, value in ops:
        held = dict(model)
        if op == "get":
            assert recent.get(key) == held.get(key)
            if key in held:
                model.remove((key, held[key]))
                model.append((key, held[key]))
        else:
            recent.put(key, value)
            model = [(k, v) for k, v in model if k != key] + [(key, value)]
            model = model[-capacity:]
        assert len(recent) == len(model)


def test_capacity_must_hold_something() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Recent[str, str](0)
