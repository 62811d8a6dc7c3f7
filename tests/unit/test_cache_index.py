"""Semantic index: exact flat search, promotion to HNSW, removal, partition isolation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.index import SemanticIndex


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_flat_search_matches_brute_force() -> None:
    vectors = unit_vectors(50, 16, 0)
    index = SemanticIndex(16)
    for label, v in enumerate(vectors):
        index.add("p", label, v)
    query = unit_vectors(1, 16, 1)[0]
    expected = np.argsort(-(vectors @ query))[:5]
    found = index.search("p", query, 5)
    assert [label for label, _ in found] == expected.tolist()
    np.testing.assert_allclose([s for _, s in found], (vectors @ query)[expected], rtol=1e-5)


def test_rescaled_vectors_are_normalised() -> None:
    index = SemanticIndex(4)
    index.add("p", 1, np.array([3.0, 0, 0, 0]))
    ((label, score),) = index.search("p", np.array([0.5, 0, 0, 0]), 3)
    assert label == 1 and abs(score - 1.0) < 1e-6


async def test_promotion_to_hnsw_keeps_every_entry_findable() -> None:
    vectors = unit_vectors(300, 32, 2)
    index = SemanticIndex(32, flat_limit=64)
    for label, v in enumerate(vectors[:200]):
        index.add("p", label, v)
    # entries written while the graph is being built must survive the swap
    for label, v in enumerate(vectors[200:], start=200):
        index.add("p", label, v)
    index.remove("p", 3)
    await index.wait_idle()
    assert len(index) == 299
    for label in (0, 150, 250, 299):
        assert index.search("p", vectors[label], 1)[0][0] == label
    assert all(label != 3 for label, _ in index.search("p", vectors[3], 10))


def test_bulk_add_builds_a_graph_directly() -> None:
    vectors = unit_vectors(500, 32, 3)
    index = SemanticIndex(32, flat_limit=100)
    index.add_many("p", list(range(500)), vectors)
    assert len(index) == 500
    hits = [index.search("p", vectors[i], 1)[0][0] == i for i in range(0, 500, 10)]
    assert sum(hits) >= 48  # HNSW is approximate; self-queries nearly always come back first


def test_overwrite_and_remove() -> None:
    index = SemanticIndex(4)
    index.add("p", 7, np.array([1.0, 0, 0, 0]))
    index.add("p", 7, np.array([0, 1.0, 0, 0]))
    assert len(index) == 1
    assert index.search("p", np.array([0, 1.0, 0, 0]), 1)[0][0] == 7
    assert index.remove("p", 7)
    assert not index.remove("p", 7)
    assert index.search("p", np.array([0, 1.0, 0, 0]), 1) == []
    assert index.partition_sizes() == {}


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 40)), min_size=1, max_size=60),
    st.sampled_from("abcd"),
    st.integers(0, 1000),
)
def test_search_never_leaves_its_partition(
    adds: list[tuple[str, int]], wanted: str, seed: int
) -> None:
    index = SemanticIndex(8, flat_limit=16)
    owner: dict[int, str] = {}
    vectors = unit_vectors(len(adds), 8, seed)
    for i, ((partition, _), v) in enumerate(zip(adds, vectors, strict=True)):
        label = i  # unique labels, so ownership is unambiguous
        index.add(partition, label, v)
        owner[label] = partition
    found = index.search(wanted, unit_vectors(1, 8, seed + 1)[0], 10)
    assert all(owner[label] == wanted for label, _ in found)
    assert len(found) == min(10, sum(1 for p in owner.values() if p == wanted))


def test_snapshot_round_trip(tmp_path: Path) -> None:
    vectors = unit_vectors(300, 16, 4)
    index = SemanticIndex(16, flat_limit=50)
    index.add_many("big", list(range(200)), vectors[:200])  # a graph
    for label in range(200, 210):
        index.add("small", label, vectors[label])  # a flat matrix
    index.remove("big", 5)
    index.save(tmp_path / "snap")
    index.save(tmp_path / "snap")  # replacing an existing snapshot works
    loaded = SemanticIndex.load(tmp_path / "snap")
    assert loaded.partition_sizes() == index.partition_sizes()
    assert loaded.labels("small") == set(range(200, 210))
    assert loaded.labels("big") == set(range(200)) - {5}
    for label in (0, 100, 205):
        partition = "big" if label < 200 else "small"
        assert loaded.search(partition, vectors[label], 1)[0][0] == label
    assert loaded.hnsw_params.expansion_search == index.hnsw_params.expansion_search


def test_a_broken_snapshot_is_refused(tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError):
        SemanticIndex.load(tmp_path / "snap")


@pytest.mark.parametrize("file", ["flat.npz", "hnsw-0.usearch"])
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_a_truncated_snapshot_file_is_refused_as_unusable(
    tmp_path: Path, file: str, keep: float
) -> None:
    # (a crash or a full disk while saving; callers handle ValueError by rebuilding)
    vectors = unit_vectors(120, 16, 5)
    index = SemanticIndex(16, flat_limit=50)
    index.add_many("big", list(range(100)), vectors[:100])
    for label in range(100, 110):
        index.add("small", label, vectors[label])
    index.save(tmp_path / "snap")
    path = tmp_path / "snap" / file
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="unusable index snapshot"):
        SemanticIndex.load(tmp_path / "snap")
