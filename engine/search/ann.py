"""The approximate-nearest-neighbour graph under a local index: hnswlib's HNSW.

Chosen by measurement (`modelgate bench search`; README): at 100,000 x 384 with the
search breadth tied to numCandidates = 10 x limit it reaches the recall goal with the
lowest single-query latency of the three candidates (usearch, faiss-cpu, hnswlib), and
it updates a vector in place, removes one (marked deleted, its node reused when its
key comes back) and grows, which an index that follows updates and deletes needs.
faiss's HNSW cannot remove vectors. usearch can, but importing it before onnxruntime
crashes the process (a segmentation fault in onnxruntime's import, usearch 2.26 /
onnxruntime on this machine): not a risk a proxy that serves models can take.

The graph knows integer keys (the local index's slots) and vectors; it holds no
document data. Distances are hnswlib's: "ip" gives 1 - dot, "l2" the squared
euclidean distance; the local index rescores candidates itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import hnswlib
import numpy as np

__all__ = ["CONNECTIVITY", "EXPANSION_ADD", "Graph", "GraphMetric"]

GraphMetric = Literal["ip", "l2"]

#: HNSW's M (edges per node) and efConstruction, as bench/search.py measured them; a
#: definition's hnswOptions (maxEdges, numEdgeCandidates) replace them for its index.
CONNECTIVITY = 16
EXPANSION_ADD = 128


class Graph:
    """An HNSW graph of float32 vectors by integer key (hnswlib `Index`). Not
    thread-safe: the local index serializes calls."""

    def __init__(
        self,
        dim: int,
        metric: GraphMetric,
        *,
        threads: int = 1,
        capacity: int = 1024,
        index: hnswlib.Index | None = None,
        live: int = 0,
        connectivity: int = CONNECTIVITY,
        expansion_add: int = EXPANSION_ADD,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self.threads = threads
        if index is None:
            index = hnswlib.Index(space=metric, dim=dim)
            index.init_index(
                max_elements=max(capacity, 16),
                ef_construction=expansion_add,
                M=connectivity,
                random_seed=100,
            )
        self._index = index
        self._live = live  # keys not deleted

    def __len__(self) -> int:
        return self._live

    @property
    def connectivity(self) -> int:
        """HNSW's M: edges per node (a definition's hnswOptions.maxEdges)."""
        return int(self._index.M)

    @property
    def expansion_add(self) -> int:
        """HNSW's efConstruction (a definition's hnswOptions.numEdgeCandidates)."""
        return int(self._index.ef_construction)

    @property
    def nodes(self) -> int:
        """Keys ever added, deleted ones included (hnswlib keeps their nodes)."""
        return int(self._index.get_current_count())

    def put(self, keys: np.ndarray, vectors: np.ndarray, *, new: int) -> None:
        """Add or replace the vectors of `keys` (a deleted key comes back); `new`: how
        many of them are not live now."""
        if not len(keys):
            return
        needed = self.nodes + len(keys)
        if needed > self._index.get_max_elements():
            self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
        self._index.add_items(
            np.ascontiguousarray(vectors, dtype=np.float32),
            np.asarray(keys, dtype=np.uint64),
            num_threads=self.threads if len(keys) > 64 else 1,
        )
        self._live += new

    def remove(self, keys: np.ndarray) -> None:
        for key in np.asarray(keys, dtype=np.int64).tolist():
            self._index.mark_deleted(key)
            self._live -= 1

    def search(self, vector: np.ndarray, count: int, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, distances) of about the `count` nearest, closest first, exploring
        `breadth` candidates (HNSW's ef)."""
        count = min(count, self._live)
        while count > 0:
            self._index.set_ef(max(breadth, count))
            try:
                keys, distances = self._index.knn_query(vector, k=count, num_threads=1)
                return keys[0].astype(np.int64), distances[0]
            except RuntimeError:
                # Fewer than `count` reachable (deletions cut the graph): ask for fewer.
                count //= 2
        return np.empty(0, np.int64), np.empty(0, np.float32)

    def save(self, path: Path) -> None:
        self._index.save_index(str(path))

    @classmethod
    def load(
        cls, path: Path, dim: int, metric: GraphMetric, *, live: int, nodes: int, threads: int = 1
    ) -> Graph:
        """The graph saved at `path`; ValueError if it is not one of `dim`, `metric`
        with `nodes` keys."""
        index = hnswlib.Index(space=metric, dim=dim)
        try:
            index.load_index(str(path), max_elements=max(nodes, 16))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise ValueError(f"cannot read the graph: {exc}") from exc
        if int(index.get_current_count()) != nodes:
            raise ValueError("the graph does not hold the stored rows")
        return cls(dim, metric, threads=threads, index=index, live=live)
