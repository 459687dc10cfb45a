"""One local vector index: the vectors at one path of one search index's documents, by
_id, with the values of the index's filter fields, searched approximately (an HNSW
graph, engine.search.ann) or exactly (numpy).

Layout. Every document has a slot (a row): its vector, float32, in one numpy matrix
(normalized for cosine), its _id and its filter values in lists by slot; the graph
holds the same vectors under the slot numbers. A removed document's slot is reused by
the next new one. The matrix costs a second copy of the vectors beside the graph's; it
buys exact scores for every result (the graph only proposes candidates, numpy ranks
them), exact search without the graph, a cheap check whether a sweep found a vector
changed, and files that can rebuild the graph (engine.search.persist).

Search. `numCandidates` is HNSW's search breadth (ef): the graph proposes that many
candidates, the best `limit` by exact score are returned. With a filter:
- the filter's selectivity is estimated on a sample of up to 256 documents;
- if fewer than PREFILTER_FACTOR x numCandidates documents are expected to match (a
  selective filter), every document is tested and the matches are ranked exactly
  (exact pre-filter: one Python test per document, then numpy);
- else the graph is asked for numCandidates / selectivity candidates, the filter is
  applied to them (post-filter), and the request widens (x4) while fewer than
  numCandidates / 2 candidates pass and the graph has more, ending in the exact
  pre-filter when the widening reaches a quarter of the index.

Scores are MongoDB's: cosine (1 + cos) / 2, dotProduct (1 + dot) / 2, euclidean
1 / (1 + distance). Not thread-safe by itself: every public method holds the index's
lock, so that the upkeep's worker threads and searches may call it concurrently.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from bson import ObjectId, encode
from bson.binary import Binary, BinaryVectorDtype

from engine.search.ann import CONNECTIVITY, EXPANSION_ADD, Graph, GraphMetric
from engine.search.filters import VectorSearchQueryError

__all__ = [
    "PREFILTER_FACTOR",
    "LocalIndex",
    "RowFilter",
    "Snapshot",
    "VectorInvalid",
    "coerce_vector",
    "default_threads",
    "id_key",
]

#: Pre-filter exactly when fewer than this many times numCandidates documents are
#: expected to match (see the module's docstring).
PREFILTER_FACTOR = 4
_SAMPLE = 256
_GRAPH_METRIC: dict[str, GraphMetric] = {
    "cosine": "ip",
    "dotProduct": "ip",
    "euclidean": "l2",
}


class RowFilter(Protocol):
    """What the index needs of a compiled filter (engine.search.filters.VectorFilter)."""

    def matches(self, values: Mapping[str, Any]) -> bool: ...


class VectorInvalid(ValueError):
    """A document's value at the vector path is there but is no vector of the index's
    dimension (the index counts the document as failed)."""


def id_key(doc_id: Any) -> Any:
    """A hashable key equal for equal BSON _ids: the _id itself for the common types
    (ObjectId, str, int; an integral double as that int, as MongoDB finds 1.0 as 1),
    else the _id's BSON encoding (documents, arrays, bools, binaries, ...)."""
    kind = type(doc_id)
    if kind is ObjectId or kind is str or kind is int:
        return doc_id
    if kind is float and doc_id.is_integer():
        return int(doc_id)
    if kind is float:
        return doc_id
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):  # Int64
        return int(doc_id)
    if isinstance(doc_id, uuid.UUID):  # as the upstream stores it (FAITHFUL reads it so)
        doc_id = Binary.from_uuid(doc_id)
    return ("bson", encode({"": doc_id}))


def coerce_vector(value: Any, dim: int) -> np.ndarray:
    """`value` as a float32 vector of `dim` numbers: an array of numbers, or a BSON
    vector (BinData subtype 9) of float32 or int8. Raises VectorInvalid otherwise."""
    if isinstance(value, Binary) and value.subtype == 9:
        try:
            vector = value.as_vector()
        except (ValueError, TypeError) as exc:
            raise VectorInvalid(f"unreadable BSON vector: {exc}") from exc
        if vector.dtype == BinaryVectorDtype.PACKED_BIT:
            raise VectorInvalid("packed-bit BSON vectors are not indexed")
        values: Any = vector.data
    elif isinstance(value, list | tuple | np.ndarray):
        values = value
    else:
        raise VectorInvalid(f"expected an array of {dim} numbers, got {type(value).__name__}")
    if len(values) != dim:
        raise VectorInvalid(f"expected {dim} dimensions, got {len(values)}")
    if not isinstance(values, np.ndarray) and not all(
        type(v) is float or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
    ):
        raise VectorInvalid("the array holds values that are not numbers")
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise VectorInvalid(f"not numbers: {exc}") from exc
    if array.shape != (dim,) or not np.isfinite(array).all():
        raise VectorInvalid("the vector holds values that are not finite numbers")
    return array


