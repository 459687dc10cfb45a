"""The local vector indexes of this process: one Keeper (engine.search.keeper) per search
index of the catalog, started, replaced and dropped as the catalog changes.

Each index's files live under `data_dir/<index directory>/L<layout>/v<n>/` (one local
index per vector path; engine.search.persist): the index directory is named after the
index's key ("db.coll/name") made safe for a file name, the layout subdirectory after
what the local indexes hold (vector paths, dimensions, similarities, filter paths).

An update of a definition that keeps the layout changes nothing here (hnswOptions
are part of the layout: the graphs are built with them). One that changes it starts a
new keeper beside the old one: the old keeps answering queries (the index stays
queryable, status BUILDING) until the new one is READY, then it stops and its files
go. A dropped index's keeper stops and its directory is removed; directories of
indexes the catalog no longer has are removed once the catalog has been read.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymongo
import trio

from engine.metrics import EngineMetrics
from engine.search.catalog import SearchCatalog
from engine.search.definitions import AutoEmbedField, SearchIndex
from engine.search.filters import VectorFilter, VectorSearchQueryError
from engine.search.keeper import IndexState, Keeper, SearchSettings, layout_of

__all__ = ["IndexState", "SearchIndexes", "SearchSettings", "index_directory_name"]

log = logging.getLogger(__name__)


def index_directory_name(key: str) -> str:
    """A file name for an index key: its safe characters and a hash of the whole key."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class SearchIndexes:
    """Every search index's local indexes in this process (see the module's docstring)."""

    def __init__(
        self,
        catalog: SearchCatalog,
        client: pymongo.MongoClient[dict[str, Any]],
        data_dir: Path,
        settings: SearchSettings | None = None,
        *,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.catalog = catalog
        self.client = client
        self.data_dir = Path(data_dir)
        self.settings = settings or SearchSettings()
        self.metrics = metrics or EngineMetrics()
        self._keepers: dict[str, Keeper] = {}  # by index key: the latest definition's
        self._previous: dict[str, Keeper] = {}  # an older layout still answering
        self._scopes: dict[int, trio.CancelScope] = {}  # by id(keeper)
        self._cleaned = False

    # ----------------------------------------------------------------- queries

    def state(self, index: SearchIndex) -> IndexState:
        keeper = self._keepers.get(index.key)
        if keeper is None or keeper.index.id != index.id:
            return IndexState("BUILDING", False, 0, 0, 0, None)
        state = keeper.state()
        previous = self._previous.get(index.key)
        if not state.queryable and previous is not None and previous.state().queryable:
            return IndexState(
                state.status, True, state.indexed, state.pending, state.failed, state.message
            )
        return state

    async def search(
        self,
        index: SearchIndex,
        path: str,
        query_vector: Sequence[float],
        *,
        num_candidates: int,
        limit: int,
        filter: VectorFilter | None,
        exact: bool,
    ) -> list[tuple[Any, float]]:
        """(_id, score) best first; MongoDB's errors for a path that is not an indexed
        vector, a wrong dimension, an index that is not queryable."""
        field = index.definition.vector_field(path)
        if field is None:
            raise VectorSearchQueryError(f"Path '{path}' needs to be indexed as vector")
        vector_path = field.vector_path if isinstance(field, AutoEmbedField) else field.path
        keeper = self._serving(index)
        if keeper is None or vector_path not in keeper.locals:
            raise VectorSearchQueryError(
                f"Search index '{index.name}' is not queryable while in state "
                f"{self.state(index).status}"
            )
        if len(query_vector) != field.num_dimensions:
            raise VectorSearchQueryError(
                f"vector field is indexed with {field.num_dimensions} dimensions but "
                f"queried with {len(query_vector)}"
            )
        return await keeper.search(
            vector_path,
            query_vector,
            limit=limit,
            num_candidates=num_candidates,
            filter=filter,
            exact=exact,
        )

    def _serving(self, index: SearchIndex) -> Keeper | None:
        for keeper in (self._keepers.get(index.key), self._previous.get(index.key)):
            if keeper is not None and keeper.state().queryable:
                return keeper
        return None

    def notify_written(self, namespace: str, ids: Sequence[Any] | None) -> None:
        """The proxy wrote these _ids in `namespace` (None: unknown which)."""
        for index in self.catalog.for_namespace(namespace):
            for keeper in (self._keepers.get(index.key), self._previous.get(index.key)):
                if keeper is not None:
                    keeper.notify(ids)

    # ----------------------------------------------------------------- following

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a keeper per catalog index until cancelled."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._sync(nursery)
                await self.catalog.next_change()

    def _sync(self, nursery: trio.Nursery) -> None:
        current = self.catalog.indexes
        for key in list(self._keepers):
            keeper = self._keepers[key]
            index = current.get(key)
            if index is None or index.id != keeper.index.id:
                self._retire(self._keepers.pop(key), remove_files=True)
                if key in self._previous:
                    self._retire(self._previous.pop(key), remove_files=True)
                shutil.rmtree(self.data_dir / index_directory_name(key), ignore_errors=True)
                self.metrics.forget_search_index(key)
                log.info("search index %s dropped: its local index is gone", key)
            elif keeper.layout == layout_of(index):
                keeper.index = index
            else:
                log.info("search index %s changed: rebuilding beside the current one", key)
                if key in self._previous:  # a build already replacing it: never served
                    self._retire(self._keepers[key], remove_files=True)
                else:
                    self._previous[key] = keeper
                self._start(nursery, index)
        for key, index in current.items():
            if key not in self._keepers:
                self._start(nursery, index)
        if not self._cleaned and self.catalog.loaded:
            self._cleaned = True
            known = {index_directory_name(key) for key in current}
            for directory in self.data_dir.iterdir():
                if directory.is_dir() and directory.name not in known:
                    log.info("removing the local index of a dropped search index: %s", directory)
                    shutil.rmtree(directory, ignore_errors=True)

    def _start(self, nursery: trio.Nursery, index: SearchIndex) -> None:
        keeper = Keeper(
            index,
            self.client,
            self.data_dir / index_directory_name(index.key),
            self.settings,
            self.metrics.search_index(index.key),
            on_ready=self._on_ready,
        )
        self._keepers[index.key] = keeper
        scope = self._scopes[id(keeper)] = trio.CancelScope()
        nursery.start_soon(self._run_keeper, keeper, scope)

    async def _run_keeper(self, keeper: Keeper, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await keeper.run()
        finally:
            self._scopes.pop(id(keeper), None)

    def _on_ready(self, keeper: Keeper) -> None:
        """A keeper is READY: the older layout it replaces stops and its files go."""
        key = keeper.index.key
        previous = self._previous.get(key)
        if self._keepers.get(key) is keeper and previous is not None:
            del self._previous[key]
            self._retire(previous, remove_files=True)
        for directory in keeper.directory.parent.glob("L*"):
            if directory != keeper.directory and key not in self._previous:
                shutil.rmtree(directory, ignore_errors=True)

    def _retire(self, keeper: Keeper, *, remove_files: bool) -> None:
        keeper.stop()
        scope = self._scopes.get(id(keeper))
        if scope is not None:
            scope.cancel()
        if remove_files:
            shutil.rmtree(keeper.directory, ignore_errors=True)
