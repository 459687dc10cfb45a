"""What a keeper (engine.search.keeper) holds and reports: its settings, the state it
gives `$listSearchIndexes`, and the layout of its local indexes (which vector paths,
dimensions, similarities, filter paths and graph options), from which its directory is
named."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.search.definitions import AutoEmbedField, SearchIndex

__all__ = ["IndexState", "Layout", "SearchSettings", "fingerprint", "layout_of", "projection_of"]


@dataclass(frozen=True)
class SearchSettings:
    change_streams: bool = True
    sweep_interval: float = 60.0  # full rescan of each indexed collection
    save_interval: float = 10.0  # at most this often, when something changed
    batch_size: int = 1000  # documents read (and applied) per batch
    stale_after: int = 3  # consecutive upkeep failures before STALE
    progress_interval: float = 10.0  # build progress in the log
    build_threads: int = 0  # 0: every CPU this process may use
    # autoEmbed: how often the derived model's counts are read (at least 10 times as
    # long as the last reading took).
    embed_poll_interval: float = 1.0


@dataclass(frozen=True)
class IndexState:
    status: str  # BUILDING | READY | FAILED | STALE
    queryable: bool
    indexed: int
    pending: int
    failed: int
    message: str | None = None


Layout = tuple[
    tuple[tuple[str, int, str], ...],
    tuple[str, ...],
    tuple[tuple[str, int | None, int | None], ...],
]


def layout_of(index: SearchIndex) -> Layout:
    """What the local indexes hold and how their graphs are built: ((vector path,
    dimensions, similarity), ...), the filter paths, and ((vector path, maxEdges,
    numEdgeCandidates), ...) for the vector fields whose hnswOptions set either (None:
    engine.search.ann's default). Definitions with the same layout share their local
    indexes; a change of hnswOptions rebuilds the graphs."""
    vectors, graphs = [], []
    for f in index.definition.vector_fields:
        path = f.vector_path if isinstance(f, AutoEmbedField) else f.path
        vectors.append((path, f.num_dimensions, f.similarity))
        edges = getattr(f, "max_edges", None)
        candidates = getattr(f, "num_edge_candidates", None)
        if edges is not None or candidates is not None:
            graphs.append((path, edges, candidates))
    return tuple(vectors), tuple(sorted(index.definition.filter_paths)), tuple(graphs)


def projection_of(paths: Iterable[str]) -> dict[str, int]:
    """A projection of _id and `paths`, without a path under another (MongoDB refuses
    such path collisions; the shorter path brings the longer one along)."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == p or path.startswith(p + ".") for p in kept):
            kept.append(path)
    return {"_id": 1, **dict.fromkeys(sorted(kept), 1)}


def fingerprint(layout: Layout) -> str:
    """The name of a layout's directory."""
    # Without hnswOptions, the fingerprint of (vectors, filters) alone: the directory
    # of an index saved before hnswOptions were honoured stays its own.
    kept: Any = layout if layout[2] else layout[:2]
    return hashlib.sha256(repr(kept).encode()).hexdigest()[:12]
