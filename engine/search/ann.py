"""The approximate-nearest-neighbour graph under a local index: usearch's HNSW.

Chosen by measurement (`modelgate bench search`, README): at 100,000 x 384 it
reaches the recall goal at numCandidates = 10 x limit like faiss and hnswlib, and of
the three it is the one that is both kept up (frequent releases) and able to remove
and replace vectors in place (faiss's HNSW cannot remove; hnswlib only marks deleted
and has had no release since 2023), which an index that follows updates and deletes
needs.

The graph knows integer keys (the local index's slots) and vectors; it holds no
document data. Distances are usearch's: "ip" gives 1 - dot, "l2sq" the squared
euclidean distance; the local index turns them into MongoDB's scores.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from usearch.index import Index

__all__ = ["CONNECTIVITY", "EXPANSION_ADD", "Graph", "GraphMetric"]

GraphMetric = Literal["ip", "l2sq"]

#: HNSW's M (edges per node) and efConstruction, as bench/search.py measured them.
CONNECTIVITY = 16
EXPANSION_ADD = 128


class Graph:
    """An HNSW graph of float32 vectors by uint64 key (usearch `Index`)."""

    def __init__(
        self,
        dim: int,
        metric: GraphMetric,
        *,
        connectivity: int = CONNECTIVITY,
        expansion_add: int = EXPANSION_ADD,
        threads: int = 1,
        index: Index | None = None,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self.threads = threads
        self._index = index or Index(
            ndim=dim,
            metric=metric,
            dtype="f32",
            connectivity=connectivity,
            expansion_add=expansion_add,
        )

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under keys that are not in the graph."""
        if len(keys):
            self._index.add(keys.astype(np.uint64), vectors, threads=self.threads)

    def remove(self, keys: np.ndarray) -> None:
        if len(keys):
            self._index.remove(keys.astype(np.uint64))

    def search(self, vector: np.ndarray, count: int, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, distances) of about the `count` nearest, closest first, exploring
        `breadth` candidates (HNSW's ef)."""
        count = min(count, len(self))
        if count <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        self._index.expansion_search = max(breadth, count)  # type: ignore[misc]
        matches = self._index.search(vector, count, threads=1)
        return matches.keys.astype(np.int64), matches.distances

    def to_bytes(self) -> bytes:
        return bytes(self._index.save() or b"")

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray, dim: int, metric: GraphMetric, *, threads: int = 1
    ) -> Graph:
        """The graph `to_bytes` gave; ValueError if it is not one of `dim` and `metric`."""
        try:
            index = Index.restore(data)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot read the graph: {exc}") from exc
        if index is None or index.ndim != dim or _metric_name(index) != metric:
            raise ValueError("the graph does not match the index")
        return cls(dim, metric, threads=threads, index=index)


def _metric_name(index: Index) -> str:
    return str(getattr(index.metric_kind, "name", "")).lower()
