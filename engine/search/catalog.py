"""The search index catalog: every vectorSearch index's definition, persisted in MongoDB
so that every modelgate process on the same upstream serves the same indexes and a
restart loses none.

Collection `modelgate.searchIndexes`, one document per index:
  {_id: <24 hex characters, like Atlas's ids>, name, namespace: "db.coll",
   type: "vectorSearch", definition: {fields: [...]} (the latest, as the client sent it),
   version: 0 first, +1 per update, createdAt: when this version was made,
   autoEmbed: {path, model, modelVersion, numDimensions, derivedModel} (autoEmbed indexes)}
with a unique index on (namespace, name).

Each process keeps the catalog in memory (`indexes`) and in step with MongoDB by polling
it (`refresh_forever`), like the model set; whoever follows it (the local indexes) waits
on `next_change`. Changes go through `create`/`update`/`drop`, which the search index
commands call; the MongoDB work runs in worker threads on the proxy's own client."""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import pymongo
import pymongo.errors
import trio
from bson import ObjectId

from engine.batching import ModelServer
from engine.errors import BadValue, IndexAlreadyExists, IndexNotFound, ModelgateError
from engine.models import ModelSet
from engine.registry import DATABASE
from engine.search.auto_embed import AutoEmbedder, AutoEmbedSource, derived_model_name
from engine.search.definitions import (
    AutoEmbedField,
    SearchIndex,
    SearchIndexDefinition,
    check_index_name,
)
from engine.upstream_failures import upstream_failure

__all__ = ["COLLECTION", "SearchCatalog"]

log = logging.getLogger(__name__)

COLLECTION = "searchIndexes"


def _now() -> datetime.datetime:
    # What MongoDB stores: milliseconds.
    now = datetime.datetime.now(datetime.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)


