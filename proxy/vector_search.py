"""`$vectorSearch` and `$listSearchIndexes`, the aggregation stages of MongoDB's vector
search, served by modelgate on any upstream.

An aggregate is looked at only when its body holds one of the two stage names (a bytes
search before any decoding). `$vectorSearch` (first stage only, as MongoDB has it) is
validated, its index found in the catalog (`$db` + the aggregate's collection), its
filter compiled, its `query` text embedded by the index's model (or its `queryVector`
taken), and the local index searched. The same goes for a `$vectorSearch` first in a
`$unionWith`'s sub-pipeline (MongoDB 8.0 on), on the `$unionWith`'s collection, whose
sub-pipeline becomes the one below. The rest of the pipeline then runs on the upstream,
on the client's own connection so that the cursor is the upstream's (getMore goes
straight through), over the matches in score order:

  {$match: {_id: {$in: ids}}}, {$addFields: {H.r: <rank of _id in ids>}},
  ({$addFields: {H.s: <score at that rank>}} when a later stage asks for the score),
  {$sort: {H.r: 1}}, ...later stages with {$meta: "vectorSearchScore"} as "$H.s"...,
  {$unset: H}  (before a final $out/$merge)

where H is a field name of modelgate's own. Without later stages the documents come back
as stored, without a score (as MongoDB gives them). An index that does not exist gives
no documents, as MongoDB does.

`$listSearchIndexes` is answered from the catalog and the local indexes' state, in
MongoDB's shape plus modelgate's counts (`modelgate: {indexed, pending, failed}`); later
stages run on the upstream over those documents ($documents)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from time import perf_counter_ns
from typing import Any

import bson
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument

from engine.batching import ModelServer, Prediction
from engine.documents import FAITHFUL
from engine.errors import BadValue, TypeMismatch
from engine.models import ModelSet
from engine.search.auto_embed import derived_model_name
from engine.search.catalog import SearchCatalog
from engine.search.definitions import AutoEmbedField, SearchIndex, VectorField
from engine.search.filters import VectorSearchQueryError, compile_filter
from engine.search.upkeep import SearchIndexes
from proxy.session import (
    AnswerLocally,
    CommandContext,
    ForwardRewritten,
    ForwardUnchanged,
    WriteDecision,
)
from proxy.vector_search_stage import (
    LIST_SEARCH_INDEXES,
    VECTOR_SEARCH,
    UnknownStageField,
    VectorSearchQuery,
    check_stage_positions,
    parse_vector_search,
    search_pipeline,
    stage_name,
    union_searches,
)
from proxy.wire.opmsg import OpMsg

__all__ = ["SearchWrites", "VectorSearchStages"]

_MARKERS = (VECTOR_SEARCH.encode(), LIST_SEARCH_INDEXES.encode())
_RAW = FAITHFUL.with_options(document_class=RawBSONDocument)


# -- the interceptor --------------------------------------------------------------------


class VectorSearchStages:
    """The session's interceptor of aggregates that hold a search stage (see the module's
    docstring); `models` embeds `query` text."""

    def __init__(
        self, catalog: SearchCatalog, indexes: SearchIndexes, models: ModelSet | None
    ) -> None:
        self.catalog = catalog
        self.indexes = indexes
        self.models = models

    def wants(self, body: bytes) -> bool:
        return _MARKERS[0] in body or _MARKERS[1] in body

    async def intercept(
        self, context: CommandContext, command: str, message: OpMsg
    ) -> WriteDecision:
        body = bson.decode(message.body, codec_options=FAITHFUL)
        pipeline = body.get("pipeline")
        collection = body.get(command)
        if not isinstance(pipeline, list) or not isinstance(collection, str):
            return ForwardUnchanged()  # the upstream refuses it as it would anyway
        check_stage_positions(pipeline)
        first = stage_name(pipeline[0]) if pipeline else None
        namespace = f"{body.get('$db')}.{collection}"
        # `$unionWith` sub-pipelines that begin with `$vectorSearch` (MongoDB 8.0 on):
        # each becomes a pipeline of its own matches, on its own collection.
        unions = list(union_searches(pipeline))
        for spec, union_collection in unions:
            inner = spec["pipeline"]
            union_namespace = f"{body.get('$db')}.{union_collection}"
            matches = await self._search(context, union_namespace, inner[0][VECTOR_SEARCH])
            spec["pipeline"] = search_pipeline(matches, inner[1:])
        if first == VECTOR_SEARCH:
            matches = await self._search(context, namespace, pipeline[0][VECTOR_SEARCH])
            body["pipeline"] = search_pipeline(matches, pipeline[1:])
        elif first == LIST_SEARCH_INDEXES:
            listing = self._listing(namespace, pipeline[0][LIST_SEARCH_INDEXES])
            if len(pipeline) == 1:
                cursor = {"id": Int64(0), "ns": namespace, "firstBatch": listing}
                return AnswerLocally({"cursor": cursor, "ok": 1.0})
            # Later stages run on the upstream, over the listing.
            body[command] = 1
            body["pipeline"] = [{"$documents": listing}, *pipeline[1:]]
        elif not unions:
            return ForwardUnchanged()  # the name was only inside a string
        encoded = bson.encode(body, codec_options=FAITHFUL)
        return ForwardRewritten(dataclasses.replace(message, body=encoded))

    async def _search(
        self, context: CommandContext, namespace: str, spec: Any
    ) -> list[tuple[Any, float]]:
        query = parse_vector_search(spec)
        index = self.catalog.get(namespace, query.index)
        if index is None:
            return []  # MongoDB answers a query of an index that does not exist with nothing
        field = index.definition.vector_field(query.path)
        if field is None:
            raise VectorSearchQueryError(f"Path '{query.path}' needs to be indexed as vector")
        compiled = None
        if query.filter is not None:
            compiled = compile_filter(query.filter, index.definition.filter_paths)
        if query.query_vector is not None:
            vector: Sequence[float] = query.query_vector
        else:
            assert query.query_text is not None
            vector = await self._embed(context, index, field, query)
        if len(vector) != field.num_dimensions:
            raise VectorSearchQueryError(
                f"vector field is indexed with {field.num_dimensions} dimensions but "
                f"queried with {len(vector)}"
            )
        state = self.indexes.state(index)
        if not state.queryable:
            raise VectorSearchQueryError(
                f"Search index '{index.name}' is not queryable while in state {state.status}"
                + (f": {state.message}" if state.message else "")
            )
        return await self.indexes.search(
            index,
            query.path,
            vector,
            num_candidates=query.num_candidates,
            limit=query.limit,
            filter=compiled,
            exact=query.exact,
        )

    async def _embed(
        self,
        context: CommandContext,
        index: SearchIndex,
        field: VectorField | AutoEmbedField,
        query: VectorSearchQuery,
    ) -> list[float]:
        """The query text's vector, by the model that embeds the index's documents."""
        if not isinstance(field, AutoEmbedField):
            raise VectorSearchQueryError(
                f"Path '{query.path}' is indexed as vector, not autoEmbed: a query by text "
                "needs an autoEmbed field (or give queryVector)"
            )
        model_name = field.model
        if query.model is not None and query.model != model_name:
            raise VectorSearchQueryError(
                f"\"model\" '{query.model}' differs from the index's model '{field.model}'"
            )
        server = self._embedding_server(index, model_name)
        if server is None and self.models is not None:
            # Registered but not loaded here yet (a process that has just started, or a
            # model registered since the last refresh): load it now rather than fail.
            await self.models.refresh()
            server = self._embedding_server(index, model_name)
        if server is None:
            raise VectorSearchQueryError(
                f"the model '{model_name}' of search index '{index.name}' is not served"
            )
        started = perf_counter_ns()
        try:
            (outcome,) = await server.predict_values([query.query_text])
        finally:
            context.inference_ns += perf_counter_ns() - started
        if not isinstance(outcome, Prediction):
            raise VectorSearchQueryError(
                f"the query could not be embedded by '{model_name}': {outcome.message}"
            )
        return [float(x) for x in outcome.value["vector"]]

    def _embedding_server(self, index: SearchIndex, model_name: str) -> ModelServer | None:
        if self.models is None:
            return None
        for name in _embedding_models(index, model_name):
            server = self.models.get(name)
            if server is not None:
                return server
        return None

    def _listing(self, namespace: str, spec: Any) -> list[dict[str, Any]]:
        if not isinstance(spec, Mapping):
            raise TypeMismatch(f"{LIST_SEARCH_INDEXES} value must be a document")
        for key in spec:
            if key not in ("name", "id"):
                raise UnknownStageField(
                    f"BSON field '{LIST_SEARCH_INDEXES}.{key}' is an unknown field."
                )
        if "name" in spec and "id" in spec:
            raise BadValue(f"Cannot set both 'name' and 'id' for {LIST_SEARCH_INDEXES}.")
        for key in ("name", "id"):
            if key in spec and not isinstance(spec[key], str):
                raise TypeMismatch(f"{LIST_SEARCH_INDEXES} '{key}' must be a string")
        if "name" in spec:
            found = self.catalog.get(namespace, spec["name"])
            indexes = [found] if found is not None else []
        elif "id" in spec:
            found = self.catalog.get_by_id(namespace, spec["id"])
            indexes = [found] if found is not None else []
        else:
            indexes = self.catalog.for_namespace(namespace)
        listing = []
        for index in indexes:
            state = self.indexes.state(index)
            counts = {"indexed": state.indexed, "pending": state.pending, "failed": state.failed}
            listing.append(
                index.listing(
                    status=state.status,
                    queryable=state.queryable,
                    message=state.message,
                    extra={"modelgate": counts},
                )
            )
        return listing


def _embedding_models(index: SearchIndex, model_name: str) -> Iterator[str]:
    """The served models that may embed an autoEmbed index's query text, in order of
    preference: the index's derived model (the version that embedded its documents),
    else the model the index names (the same ONNX, unless re-registered since)."""
    yield derived_model_name(index.namespace, index.name)
    yield model_name


# -- writes to indexed namespaces --------------------------------------------------------

_WRITES = frozenset({"insert", "update", "delete", "findAndModify", "findandmodify", "bulkWrite"})


class SearchWrites:
    """Tells the local indexes about writes the proxy forwarded to a namespace that has
    search indexes, so that they refresh those documents promptly. Costs nothing to a
    namespace without search indexes beyond a set lookup, and decodes nothing while no
    index exists at all."""

    commands = _WRITES

    def __init__(self, catalog: SearchCatalog, indexes: SearchIndexes) -> None:
        self.catalog = catalog
        self.indexes = indexes

    def after_write(self, command: str, message: OpMsg) -> Callable[[], None] | None:
        """What to call once the upstream has answered the write (None: nothing to do)."""
        if not self.catalog.indexes:
            return None
        body = RawBSONDocument(message.body, _RAW)
        database = body.get("$db")
        if command == "bulkWrite":
            namespaces = [str(info.get("ns")) for info in _sequence(body, message, "nsInfo")]
        else:
            namespaces = [f"{database}.{body.get(command)}"]
        namespaces = [ns for ns in dict.fromkeys(namespaces) if self.catalog.for_namespace(ns)]
        if not namespaces:
            return None
        ids = _inserted_ids(body, message) if command == "insert" else None
        notify = self.indexes.notify_written

        def written() -> None:
            for namespace in namespaces:
                notify(namespace, ids)

        return written


def _sequence(body: RawBSONDocument, message: OpMsg, name: str) -> list[Any]:
    for sequence in message.sequences:
        if sequence.identifier == name:
            return [RawBSONDocument(doc, _RAW) for doc in sequence.documents]
    value = body.get(name)
    return list(value) if isinstance(value, list) else []


def _inserted_ids(body: RawBSONDocument, message: OpMsg) -> list[Any] | None:
    """The _ids of an insert's documents; None if one has none (the upstream makes it)."""
    ids = []
    for document in _sequence(body, message, "documents"):
        if not isinstance(document, Mapping) or "_id" not in document:
            return None
        doc_id = document["_id"]
        if isinstance(doc_id, RawBSONDocument):
            doc_id = bson.decode(doc_id.raw, codec_options=FAITHFUL)
        ids.append(doc_id)
    return ids
