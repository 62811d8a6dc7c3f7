"""ShallowViews: the router finds the shallow view of the pass that made its embedding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routing.views import ShallowViews


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def test_a_view_is_found_by_its_embedding() -> None:
    views = ShallowViews()
    base, shallow = rows(0, 3), rows(1, 3)
    views.remember(base, shallow)
    for i in range(3):
        found = views.get(base[i].copy())  # another array with the same values
        assert found is not None
        np.testing.assert_array_equal(found, shallow[i])
    assert views.get(rows(2, 1)[0]) is None


def test_a_view_read_again_stays_longest() -> None:
    views = ShallowViews(capacity=2)
    base, shallow = rows(0, 3), rows(1, 3)
    views.remember(base[:2], shallow[:2])
    assert views.get(base[0]) is not None  # row 0 is now the most recent
    views.remember(base[2:], shallow[2:])
    assert views.get(base[0]) is not None
    assert views.get(base[1]) is None


def test_an_encoder_without_views_remembers_nothing() -> None:
    views = ShallowViews()
    views.remember(rows(0, 2), None)
    assert len(views) == 0


def test_mismatched_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="2 embeddings"):
        ShallowViews().remember(rows(0, 2), rows(1, 3))
    with pytest.raises(ValueError, match="capacity"):
        ShallowViews(capacity=0)


@given(capacity=st.integers(1, 6), count=st.integers(0, 12))
def test_the_oldest_views_leave_first(capacity: int, count: int) -> None:
    views = ShallowViews(capacity=capacity)
    base, shallow = rows(0, count), rows(1, count)
    for i in range(count):
        views.remember(base[i : i + 1], shallow[i : i + 1])
    assert len(views) == min(capacity, count)
    for i in range(count):
        kept = i >= count - capacity
        assert (views.get(base[i]) is not None) == kept


def test_the_router_scores_with_the_view_remembered_for_its_embedding() -> None:
    from proxy.routing.classifier import DifficultyClassifier
    from proxy.routing.features import EMBEDDING_DIM, RoutingFeatures
    from proxy.routing.router import Router

    seen: list[RoutingFeatures] = []

    class Recording(DifficultyClassifier):
        def score(self, features: RoutingFeatures) -> float:
            seen.append(features)
            return 0.5

    zeros = np.zeros(EMBEDDING_DIM, dtype=np.float32)
    classifier = Recording(zeros, zeros + 1, zeros, 0.0, {})
    router = Router(engines=[], classifier=classifier, count_tokens=len)
    embedding, view = rows(3, 2).repeat(48, axis=1)
    router.views.remember(embedding[None, :], view[None, :])
    messages = [{"role": "user", "content": "hello"}]
    router.score(messages, embedding)
    router.score(messages, view)  # an embedding no pass remembered
    assert seen[0].shallow is not None
    np.testing.assert_array_equal(seen[0].shallow, view)
    assert seen[1].shallow is None