class LocalIndex:
    """The vectors of one (search index, vector path), by _id (see the module's docstring)."""

    def __init__(
        self,
        dim: int,
        similarity: str,
        *,
        threads: int = 1,
        capacity: int = 1024,
        connectivity: int | None = None,
        expansion_add: int | None = None,
    ):
        """`connectivity` / `expansion_add`: the graph's M and efConstruction (a
        definition's hnswOptions maxEdges / numEdgeCandidates; None: ann's defaults)."""
        if similarity not in _GRAPH_METRIC:
            raise ValueError(f"unknown similarity {similarity!r}")
        self.dim = dim
        self.similarity = similarity
        self.threads = threads
        self._lock = threading.RLock()
        self._graph = Graph(
            dim,
            _GRAPH_METRIC[similarity],
            threads=threads,
            capacity=capacity,
            connectivity=connectivity or CONNECTIVITY,
            expansion_add=expansion_add or EXPANSION_ADD,
        )
        self._vectors = np.zeros((max(capacity, 16), dim), dtype=np.float32)
        self._live = np.zeros(len(self._vectors), dtype=bool)
        self._ids: list[Any] = []  # by slot, up to the high-water mark
        self._values: list[Mapping[str, Any]] = []
        self._slots: dict[Any, int] = {}  # id_key -> slot
        self._free: list[int] = []

    # ----------------------------------------------------------------- contents

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, doc_id: Any) -> bool:
        return id_key(doc_id) in self._slots

    @property
    def graph_options(self) -> tuple[int, int]:
        """(M, efConstruction) of the graph."""
        return self._graph.connectivity, self._graph.expansion_add

    def ids(self) -> list[Any]:
        """Every indexed _id (a copy)."""
        with self._lock:
            return [self._ids[slot] for slot in self._slots.values()]

    def get(self, doc_id: Any) -> tuple[np.ndarray, Mapping[str, Any]] | None:
        """(stored vector, filter values) of a document, or None."""
        with self._lock:
            slot = self._slots.get(id_key(doc_id))
            if slot is None:
                return None
            return self._vectors[slot].copy(), self._values[slot]

    def snapshot(self, graph_file: Path | None = None) -> Snapshot:
        """Every live row copied, and the graph saved to `graph_file` (if given), under
        the lock (for persist: the rest of the writing happens without holding it)."""
        with self._lock:
            slots = np.flatnonzero(self._live[: len(self._ids)])
            if graph_file is not None:
                self._graph.save(graph_file)
            return Snapshot(
                dim=self.dim,
                similarity=self.similarity,
                slots=slots,
                vectors=self._vectors[slots].copy(),
                ids=[self._ids[s] for s in slots],
                values=[self._values[s] for s in slots],
                graph_file=graph_file,
                graph_nodes=self._graph.nodes,
                connectivity=self._graph.connectivity,
                expansion_add=self._graph.expansion_add,
            )

    # ----------------------------------------------------------------- changes

    def prepare(self, vector: np.ndarray) -> np.ndarray:
        """A coerced vector as stored (normalized for cosine); VectorInvalid for a zero
        vector under cosine, whose similarity is undefined."""
        if self.similarity != "cosine":
            return vector
        norm = float(np.linalg.norm(vector))
        if norm == 0.0 or not math.isfinite(norm):
            raise VectorInvalid("a zero vector has no cosine similarity")
        return vector / norm

    def upsert(self, doc_id: Any, vector: np.ndarray, values: Mapping[str, Any]) -> bool:
        """Index (or re-index) a document; True if its vector changed or it is new."""
        return self.upsert_many([(doc_id, vector, values)]) > 0

    def upsert_many(self, items: Iterable[tuple[Any, Any, Mapping[str, Any]]]) -> int:
        """Index documents given as (_id, coerced vector, filter values), the graph
        updated in one call (on `threads` threads); the number whose vector changed."""
        prepared = [(doc_id, self.prepare(vector), values) for doc_id, vector, values in items]
        with self._lock:
            added: dict[int, np.ndarray] = {}
            new = 0
            for doc_id, vector, values in prepared:
                key = id_key(doc_id)
                slot = self._slots.get(key)
                if slot is not None:
                    self._ids[slot] = doc_id
                    self._values[slot] = values
                    if np.array_equal(self._vectors[slot], vector):
                        continue
                else:
                    new += 1
                    slot = self._allocate()
                    self._slots[key] = slot
                    self._ids[slot] = doc_id
                    self._values[slot] = values
                    self._live[slot] = True
                self._vectors[slot] = vector
                added[slot] = vector
            if added:
                keys = np.fromiter(added, dtype=np.int64, count=len(added))
                self._graph.put(keys, self._vectors[keys], new=new)
            return len(added)

    def remove(self, doc_id: Any) -> bool:
        """Forget a document; False if it was not indexed."""
        return self.remove_many([doc_id]) > 0

    def remove_many(self, doc_ids: Iterable[Any]) -> int:
        with self._lock:
            slots = []
            for doc_id in doc_ids:
                slot = self._slots.pop(id_key(doc_id), None)
                if slot is not None:
                    slots.append(slot)
                    self._live[slot] = False
                    self._ids[slot] = None
                    self._values[slot] = {}
                    self._free.append(slot)
            self._graph.remove(np.asarray(slots, dtype=np.int64))
            return len(slots)

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._ids)
        if slot == len(self._vectors):
            grown = np.zeros((2 * len(self._vectors), self.dim), dtype=np.float32)
            grown[:slot] = self._vectors
            self._vectors = grown
            live = np.zeros(len(grown), dtype=bool)
            live[:slot] = self._live
            self._live = live
        self._ids.append(None)
        self._values.append({})
        return slot

    # ----------------------------------------------------------------- search

    def query_vector(self, query: Sequence[float] | np.ndarray) -> np.ndarray:
        """The query as the index compares it; MongoDB's error for a wrong dimension."""
        if len(query) != self.dim:
            raise VectorSearchQueryError(
                f"vector field is indexed with {self.dim} dimensions but queried with {len(query)}"
            )
        try:
            vector = coerce_vector(query, self.dim)
            return self.prepare(vector)
        except VectorInvalid as exc:
            raise VectorSearchQueryError(f"invalid queryVector: {exc}") from None

    def search(
        self,
        query: Sequence[float] | np.ndarray,
        *,
        limit: int,
        num_candidates: int,
        filter: RowFilter | None = None,
        exact: bool = False,
    ) -> list[tuple[Any, float]]:
        """(_id, score) of the best `limit` documents, best first (ties: lower slot)."""
        q = self.query_vector(query)
        with self._lock:
            if limit <= 0 or not self._slots:
                return []
            if filter is None and exact:
                return self._rank_all(q, limit)
            if filter is None:
                slots, _ = self._graph.search(q, num_candidates, num_candidates)
            elif exact:
                slots = self._matching(filter)
            else:
                slots = self._filtered_candidates(q, num_candidates, filter)
            return self._rank(q, slots, limit)

    def search_now(
        self,
        query: Sequence[float] | np.ndarray,
        *,
        limit: int,
        num_candidates: int,
        exact: bool = False,
    ) -> list[tuple[Any, float]] | None:
        """`search` without a filter if the index's lock is free now; None if a writer
        holds it (a caller on an event loop must not wait for one)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.search(query, limit=limit, num_candidates=num_candidates, exact=exact)
        finally:
            self._lock.release()

    def _live_slots(self) -> np.ndarray:
        return np.flatnonzero(self._live[: len(self._ids)])

    def _matching(self, filter: RowFilter, slots: Iterable[int] | None = None) -> np.ndarray:
        values = self._values
        chosen = self._live_slots() if slots is None else slots
        return np.fromiter((s for s in chosen if filter.matches(values[s])), dtype=np.int64)

    def _filtered_candidates(
        self, q: np.ndarray, num_candidates: int, filter: RowFilter
    ) -> np.ndarray:
        live = self._live_slots()
        count = len(live)
        if count > _SAMPLE:
            sample = np.random.default_rng().choice(live, _SAMPLE, replace=False)
        else:
            sample = live
        hits = len(self._matching(filter, sample))
        # An upper estimate (one more hit than seen), so that a filter no sampled
        # document passes is still expected to match a few.
        fraction = min(1.0, (hits + 1) / len(sample))
        if fraction * count < PREFILTER_FACTOR * num_candidates:
            return self._matching(filter)
        wanted = math.ceil(num_candidates / fraction)
        while True:
            found, _ = self._graph.search(q, wanted, wanted)
            passed = self._matching(filter, found)
            if len(passed) >= num_candidates // 2 or len(found) >= count:
                return passed
            wanted *= 4
            if wanted > count // 4:
                return self._matching(filter)

    def _rank_all(self, q: np.ndarray, limit: int) -> list[tuple[Any, float]]:
        """Exact search without a filter: every row scored in place (no copy of the
        matrix), removed slots never chosen."""
        high = len(self._ids)
        scores = self.scores(q, self._vectors[:high])
        scores[~self._live[:high]] = -np.inf
        count = min(limit, len(self._slots))
        top = np.argpartition(-scores, count - 1)[:count] if count < high else np.arange(high)
        top = top[np.isfinite(scores[top])]
        order = np.lexsort((top, -scores[top]))
        return [(self._ids[top[i]], float(scores[top[i]])) for i in order]

    def _rank(self, q: np.ndarray, slots: np.ndarray, limit: int) -> list[tuple[Any, float]]:
        if len(slots) == 0:
            return []
        slots = np.asarray(slots, dtype=np.int64)
        scores = self.scores(q, self._vectors[slots])
        if len(slots) > limit:
            top = np.argpartition(-scores, limit - 1)[:limit]
            slots, scores = slots[top], scores[top]
        order = np.lexsort((slots, -scores))
        return [(self._ids[slots[i]], float(scores[i])) for i in order]

    def scores(self, q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """MongoDB's scores of stored `vectors` against a prepared query `q`."""
        if self.similarity == "euclidean":
            distances = np.sqrt(np.maximum(((vectors - q) ** 2).sum(axis=1), 0.0))
            return np.asarray(1.0 / (1.0 + distances), dtype=np.float64)
        # einsum, not BLAS: one thread, steady; BLAS's threads for a large matrix-vector
        # product stall when the host's cores are busy (10,000 x 384: 0.6 ms here, and
        # up to 10 ms with BLAS on a loaded 2-core host).
        return np.asarray((1.0 + np.einsum("ij,j->i", vectors, q)) / 2.0, dtype=np.float64)

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, *, threads: int = 1) -> LocalIndex:
        """The index a snapshot was taken of, with the snapshot's graph (or a graph
        built from its rows when it has none). ValueError if the parts disagree."""
        count = len(snapshot.ids)
        slots = np.asarray(snapshot.slots, dtype=np.int64)
        if len(slots) != count or len(snapshot.values) != count:
            raise ValueError("the stored rows disagree in length")
        if snapshot.vectors.shape != (count, snapshot.dim):
            raise ValueError("the stored vectors have the wrong shape")
        if count and (slots.min() < 0 or len(np.unique(slots)) != count):
            raise ValueError("the stored slots are not distinct")
        high = int(slots.max()) + 1 if count else 0
        index = cls(
            snapshot.dim,
            snapshot.similarity,
            threads=threads,
            capacity=high,
            connectivity=snapshot.connectivity,
            expansion_add=snapshot.expansion_add,
        )
        index._vectors[slots] = snapshot.vectors
        index._live[slots] = True
        index._ids = [None] * high
        index._values = [{}] * high
        for slot, doc_id, values in zip(slots.tolist(), snapshot.ids, snapshot.values, strict=True):
            index._ids[slot] = doc_id
            index._values[slot] = values
            index._slots[id_key(doc_id)] = slot
        if len(index._slots) != count:
            raise ValueError("duplicate _ids in the stored rows")
        index._free = sorted(set(range(high)) - set(slots.tolist()), reverse=True)
        if snapshot.graph_file is None:
            index._graph.put(slots, snapshot.vectors, new=count)
        else:
            index._graph = Graph.load(
                snapshot.graph_file,
                snapshot.dim,
                _GRAPH_METRIC[snapshot.similarity],
                live=count,
                nodes=snapshot.graph_nodes,
                threads=threads,
            )
        return index


@dataclass
class Snapshot:
    """An index's content, as persist writes and reads it: the live rows by slot, and
    the file the graph is saved in (None: build it from the rows) with its node count
    (live keys and deleted ones), and the graph's parameters."""

    dim: int
    similarity: str
    slots: np.ndarray
    vectors: np.ndarray
    ids: list[Any]
    values: list[Mapping[str, Any]]
    graph_file: Path | None
    graph_nodes: int = 0
    connectivity: int = CONNECTIVITY  # the graph's M and efConstruction (a saved graph
    expansion_add: int = EXPANSION_ADD  # file holds its own; these rebuild one without)


def default_threads() -> int:
    """Threads for building a graph: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