class SearchCatalog:
    def __init__(
        self,
        client: pymongo.MongoClient[dict[str, Any]],
        database: str = DATABASE,
        *,
        models: ModelSet | None = None,
        prepare: Callable[[ModelServer], Awaitable[None]] | None = None,
    ) -> None:
        """`models`: the model set, for autoEmbed fields (without it they are refused);
        `prepare`: DeferredWorkers.prepare, run for a derived model before the reply."""
        self.client = client
        self.collection = client[database][COLLECTION]
        self.auto_embed = (
            AutoEmbedder(models, client, prepare=prepare) if models is not None else None
        )
        self._indexes: dict[str, SearchIndex] = {}
        self._by_namespace: dict[str, list[SearchIndex]] = {}
        self._changed = trio.Event()
        self._lock = trio.Lock()  # one change (or refresh) at a time in this process
        self._index_ready = False
        self._loaded = False

    # -- lookups -------------------------------------------------------------------------

    @property
    def indexes(self) -> dict[str, SearchIndex]:
        """Every index, by its key (`namespace/name`)."""
        return self._indexes

    @property
    def loaded(self) -> bool:
        """Whether the catalog has been read from MongoDB once."""
        return self._loaded

    def get(self, namespace: str, name: str) -> SearchIndex | None:
        return self._indexes.get(f"{namespace}/{name}")

    def get_by_id(self, namespace: str, index_id: str) -> SearchIndex | None:
        for index in self.for_namespace(namespace):
            if index.id == index_id:
                return index
        return None

    def for_namespace(self, namespace: str) -> list[SearchIndex]:
        return list(self._by_namespace.get(namespace, ()))

    async def next_change(self) -> None:
        """Return once an index is created, updated or dropped (here or, seen by a
        refresh, through another process). Looking at `indexes` and then waiting here
        misses nothing: there is no checkpoint between."""
        await self._changed.wait()

    # -- keeping in step -----------------------------------------------------------------

    async def refresh(self) -> None:
        async with self._lock:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        documents = await trio.to_thread.run_sync(self._read_all)
        indexes: dict[str, SearchIndex] = {}
        for document in documents:
            try:
                index = self._index(document)
            except ModelgateError as exc:
                log.error("search index %r is not servable: %s", document.get("_id"), exc)
                continue
            indexes[index.key] = index
        self._loaded = True
        if indexes != self._indexes:
            self._install(indexes)

    async def refresh_forever(self, interval: float) -> None:
        while True:
            with _logged("search index catalog refresh failed"):
                await self.refresh()
            await trio.sleep(interval)

    def _install(self, indexes: dict[str, SearchIndex]) -> None:
        by_namespace: dict[str, list[SearchIndex]] = {}
        for index in sorted(indexes.values(), key=lambda i: i.name):
            by_namespace.setdefault(index.namespace, []).append(index)
        self._indexes = indexes
        self._by_namespace = by_namespace
        self._changed.set()
        self._changed = trio.Event()

    @staticmethod
    def _index(document: Mapping[str, Any]) -> SearchIndex:
        name = str(document["name"])
        definition = SearchIndexDefinition.from_document(document["definition"], index_name=name)
        auto_embed = document.get("autoEmbed")
        if isinstance(auto_embed, Mapping):
            definition = definition.with_dimensions(
                {str(auto_embed["path"]): int(auto_embed["numDimensions"])}
            )
        return SearchIndex(
            id=str(document["_id"]),
            name=name,
            namespace=str(document["namespace"]),
            definition=definition,
            version=int(document["version"]),
            created_at=_utc(document["createdAt"]),
            type=str(document.get("type", "vectorSearch")),
        )

    # -- MongoDB (worker threads) --------------------------------------------------------

    def _run(self, doing: str, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except pymongo.errors.DuplicateKeyError:
            raise
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, doing) from exc

    def _read_all(self) -> list[dict[str, Any]]:
        documents: list[dict[str, Any]] = self._run(
            "reading the search index catalog", lambda: list(self.collection.find())
        )
        return documents

    def find(
        self, namespace: str, name: str | None = None, index_id: str | None = None
    ) -> dict[str, Any] | None:
        """The stored document of an index, by name or id (synchronous)."""
        query: dict[str, Any] = {"namespace": namespace}
        if name is not None:
            query["name"] = name
        if index_id is not None:
            query["_id"] = index_id
        found: dict[str, Any] | None = self._run(
            f"reading search indexes of {namespace}", lambda: self.collection.find_one(query)
        )
        return found

    # -- changes -------------------------------------------------------------------------

    async def create(
        self, namespace: str, name: str, definition_doc: Mapping[str, Any]
    ) -> SearchIndex:
        """Store a new index (version 0); IndexAlreadyExists if the name is taken on the
        collection. An autoEmbed field's derived model is registered before the reply."""
        name = check_index_name(name)
        definition = SearchIndexDefinition.from_document(definition_doc, index_name=name)
        async with self._lock:
            existing = await trio.to_thread.run_sync(self.find, namespace, name)
            if existing is not None:
                raise _already_exists(namespace, name)
            source, field = await self._resolve(definition)
            document: dict[str, Any] = {
                "_id": str(ObjectId()),
                "name": name,
                "namespace": namespace,
                "type": "vectorSearch",
                "definition": definition.to_document(),
                "version": 0,
                "createdAt": _now(),
            }
            if source is not None and field is not None:
                document["autoEmbed"] = _bookkeeping(namespace, name, field, source)

            def insert() -> None:
                # The unique index keeps two processes from creating the same name;
                # made by the first creation (reading the catalog needs no more rights).
                if not self._index_ready:
                    self.collection.create_index([("namespace", 1), ("name", 1)], unique=True)
                    self._index_ready = True
                self.collection.insert_one(document)

            try:
                await trio.to_thread.run_sync(self._run, f"storing search index '{name}'", insert)
            except pymongo.errors.DuplicateKeyError as exc:
                raise _already_exists(namespace, name) from exc
            if source is not None and field is not None:
                assert self.auto_embed is not None
                try:
                    # Outputs of an earlier index of this name would pass for done.
                    await self.auto_embed.clear_outputs(namespace, name)
                    await self.auto_embed.derive(namespace, name, field, source)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self._delete, document["_id"])
                    raise
            await self._refresh_locked()
        index = self._index(document)
        log.info("created search index '%s' on %s", name, namespace)
        return index

    async def update(
        self,
        namespace: str,
        name: str | None,
        definition_doc: Mapping[str, Any],
        *,
        index_id: str | None = None,
    ) -> SearchIndex:
        """Replace an index's definition (version + 1). An autoEmbed field whose model or
        path changed gets its derived model re-registered (a new version, which re-embeds
        every document); one removed has its derived model dropped."""
        async with self._lock:
            previous = await self._stored(namespace, name, index_id)
            name = str(previous["name"])
            definition = SearchIndexDefinition.from_document(definition_doc, index_name=name)
            source, field = await self._resolve(definition)
            before = previous.get("autoEmbed")
            after = (
                _bookkeeping(namespace, name, field, source)
                if source is not None and field is not None
                else None
            )
            changes: dict[str, Any] = {
                "$set": {"definition": definition.to_document(), "createdAt": _now()},
                "$inc": {"version": 1},
            }
            if after is not None:
                changes["$set"]["autoEmbed"] = after
            else:
                changes["$unset"] = {"autoEmbed": ""}

            def store() -> dict[str, Any] | None:
                found: dict[str, Any] | None = self.collection.find_one_and_update(
                    {"_id": previous["_id"]},
                    changes,
                    return_document=pymongo.ReturnDocument.AFTER,
                )
                return found

            updated = await trio.to_thread.run_sync(
                self._run, f"updating search index '{name}'", store
            )
            if updated is None:
                raise _not_found(namespace, name, None)
            if self.auto_embed is not None:
                if after is None and isinstance(before, Mapping):
                    await self.auto_embed.drop(namespace, name)
                elif (
                    source is not None
                    and field is not None
                    and _derivation(before) != _derivation(after)
                ):
                    await self.auto_embed.derive(namespace, name, field, source)
            await self._refresh_locked()
        log.info("updated search index '%s' on %s (v%d)", name, namespace, updated["version"])
        return self._index(updated)

    async def drop(
        self, namespace: str, name: str | None = None, *, index_id: str | None = None
    ) -> str:
        """Remove an index (by name or id); its derived model (autoEmbed) goes with it.
        Returns the dropped index's name."""
        async with self._lock:
            previous = await self._stored(namespace, name, index_id)
            dropped = str(previous["name"])
            await trio.to_thread.run_sync(self._delete, previous["_id"])
            if self.auto_embed is not None and previous.get("autoEmbed") is not None:
                await self.auto_embed.drop(namespace, dropped)
            await self._refresh_locked()
        log.info("dropped search index '%s' on %s", dropped, namespace)
        return dropped

    async def _stored(
        self, namespace: str, name: str | None, index_id: str | None
    ) -> dict[str, Any]:
        found = await trio.to_thread.run_sync(self.find, namespace, name, index_id)
        if found is None:
            raise _not_found(namespace, name, index_id)
        return found

    def _delete(self, index_id: str) -> None:
        self._run("dropping a search index", lambda: self.collection.delete_one({"_id": index_id}))

    async def _resolve(
        self, definition: SearchIndexDefinition
    ) -> tuple[AutoEmbedSource | None, AutoEmbedField | None]:
        fields = definition.auto_embed_fields
        if not fields:
            return None, None
        if self.auto_embed is None:
            raise BadValue("this modelgate process serves no models: autoEmbed is off")
        return await self.auto_embed.resolve(fields[0]), fields[0]


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Log a ModelgateError instead of raising it (background work carries on)."""
    try:
        yield
    except ModelgateError as exc:
        log.warning("%s: %s", what, exc)


def _bookkeeping(
    namespace: str, name: str, field: AutoEmbedField, source: AutoEmbedSource
) -> dict[str, Any]:
    return {
        "path": field.path,
        "model": source.model,
        "modelVersion": source.version,
        "numDimensions": source.num_dimensions,
        "derivedModel": derived_model_name(namespace, name),
    }


def _derivation(bookkeeping: Any) -> tuple[Any, ...] | None:
    """What, when it changes, makes the derived model be registered again."""
    if not isinstance(bookkeeping, Mapping):
        return None
    return (bookkeeping.get("path"), bookkeeping.get("model"), bookkeeping.get("modelVersion"))


def _already_exists(namespace: str, name: str) -> IndexAlreadyExists:
    return IndexAlreadyExists(
        f"Duplicate Index: a search index named '{name}' already exists on {namespace}"
    )


def _not_found(namespace: str, name: str | None, index_id: str | None) -> IndexNotFound:
    which = f"named '{name}'" if name is not None else f"with id '{index_id}'"
    return IndexNotFound(f"no search index {which} on {namespace}")
