"""Keeping one search index's local indexes current with MongoDB (one per vector path).

Life of a keeper:
1. Load the saved local indexes (engine.search.persist) if they are whole and of this
   index's layout (vector paths, dimensions, similarities, filter paths): READY at
   once, and a sweep follows in the background. Else build: open the change stream
   first (so that nothing written during the build is missed), read every document
   (projection: _id, vector paths, filter paths; in batches, progress logged) into
   fresh local indexes, then READY and save.
2. Then, together: the change stream (full documents looked up, so an event gives the
   document as it is now; resumed from the saved token after a restart, and if that
   fails a fresh stream and a sweep), the periodic sweep (a full rescan that adds,
   changes and removes whatever differs: documents written around modelgate on an
   upstream without change streams, events lost), refreshes of the _ids the proxy
   wrote (`notify`), and saves (at most every save_interval, when something changed).

A sweep's removals are checked: an _id the scan did not see is looked up again before
it is removed, since it may have been inserted after the scan passed its place.

An autoEmbed index (engine.search.embed_progress) builds only once its derived model's
initial sync is done (nothing pending, seen after the keeper started; a saved index of
this very index loads at once): BUILDING and not queryable until then, like MongoDB's
automated embedding. Its counts add the derived model's: pending = not embedded yet +
embedded and not yet in the local index, failed = + its error records.

Statuses (MongoDB's): BUILDING until the first build or load, READY, FAILED (the build
failed: retried every sweep interval), STALE (the change stream or the sweep failed
`stale_after` times in a row: still queryable, results may be behind). The MongoDB
work runs in worker threads on the proxy's own client; the local indexes lock
themselves, the keeper's own counters are guarded by its lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors
import trio

from engine.documents import FAITHFUL, MISSING, get_path
from engine.errors import ModelgateError
from engine.metrics import SearchIndexMetrics, SearchUpkeepErrorKind
from engine.search import persist
from engine.search.definitions import SearchIndex
from engine.search.embed_progress import EmbedProgress
from engine.search.filters import filter_values
from engine.search.layout import (
    IndexState,
    Layout,
    SearchSettings,
    fingerprint,
    layout_of,
    projection_of,
)
from engine.search.local_index import (
    LocalIndex,
    RowFilter,
    VectorInvalid,
    coerce_vector,
    default_threads,
    id_key,
)

__all__ = ["IndexState", "Keeper", "Layout", "SearchSettings", "layout_of", "projection_of"]

log = logging.getLogger(__name__)

_LOOKUP_CHUNK = 1000
#: Searches run on the event loop (Keeper.search): up to ~1 ms at 384 dimensions.
INLINE_CANDIDATES, INLINE_EXACT_ROWS = 1000, 20_000


class Keeper:
    """One search index's local indexes and their upkeep (see the module's docstring)."""

    def __init__(
        self,
        index: SearchIndex,
        client: pymongo.MongoClient[dict[str, Any]],
        directory: Path,
        settings: SearchSettings,
        metrics: SearchIndexMetrics,
        on_ready: Callable[[Keeper], None] | None = None,
    ) -> None:
        auto_embed = index.definition.auto_embed_fields
        self.embedding = (
            EmbedProgress(client, index.namespace, index.name, auto_embed[0])
            if auto_embed
            else None
        )
        self.index = index
        self.layout = layout_of(index)
        self.fields = {path: (dim, similarity) for path, dim, similarity in self.layout[0]}
        self.filter_paths = frozenset(self.layout[1])
        self.graph_options = {
            path: (edges, candidates) for path, edges, candidates in self.layout[2]
        }
        self.directory = directory / f"L{fingerprint(self.layout)}"
        self.settings = settings
        self.metrics = metrics
        self.on_ready = on_ready
        self.threads = settings.build_threads or default_threads()
        db, _, collection = index.namespace.partition(".")
        self.collection = client[db].get_collection(collection, codec_options=FAITHFUL)
        self.projection = projection_of([*self.fields, *self.filter_paths])
        self.locals: dict[str, LocalIndex] = {}
        self.status = "BUILDING"
        self.message: str | None = None
        self.token: Mapping[str, Any] | None = None
        self._lock = threading.Lock()
        self._failed: set[Any] = set()  # id_keys of documents with an unusable vector
        self._pending: dict[Any, Any] = {}  # id_key -> _id, written and not yet applied
        self._to_read = 0  # while building: documents not read yet
        self._rescan = False  # a sweep is wanted as soon as possible
        self._dirty = False
        self._failures = 0  # consecutive upkeep failures
        self._stop = False
        self._wake = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None

    @property
    def index(self) -> SearchIndex:
        return self._index

    @index.setter
    def index(self, index: SearchIndex) -> None:
        """The latest definition (of this layout): an autoEmbed field's path or model
        may have changed, and with it the derived model."""
        self._index = index
        auto_embed = index.definition.auto_embed_fields
        if self.embedding is not None and auto_embed:
            self.embedding.field = auto_embed[0]

    # ----------------------------------------------------------------- reading

    def state(self) -> IndexState:
        with self._lock:
            pending = len(self._pending) + self._to_read
            failed = len(self._failed)
        indexed = max((len(local) for local in self.locals.values()), default=0)
        if self.embedding is not None:
            # Not embedded yet, or embedded and not yet in the local index.
            counts = self.embedding.counts
            pending = counts.pending + max(0, counts.embedded - indexed - failed)
            failed += counts.failed
        queryable = self.status in {"READY", "STALE"}
        return IndexState(self.status, queryable, indexed, pending, failed, self.message)

    def _publish(self) -> None:
        state = self.state()
        self.metrics.indexed.set(state.indexed)
        self.metrics.pending.set(state.pending)
        self.metrics.failed.set(state.failed)

    async def search(
        self,
        vector_path: str,
        query: Sequence[float],
        *,
        limit: int,
        num_candidates: int,
        filter: RowFilter | None,
        exact: bool,
    ) -> list[tuple[Any, float]]:
        """A short search (no filter; a graph search of INLINE_CANDIDATES at most, an
        exact one of INLINE_EXACT_ROWS) runs on the event loop unless the index is being
        written (a hop to a worker thread and back costs more on a busy host); others in
        a worker thread."""
        local = self.locals[vector_path]
        started = time.perf_counter()
        short = len(local) <= INLINE_EXACT_ROWS if exact else num_candidates <= INLINE_CANDIDATES
        found = None
        if filter is None and short:
            found = local.search_now(query, limit=limit, num_candidates=num_candidates, exact=exact)
        if found is None:
            found = await trio.to_thread.run_sync(
                lambda: local.search(
                    query, limit=limit, num_candidates=num_candidates, filter=filter, exact=exact
                )
            )
        self.metrics.queries.inc()
        self.metrics.query_seconds.observe(time.perf_counter() - started)
        return found

    # ----------------------------------------------------------------- writes seen

    def notify(self, ids: Sequence[Any] | None) -> None:
        """Documents were written through the proxy (None: which ones is unknown)."""
        with self._lock:
            if ids is None:
                self._rescan = True
            else:
                for doc_id in ids:
                    self._pending[id_key(doc_id)] = doc_id
        self._wake.set()

    # ----------------------------------------------------------------- applying

    def _apply(
        self, locals: Mapping[str, LocalIndex], documents: Sequence[Mapping[str, Any]]
    ) -> None:
        """Put documents (as MongoDB has them now) into `locals`; documents without a
        vector at a path leave that local index, unusable ones count as failed."""
        upserts: dict[str, list[tuple[Any, Any, Mapping[str, Any]]]] = {p: [] for p in locals}
        removals: dict[str, list[Any]] = {p: [] for p in locals}
        failed: list[Any] = []
        fine: list[Any] = []
        for document in documents:
            doc_id = document["_id"]
            values = filter_values(document, self.filter_paths)
            bad = False
            for path, local in locals.items():
                raw = get_path(document, path)
                if raw is MISSING:
                    removals[path].append(doc_id)
                    continue
                try:
                    vector = coerce_vector(raw, local.dim)
                    local.prepare(vector)
                except VectorInvalid:
                    removals[path].append(doc_id)
                    bad = True
                    continue
                upserts[path].append((doc_id, vector, values))
            (failed if bad else fine).append(id_key(doc_id))
        for path, local in locals.items():
            local.remove_many(removals[path])
            local.upsert_many(upserts[path])
        with self._lock:
            self._failed.update(failed)
            self._failed.difference_update(fine)
            for key in (*failed, *fine):
                self._pending.pop(key, None)
            self._dirty = True

    def _forget(self, doc_ids: Iterable[Any]) -> None:
        doc_ids = list(doc_ids)
        for local in self.locals.values():
            local.remove_many(doc_ids)
        with self._lock:
            for doc_id in doc_ids:
                self._failed.discard(id_key(doc_id))
                self._pending.pop(id_key(doc_id), None)
            self._dirty = True

    def _lookup(self, doc_ids: list[Any]) -> None:
        """Read these documents now and apply them (absent ones are removed)."""
        for start in range(0, len(doc_ids), _LOOKUP_CHUNK):
            chunk = doc_ids[start : start + _LOOKUP_CHUNK]
            found = list(self.collection.find({"_id": {"$in": chunk}}, self.projection))
            self._apply(self.locals, found)
            seen = {id_key(d["_id"]) for d in found}
            self._forget(d for d in chunk if id_key(d) not in seen)

    def _scan(self, locals: Mapping[str, LocalIndex], building: bool) -> set[Any]:
        """Read every document into `locals`; the id_keys seen."""
        seen: set[Any] = set()
        if building:
            with self._lock:
                self._to_read = self.collection.estimated_document_count()
        started = last_log = time.monotonic()
        batch: list[Mapping[str, Any]] = []
        cursor = self.collection.find({}, self.projection, batch_size=self.settings.batch_size)
        with cursor:
            for document in cursor:
                batch.append(document)
                if len(batch) >= self.settings.batch_size:
                    self._apply_batch(locals, batch, seen, building)
                    batch = []
                    if self._stop:
                        return seen
                    if time.monotonic() - last_log >= self.settings.progress_interval:
                        last_log = time.monotonic()
                        log.info(
                            "search index %s: %s %d documents (%.0f/s)",
                            self.index.key, "built" if building else "swept", len(seen),
                            len(seen) / max(last_log - started, 1e-9),
                        )  # fmt: skip
            self._apply_batch(locals, batch, seen, building)
        return seen

    def _apply_batch(
        self,
        locals: Mapping[str, LocalIndex],
        batch: list[Mapping[str, Any]],
        seen: set[Any],
        building: bool,
    ) -> None:
        self._apply(locals, batch)
        seen.update(id_key(d["_id"]) for d in batch)
        if building:
            with self._lock:
                self._to_read = max(0, self._to_read - len(batch))
        self._publish()

    def _sweep(self) -> None:
        """Reconcile the local indexes with the collection (see the module's docstring)."""
        with self._lock:
            self._rescan = False
        seen = self._scan(self.locals, building=False)
        if self._stop:
            return
        candidates: dict[Any, Any] = {}
        for local in self.locals.values():
            for doc_id in local.ids():
                candidates.setdefault(id_key(doc_id), doc_id)
        missing = [doc_id for key, doc_id in candidates.items() if key not in seen]
        with self._lock:
            self._failed.intersection_update(seen)
        if missing:
            self._lookup(missing)

    def _build(self) -> dict[str, LocalIndex]:
        locals = {
            path: LocalIndex(
                dim,
                similarity,
                threads=self.threads,
                connectivity=self.graph_options.get(path, (None, None))[0],
                expansion_add=self.graph_options.get(path, (None, None))[1],
            )
            for path, (dim, similarity) in self.fields.items()
        }
        with self._lock:
            self._failed.clear()
        self._scan(locals, building=True)
        return locals

    # ----------------------------------------------------------------- change stream

    def _open_token(self) -> Mapping[str, Any] | None:
        """A resume token for "now" (None: the upstream has no change streams)."""
        with self.collection.watch(full_document="updateLookup", max_await_time_ms=1) as stream:
            stream.try_next()
            return stream.resume_token

    def _follow(self, token: Mapping[str, Any] | None, opened: Callable[[], None]) -> None:
        with self.collection.watch(
            full_document="updateLookup", resume_after=token, max_await_time_ms=500
        ) as stream:
            opened()
            while not self._stop and stream.alive:
                change = stream.try_next()
                if change is not None:
                    self._on_change(change)
                self.token = stream.resume_token

    def _on_change(self, change: Mapping[str, Any]) -> None:
        operation = change.get("operationType")
        key = (change.get("documentKey") or {}).get("_id", MISSING)
        if operation in {"insert", "update", "replace"} and key is not MISSING:
            document = change.get("fullDocument")
            if document is None:  # deleted since: the delete event follows
                self._forget([key])
            else:
                self._apply(self.locals, [document])
        elif operation == "delete" and key is not MISSING:
            self._forget([key])
        elif operation in {"drop", "rename", "dropDatabase", "invalidate"}:
            with self._lock:
                self._rescan = True
            if self._trio_token is not None:
                trio.from_thread.run_sync(self._wake.set, trio_token=self._trio_token)
        self._publish()

    # ----------------------------------------------------------------- running

    def _failure(self, kind: SearchUpkeepErrorKind, exc: BaseException) -> None:
        self.metrics.upkeep_errors[kind].inc()
        self._failures += 1
        log.warning("search index %s: %s failed: %s", self.index.key, kind, exc)
        if self._failures >= self.settings.stale_after and self.status == "READY":
            self.status = "STALE"
            self.message = f"{kind} failed {self._failures} times in a row: {exc}"

    def _success(self) -> None:
        self._failures = 0
        if self.status == "STALE":
            self.status, self.message = "READY", None

    def _ready(self) -> None:
        self.status, self.message = "READY", None
        self._publish()
        if self.on_ready is not None:
            self.on_ready(self)

    async def _thread(self, work: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def run(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        try:
            await self._run()
        finally:
            self._stop = True

    async def _run(self) -> None:
        token = await self._load()
        if not self.locals and self.embedding is not None:
            await self._follow_embedding(until_synced=True)
        while not self.locals:
            token = await self._first_build()
        async with trio.open_nursery() as nursery:
            if self.embedding is not None:
                nursery.start_soon(self._follow_embedding)
            if self.settings.change_streams:
                nursery.start_soon(self._watch, token)
            nursery.start_soon(self._sweep_periodically)
            nursery.start_soon(self._save_periodically)
            await self._refresh_forever()

    async def _follow_embedding(self, *, until_synced: bool = False) -> None:
        """autoEmbed: read the derived model's counts now and then; with `until_synced`,
        until its initial sync is done (the index BUILDING meanwhile, not queryable)."""
        assert self.embedding is not None
        while True:
            try:
                await self._thread(self.embedding.read)
            except (pymongo.errors.PyMongoError, ModelgateError) as exc:
                log.warning("search index %s: reading the progress of its derived model "
                            "failed: %s", self.index.key, exc)  # fmt: skip
            self._publish()
            if until_synced and self.embedding.synced:
                return
            pause = self.settings.embed_poll_interval
            await trio.sleep(max(pause, 10 * self.embedding.read_seconds))

    async def _load(self) -> Mapping[str, Any] | None:
        if not self.directory.exists():
            return None
        try:
            loaded = await self._thread(self._load_all)
        except persist.IndexDamaged as exc:
            self.metrics.upkeep_errors["load"].inc()
            log.warning("search index %s: saved index unusable (%s); rebuilding",
                        self.index.key, exc)  # fmt: skip
            return None
        self.locals, token = loaded
        log.info("search index %s: loaded %d documents from %s",
                 self.index.key, self.state().indexed, self.directory)  # fmt: skip
        with self._lock:
            self._rescan = True  # what changed while no process kept it
        self._ready()
        return token

    def _load_all(self) -> tuple[dict[str, LocalIndex], Mapping[str, Any] | None]:
        locals, tokens = {}, []
        for number, (path, (dim, similarity)) in enumerate(self.fields.items()):
            local, state = persist.load_index(self.directory / f"v{number}", threads=self.threads)
            if (local.dim, local.similarity) != (dim, similarity) or state.get("path") != path:
                raise persist.IndexDamaged("saved for another definition")
            if state.get("filterPaths") != sorted(self.filter_paths):
                raise persist.IndexDamaged("saved with other filter fields")
            if self.embedding is not None and state.get("indexId") != self.index.id:
                # An earlier autoEmbed index of this name: its vectors were cleared.
                raise persist.IndexDamaged("saved for an earlier index of this name")
            locals[path] = local
            tokens.append(state.get("token"))
        if any(token != tokens[0] for token in tokens):
            raise persist.IndexDamaged("the vector paths were saved at different times")
        return locals, tokens[0] if tokens else None

    async def _first_build(self) -> Mapping[str, Any] | None:
        token = None
        if self.settings.change_streams:
            try:
                token = await self._thread(self._open_token)
            except pymongo.errors.PyMongoError as exc:
                log.info("search index %s: no change stream (%s); sweeping only",
                         self.index.key, exc)  # fmt: skip
        started = time.perf_counter()
        try:
            locals = await self._thread(self._build)
        except pymongo.errors.PyMongoError as exc:
            self.metrics.upkeep_errors["build"].inc()
            self.status, self.message = "FAILED", f"building the index failed: {exc}"
            log.warning("search index %s: %s", self.index.key, self.message)
            await trio.sleep(self.settings.sweep_interval)
            return None
        seconds = time.perf_counter() - started
        self.metrics.build_seconds.observe(seconds)
        self.locals = locals
        self.token = token
        with self._lock:
            self._to_read = 0
            # Without a token the stream starts after the build: what was written
            # meanwhile is found by a rescan.
            self._rescan = self._rescan or (token is None and self.settings.change_streams)
        log.info("search index %s: built %d documents in %.1f s",
                 self.index.key, self.state().indexed, seconds)  # fmt: skip
        self._ready()
        await self._save()
        return token

    async def _watch(self, token: Mapping[str, Any] | None) -> None:
        refused_pause = self.settings.sweep_interval * 4
        while True:
            opened = False

            def mark_opened() -> None:
                nonlocal opened
                opened = True

            try:
                await self._thread(partial(self._follow, token, mark_opened))
                token = self.token  # ended by a drop or rename: follow on, after a sweep
                with self._lock:
                    self._rescan = True
                self._wake.set()
                await trio.sleep(1.0)
            except pymongo.errors.OperationFailure as exc:
                if token is not None and not opened:
                    log.info("search index %s: cannot resume the change stream (%s); "
                             "rescanning", self.index.key, exc)  # fmt: skip
                    token = self.token = None
                    with self._lock:
                        self._rescan = True
                    self._wake.set()
                    continue
                if not opened:
                    log.info("search index %s: no change stream (%s); sweeping only",
                             self.index.key, exc)  # fmt: skip
                else:
                    self._failure("change_stream", exc)
                await trio.sleep(refused_pause)
            except pymongo.errors.PyMongoError as exc:
                self._failure("change_stream", exc)
                token = self.token
                await trio.sleep(min(self.settings.sweep_interval, 5.0))

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(self.settings.sweep_interval)
            with self._lock:
                self._rescan = True
            self._wake.set()

    async def _refresh_forever(self) -> None:
        """Apply what `notify` and the stream asked for: written _ids, and rescans."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            with self._lock:
                ids = list(self._pending.values())
                rescan = self._rescan
            try:
                if rescan:
                    await self._thread(self._sweep)
                elif ids:
                    await self._thread(partial(self._lookup, ids))
                self._success()
            except pymongo.errors.PyMongoError as exc:
                self._failure("sweep" if rescan else "refresh", exc)
                await trio.sleep(min(self.settings.sweep_interval, 5.0))
                self._wake.set()
            self._publish()

    async def _save_periodically(self) -> None:
        while True:
            await trio.sleep(self.settings.save_interval)
            if self._dirty:
                await self._save()

    async def _save(self) -> None:
        with self._lock:
            self._dirty = False
        token = self.token  # before the snapshots: replaying from it is harmless
        try:
            await self._thread(lambda: self._save_all(token))
        except (OSError, ValueError, persist.IndexDamaged) as exc:
            self._dirty = True
            self.metrics.upkeep_errors["save"].inc()
            log.warning("search index %s: saving failed: %s", self.index.key, exc)

    def _save_all(self, token: Mapping[str, Any] | None) -> None:
        for number, (path, local) in enumerate(self.locals.items()):
            if self._stop:
                return
            state = {
                "indexId": self.index.id,
                "path": path,
                "filterPaths": sorted(self.filter_paths),
                "token": token,
            }
            persist.save_index(self.directory / f"v{number}", local, state)

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(RuntimeError):
            self._wake.set()
