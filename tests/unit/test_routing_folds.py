"""Honest cross-validation splits of the routing dev data: near-duplicates stay in one fold."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scripts.routing_data import near_duplicate_groups
from scripts.train_router import grouped_folds


def unit(vectors: list[list[float]]) -> np.ndarray:
    array = np.array(vectors, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_near_duplicates_and_both_turns_of_a_question_share_a_group() -> None:
    embeddings = unit([[1, 0, 0], [1, 0.05, 0], [0, 1, 0], [0, 0.6, 1], [0, 0, 1], [1, 1, 1]])
    prompts = [
        "Q1 A. x B. y",
        "Q1' A. x B. y",
        "Write a poem",
        "Write a poem [TURN2] Now shorter",
        "something else",
        "unrelated",
    ]
    groups = near_duplicate_groups(embeddings, prompts)
    assert groups[0] == groups[1]  # cosine 0.9988
    assert groups[2] == groups[3]  # turn 2 of the same question, although its embedding differs
    assert len({groups[0], groups[2], groups[4], groups[5]}) == 4


def test_near_duplicates_are_joined_transitively() -> None:
    embeddings = unit([[1, 0], [1, 0.3], [1, 0.62]])  # 0~1 and 1~2 above 0.95, 0~2 below
    groups = near_duplicate_groups(embeddings, ["a", "b", "c"])
    assert groups[0] == groups[1] == groups[2]


@settings(max_examples=50)
@given(st.lists(st.integers(0, 15), min_size=10, max_size=120), st.integers(0, 1000))
def test_a_group_never_spans_two_folds(group_list: list[int], seed: int) -> None:
    groups = np.array(group_list, dtype=np.int64)
    strata = np.where(groups % 3 == 0, "a", "b")  # one stratum per group
    fold_of = grouped_folds(strata, groups, 5, seed)
    for g in np.unique(groups):
        assert np.unique(fold_of[groups == g]).size == 1
    assert set(fold_of.tolist()) <= set(range(5))
