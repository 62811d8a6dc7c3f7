"""Per-partition nearest-neighbour index over cached questions' embeddings.

A partition is one semantic context key (engine version + cache partition + everything in the
request except the last user turn's text), so a search can only ever return entries whose answer
was produced under the same conditions. Most partitions are tiny (one conversation's history, a
rare system prompt); a few (single-turn questions under a common system prompt) are huge. So each
partition starts as a flat float32 matrix searched by one matrix-vector product (exact, and cheap
below a few thousand rows) and is promoted to an HNSW graph when it grows past ``flat_limit``.

HNSW library: usearch. It was already a dependency, ships wheels with no BLAS/OpenMP baggage,
stores vectors quantised (int8 by default: 1M x 384-d is ~0.4 GB of vectors instead of faiss's or
hnswlib's 1.5 GB of float32), picks SIMD kernels at run time, supports removal (invalidation) and
concurrent search, and answers a single query in well under a millisecond at 1M vectors
(``scripts/bench_index.py``). hnswlib is float32 only and barely maintained; faiss is a much
heavier dependency for the same HNSW.

Promotion builds the graph on a worker thread (a 4k-vector build takes ~0.5 s of CPU) while the
flat matrix keeps answering; writes that landed meanwhile are reconciled before the swap.
Vectors are L2-normalised on the way in; scores are cosine similarities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import orjson

if TYPE_CHECKING:
    from usearch.index import Index

log = logging.getLogger(__name__)

DEFAULT_FLAT_LIMIT: Final = 2048


@dataclass(frozen=True, slots=True)
class HnswParams:
    # i8: a quarter of float32's memory and the fastest build/search here; recall@1 matched
    # f16 in scripts/bench_index.py. Candidates are re-scored with the stored float16
    # embeddings by ResponseCache, so quantisation never moves a threshold decision.
    dtype: str = "i8"
    connectivity: int = 16
    expansion_add: int = 128
    # 256: recall@1 0.99 at 1M vectors (64 gave 0.87), still ~0.6 ms a search
    expansion_search: int = 256
    # usearch batch-add threads; the proxy host is shared, so keep it small.
    threads: int = 1


def _normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    unit: np.ndarray = v / np.maximum(norms, 1e-12)
    return unit


class _Flat:
    """Exact search over a growing matrix; rows swap-deleted on removal."""

    __slots__ = ("labels", "rows", "size", "vectors")

    def __init__(self, ndim: int) -> None:
        self.vectors = np.empty((8, ndim), dtype=np.float32)
        self.labels = np.empty(8, dtype=np.uint64)
        self.rows: dict[int, int] = {}
        self.size = 0

    def add(self, label: int, vector: np.ndarray) -> None:
        row = self.rows.get(label)
        if row is None:
            if self.size == len(self.labels):
                self.vectors = np.resize(self.vectors, (2 * self.size, self.vectors.shape[1]))
                self.labels = np.resize(self.labels, 2 * self.size)
            row = self.size
            self.size += 1
            self.rows[label] = row
            self.labels[row] = label
        self.vectors[row] = vector

    def remove(self, label: int) -> bool:
        row = self.rows.pop(label, None)
        if row is None:
            return False
        last = self.size - 1
        if row != last:
            moved = int(self.labels[last])
            self.vectors[row] = self.vectors[last]
            self.labels[row] = moved
            self.rows[moved] = row
        self.size = last
        return True

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self.size == 0:
            return []
        scores = self.vectors[: self.size] @ query
        k = min(k, self.size)
        top = np.argpartition(scores, -k)[-k:] if k < self.size else np.arange(self.size)
        top = top[np.argsort(-scores[top])]
        return [(int(self.labels[i]), float(scores[i])) for i in top]


def _usearch_index() -> type[Index]:
    """usearch's ``Index`` class, imported on first use, after libtorch where torch is installed.

    Why the order: with usearch's extension loaded first, TorchScript's compiler (the encoder's
    scripted layers, proxy/cache/scripted_layers.py) hangs inside libstdc++ (torch 2.13, usearch
    2.26.6, which links its own libstdc++ statically); with libtorch loaded first it compiles.
    """
    with contextlib.suppress(ImportError, OSError):  # (OSError: a torch that cannot load)
        import torch  # noqa: F401
    from usearch.index import Index

    return Index


class _Hnsw:
    __slots__ = ("index", "params")

    def __init__(self, ndim: int, params: HnswParams) -> None:
        self.params = params
        self.index = _usearch_index()(
            ndim=ndim,
            metric="cos",
            dtype=params.dtype,
            connectivity=params.connectivity,
            expansion_add=params.expansion_add,
            expansion_search=params.expansion_search,
        )

    @property
    def size(self) -> int:
        return len(self.index)

    def add_many(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        if len(labels):
            self.index.add(labels, vectors, threads=self.params.threads)

    def add(self, label: int, vector: np.ndarray) -> None:
        if label in self.index:
            self.index.remove(label)
        self.index.add(label, vector)

    def remove(self, label: int) -> bool:
        if label not in self.index:
            return False
        self.index.remove(label)
        return True

    def contains(self, label: int) -> bool:
        return label in self.index

    def labels(self) -> set[int]:
        return {int(k) for k in np.asarray(self.index.keys)}

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self.size == 0:
            return []
        matches = self.index.search(query, k)
        return [
            (int(key), 1.0 - float(dist))
            for key, dist in zip(matches.keys, matches.distances, strict=True)
        ]


class _Partition:
    __slots__ = ("flat", "hnsw", "promoting")

    def __init__(self, ndim: int) -> None:
        self.flat: _Flat | None = _Flat(ndim)
        self.hnsw: _Hnsw | None = None
        self.promoting = False

    @property
    def size(self) -> int:
        if self.flat is not None:
            return self.flat.size
        assert self.hnsw is not None
        return self.hnsw.size


def _build_hnsw(ndim: int, params: HnswParams, labels: np.ndarray, vectors: np.ndarray) -> _Hnsw:
    graph = _Hnsw(ndim, params)
    graph.add_many(labels, vectors)
    return graph


class SemanticIndex:
    """Partitioned cosine top-k search. Not thread-safe: use from one thread (the event loop),
    or build a fresh one off-loop and hand it over (``ResponseCache`` does that for rebuilds)."""

    def __init__(
        self,
        ndim: int = 384,
        *,
        flat_limit: int = DEFAULT_FLAT_LIMIT,
        hnsw: HnswParams | None = None,
    ) -> None:
        self.ndim = ndim
        self.flat_limit = flat_limit
        self.hnsw_params = hnsw or HnswParams()
        self._partitions: dict[str, _Partition] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return sum(p.size for p in self._partitions.values())

    def partition_sizes(self) -> dict[str, int]:
        return {name: p.size for name, p in self._partitions.items()}

    def add(self, partition: str, label: int, vector: np.ndarray) -> None:
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition(self.ndim)
        unit = _normalise(vector)
        if part.hnsw is not None:
            part.hnsw.add(label, unit)
            return
        assert part.flat is not None
        part.flat.add(label, unit)
        if part.flat.size > self.flat_limit and not part.promoting:
            self._promote(partition, part)

    def add_many(self, partition: str, labels: Sequence[int], vectors: np.ndarray) -> None:
        """Bulk add (rebuilds): goes straight to HNSW when the batch is large."""
        part = self._partitions.get(partition)
        units = _normalise(vectors)
        if part is None and len(labels) > self.flat_limit:
            part = self._partitions[partition] = _Partition(self.ndim)
            part.flat = None
            part.hnsw = _build_hnsw(
                self.ndim, self.hnsw_params, np.asarray(labels, dtype=np.uint64), units
            )
            return
        for label, vector in zip(labels, units, strict=True):
            self.add(partition, label, vector)

    def labels(self, partition: str) -> set[int]:
        part = self._partitions.get(partition)
        if part is None:
            return set()
        if part.hnsw is not None:
            return part.hnsw.labels() | (set(part.flat.rows) if part.flat is not None else set())
        assert part.flat is not None
        return set(part.flat.rows)

    def partitions(self) -> list[str]:
        return list(self._partitions)

    def remove(self, partition: str, label: int) -> bool:
        part = self._partitions.get(partition)
        if part is None:
            return False
        removed = part.hnsw.remove(label) if part.hnsw is not None else False
        if part.flat is not None:
            removed = part.flat.remove(label) or removed
        if part.size == 0 and not part.promoting:
            del self._partitions[partition]
        return removed

    def search(self, partition: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (label, cosine) pairs of ``partition``, best first."""
        part = self._partitions.get(partition)
        if part is None or k <= 0:
            return []
        query = _normalise(vector)
        if part.flat is not None:
            return part.flat.search(query, k)
        assert part.hnsw is not None
        return part.hnsw.search(query, k)

    def _promote(self, name: str, part: _Partition) -> None:
        assert part.flat is not None
        labels = part.flat.labels[: part.flat.size].copy()
        vectors = part.flat.vectors[: part.flat.size].copy()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No event loop (a bulk build on a worker thread): build in place.
            self._swap(part, _build_hnsw(self.ndim, self.hnsw_params, labels, vectors), labels)
            return
        part.promoting = True

        async def promote() -> None:
            try:
                graph = await loop.run_in_executor(
                    None, _build_hnsw, self.ndim, self.hnsw_params, labels, vectors
                )
                self._swap(part, graph, labels)
            except Exception:
                log.exception("cache.index.promote_failed", extra={"partition": name})
            finally:
                part.promoting = False

        task = loop.create_task(promote())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _swap(part: _Partition, graph: _Hnsw, snapshot: np.ndarray) -> None:
        """Make ``graph`` the partition's index after applying writes made since ``snapshot``."""
        flat = part.flat
        assert flat is not None
        current = set(flat.rows)
        for label in set(snapshot.tolist()) - current:
            graph.remove(label)
        for label, row in flat.rows.items():
            # add what arrived during the build (a re-stored label keeps its vector: same text)
            if not graph.contains(label):
                graph.add(label, flat.vectors[row])
        part.hnsw = graph
        part.flat = None

    # -- snapshots: a restart loads the graphs instead of rebuilding them ----------------------

    def save(self, folder: Path) -> None:
        """Write the index to ``folder`` (replaced atomically). Blocking: call off the loop,
        with no promotion running (``wait_idle``)."""
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        flat_names: list[str] = []
        counts: list[int] = []
        labels: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        graphs: dict[str, str] = {}
        for name, part in self._partitions.items():
            if part.hnsw is not None and part.flat is None:
                file = f"hnsw-{len(graphs)}.usearch"
                part.hnsw.index.save(str(staging / file))
                graphs[name] = file
            elif part.flat is not None:
                flat = part.flat
                flat_names.append(name)
                counts.append(flat.size)
                labels.append(flat.labels[: flat.size])
                vectors.append(flat.vectors[: flat.size].astype(np.float16))
        np.savez(
            staging / "flat.npz",
            counts=np.asarray(counts, dtype=np.int64),
            labels=np.concatenate(labels) if labels else np.empty(0, dtype=np.uint64),
            vectors=np.concatenate(vectors) if vectors else np.empty((0, self.ndim), np.float16),
        )
        manifest = {
            "format": 1,
            "ndim": self.ndim,
            "hnsw": asdict(self.hnsw_params),
            "flat": flat_names,
            "graphs": graphs,
        }
        (staging / "manifest.json").write_bytes(orjson.dumps(manifest))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)

    @classmethod
    def load(
        cls, folder: Path, *, flat_limit: int = DEFAULT_FLAT_LIMIT, hnsw: HnswParams | None = None
    ) -> SemanticIndex:
        """Read a snapshot written by ``save``. Blocking. Raises ``ValueError`` if unusable."""
        try:
            manifest = orjson.loads((folder / "manifest.json").read_bytes())
            params = hnsw or HnswParams(**manifest["hnsw"])
            index = cls(int(manifest["ndim"]), flat_limit=flat_limit, hnsw=params)
            with np.load(folder / "flat.npz") as arrays:
                counts, labels, vectors = arrays["counts"], arrays["labels"], arrays["vectors"]
            start = 0
            for name, count in zip(manifest["flat"], counts.tolist(), strict=True):
                part = index._partitions[name] = _Partition(index.ndim)
                assert part.flat is not None
                for i in range(start, start + count):
                    part.flat.add(int(labels[i]), vectors[i].astype(np.float32))
                start += count
            for name, file in manifest["graphs"].items():
                graph = _Hnsw(index.ndim, params)
                graph.index.load(str(folder / file))
                graph.index.expansion_search = params.expansion_search  # type: ignore[misc]
                part = index._partitions[name] = _Partition(index.ndim)
                part.flat, part.hnsw = None, graph
        except Exception as exc:
            # Any failure: a torn or truncated file fails in numpy's zip reader (EOFError,
            # BadZipFile), its header parser (SyntaxError) or usearch (RuntimeError), and which
            # one is the libraries' business. The store is the source of truth: the caller
            # rebuilds from it.
            raise ValueError(f"unusable index snapshot in {folder}: {exc!r}") from exc
        return index

    async def wait_idle(self) -> None:
        """Wait for background promotions (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
