"""Vector search index definitions, as MongoDB's `vectorSearch` indexes have them, as
frozen dataclasses the rest of modelgate takes already validated.

A definition is `{fields: [...]}` of
  {type: "vector", path, numDimensions, similarity[, quantization, hnswOptions]}
  {type: "filter", path}
  {type: "autoEmbed", modality: "text", path, model[, numDimensions, similarity]}
`SearchIndexDefinition.from_document` is the one validation: every wrong value becomes a
MongoDB-shaped error (BadValue for wrong values, TypeMismatch for wrong types). Whether an
autoEmbed field's model exists, and what its vectors' dimension is, only the model set
knows: the catalog checks that (engine.search.auto_embed) and fills in `num_dimensions`.

Only `vectorSearch` indexes are served: an Atlas Search (`search`, full-text) index is
refused with SearchIndexTypeNotServed (with --search passthrough the proxy forwards these
commands to an upstream that has search of its own)."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine.errors import BadValue, TypeMismatch

__all__ = [
    "AUTO_EMBED_ROOT",
    "MAX_DIMENSIONS",
    "MODALITIES",
    "QUANTIZATIONS",
    "SIMILARITIES",
    "AutoEmbedField",
    "FilterField",
    "SearchIndex",
    "SearchIndexDefinition",
    "SearchIndexTypeNotServed",
    "VectorField",
    "auto_embed_output",
    "check_index_name",
    "index_type",
]

SIMILARITIES = ("cosine", "euclidean", "dotProduct")
QUANTIZATIONS = ("none", "scalar", "binary")
MODALITIES = ("text",)
MAX_DIMENSIONS = 8192
MAX_INDEX_NAME_LENGTH = 100
#: Where derived autoEmbed models store their outputs: `_autoEmbed.<index name>`.
AUTO_EMBED_ROOT = "_autoEmbed"
# hnswOptions, as MongoDB bounds them.
_MAX_EDGES = (16, 64)
_NUM_EDGE_CANDIDATES = (100, 3200)


class SearchIndexTypeNotServed(BadValue):
    """An index type modelgate does not serve (Atlas Search's full-text `search`)."""


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class VectorField:
    """Vectors already in the documents (a model's output, or the application's own)."""

    path: str
    num_dimensions: int
    similarity: str
    quantization: str = "none"  # accepted and kept; the local index stores float32
    max_edges: int | None = None  # hnswOptions, kept as given
    num_edge_candidates: int | None = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": "vector",
            "path": self.path,
            "numDimensions": self.num_dimensions,
            "similarity": self.similarity,
        }
        if self.quantization != "none":
            doc["quantization"] = self.quantization
        hnsw: dict[str, int] = {}
        if self.max_edges is not None:
            hnsw["maxEdges"] = self.max_edges
        if self.num_edge_candidates is not None:
            hnsw["numEdgeCandidates"] = self.num_edge_candidates
        if hnsw:
            doc["hnswOptions"] = hnsw
        return doc


@dataclass(frozen=True)
class FilterField:
    path: str

    def to_document(self) -> dict[str, Any]:
        return {"type": "filter", "path": self.path}


@dataclass(frozen=True)
class AutoEmbedField:
    """Text at `path` that modelgate embeds with `model` (a registered text embedding
    model) through a derived deferred model, which stores vectors at `vector_path`.

    `num_dimensions` is 0 until the catalog resolves it from the model (unless the client
    gave numDimensions); `given_dimensions`/`given_similarity` say what the client sent,
    so that `to_document` gives back the client's definition."""

    path: str
    model: str
    modality: str
    num_dimensions: int
    similarity: str
    vector_path: str
    given_dimensions: bool = False
    given_similarity: bool = False

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": "autoEmbed",
            "modality": self.modality,
            "path": self.path,
            "model": self.model,
        }
        if self.given_dimensions:
            doc["numDimensions"] = self.num_dimensions
        if self.given_similarity:
            doc["similarity"] = self.similarity
        return doc


Field = VectorField | FilterField | AutoEmbedField
SearchableField = VectorField | AutoEmbedField


@dataclass(frozen=True)
class SearchIndexDefinition:
    fields: tuple[Field, ...]

    @property
    def vector_fields(self) -> tuple[SearchableField, ...]:
        return tuple(f for f in self.fields if isinstance(f, VectorField | AutoEmbedField))

    @property
    def auto_embed_fields(self) -> tuple[AutoEmbedField, ...]:
        return tuple(f for f in self.fields if isinstance(f, AutoEmbedField))

    @property
    def filter_paths(self) -> frozenset[str]:
        return frozenset(f.path for f in self.fields if isinstance(f, FilterField))

    def vector_field(self, path: str) -> SearchableField | None:
        """The field a `$vectorSearch` names by `path` (an autoEmbed field by its text path)."""
        for candidate in self.vector_fields:
            if candidate.path == path:
                return candidate
        return None

    def to_document(self) -> dict[str, Any]:
        return {"fields": [f.to_document() for f in self.fields]}

    def with_dimensions(self, dimensions: Mapping[str, int]) -> SearchIndexDefinition:
        """This definition with the autoEmbed fields' dimensions filled in, by text path
        (fields whose client gave numDimensions keep theirs)."""
        fields: list[Field] = []
        for f in self.fields:
            if isinstance(f, AutoEmbedField) and not f.given_dimensions and f.path in dimensions:
                f = replace(f, num_dimensions=dimensions[f.path])
            fields.append(f)
        return SearchIndexDefinition(tuple(fields))

    @classmethod
    def from_document(cls, doc: Any, *, index_name: str = "default") -> SearchIndexDefinition:
        """The validated definition of a `vectorSearch` index named `index_name` (the name
        places an autoEmbed field's vectors: `_autoEmbed.<index name>.vector`)."""
        if not isinstance(doc, Mapping):
            raise TypeMismatch(f"'definition' must be a document, got {_type_name(doc)}")
        for key in doc:
            if key != "fields":
                raise BadValue(
                    f"invalid vectorSearch index definition: unknown field '{key}' "
                    "(a vectorSearch definition has only 'fields')"
                )
        if "fields" not in doc:
            raise BadValue("invalid vectorSearch index definition: 'fields' is required")
        raw_fields = doc["fields"]
        if not isinstance(raw_fields, list | tuple):
            raise TypeMismatch(
                f"'definition.fields' must be an array, got {_type_name(raw_fields)}"
            )
        fields = tuple(_parse_field(i, value, index_name) for i, value in enumerate(raw_fields))
        _check_paths(fields)
        if not any(isinstance(f, VectorField | AutoEmbedField) for f in fields):
            raise BadValue(
                "invalid vectorSearch index definition: at least one field of type 'vector' "
                "or 'autoEmbed' is required"
            )
        if sum(isinstance(f, AutoEmbedField) for f in fields) > 1:
            raise BadValue(
                "invalid vectorSearch index definition: modelgate takes one 'autoEmbed' "
                "field per index (create one index per text field)"
            )
        return cls(fields)


@dataclass(frozen=True)
class SearchIndex:
    id: str  # 24 hex characters, like Atlas's
    name: str
    namespace: str  # "db.collection"
    definition: SearchIndexDefinition
    version: int  # 0 first, +1 per updateSearchIndex
    created_at: datetime.datetime  # when this version of the definition was made
    type: str = "vectorSearch"

    @property
    def key(self) -> str:
        """A stable name for local files and metrics."""
        return f"{self.namespace}/{self.name}"

    def listing(
        self,
        *,
        status: str,
        queryable: bool,
        message: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """This index as `$listSearchIndexes` gives it (`status`, `queryable` from the
        process that answers; `extra`: modelgate's own counts)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "status": status,
            "queryable": queryable,
            "latestDefinitionVersion": {"version": self.version, "createdAt": self.created_at},
            "latestDefinition": self.definition.to_document(),
        }
        if message is not None:
            doc["message"] = message
        if extra:
            doc.update(extra)
        return doc


# --------------------------------------------------------------------------- parsing


def index_type(entry: Mapping[str, Any]) -> str:
    """The type of an index a client creates: the `type` it names, else MongoDB's default
    `search`, except that a definition with `fields` and no `mappings` (a vector search
    definition whose client left out the type, e.g. mongosh's createSearchIndex(name,
    definition)) is taken as `vectorSearch`."""
    value = entry.get("type")
    if value is None:
        definition = entry.get("definition")
        if (
            isinstance(definition, Mapping)
            and "fields" in definition
            and "mappings" not in definition
        ):
            return "vectorSearch"
        value = "search"
    if not isinstance(value, str):
        raise TypeMismatch(f"search index 'type' must be a string, got {_type_name(value)}")
    if value == "search":
        raise SearchIndexTypeNotServed(
            "modelgate serves vectorSearch indexes only: an Atlas Search ('search', "
            "full-text) index needs a MongoDB with search of its own (Atlas or mongot; "
            "run modelgate with --search passthrough to forward search commands to it)"
        )
    if value != "vectorSearch":
        raise BadValue(f"unknown search index type '{value}': expected 'vectorSearch'")
    return value


def check_index_name(value: Any) -> str:
    name = _text("search index 'name'", value)
    if len(name) > MAX_INDEX_NAME_LENGTH:
        raise BadValue(f"search index 'name' is longer than {MAX_INDEX_NAME_LENGTH} characters")
    return name


def auto_embed_output(index_name: str) -> str:
    """The output field of an index's derived model: `_autoEmbed.<index name>`, or, for a
    name that is not a plain field name ('.', leading '$'), `_autoEmbed.i<hash>`."""
    if "." in index_name or index_name.startswith("$"):
        return f"{AUTO_EMBED_ROOT}.i{hashlib.sha256(index_name.encode()).hexdigest()[:16]}"
    return f"{AUTO_EMBED_ROOT}.{index_name}"


def _type_name(value: Any) -> str:
    return type(value).__name__


def _parse_field(i: int, value: Any, index_name: str) -> Field:
    where = f"definition.fields[{i}]"
    if not isinstance(value, Mapping):
        raise TypeMismatch(f"'{where}' must be a document, got {_type_name(value)}")
    if "type" not in value:
        raise BadValue(f"'{where}.type' is required: 'vector', 'filter' or 'autoEmbed'")
    kind = value["type"]
    if not isinstance(kind, str):
        raise TypeMismatch(f"'{where}.type' must be a string, got {_type_name(kind)}")
    if kind == "vector":
        _check_keys(
            where,
            value,
            {"type", "path", "numDimensions", "similarity", "quantization", "hnswOptions"},
        )
        return _vector_field(where, value)
    if kind == "filter":
        _check_keys(where, value, {"type", "path"})
        return FilterField(_path(where, value))
    if kind == "autoEmbed":
        _check_keys(
            where, value, {"type", "path", "model", "modality", "numDimensions", "similarity"}
        )
        return _auto_embed_field(where, value, index_name)
    raise BadValue(f"'{where}.type' must be 'vector', 'filter' or 'autoEmbed', got '{kind}'")


def _check_keys(where: str, doc: Mapping[str, Any], allowed: set[str]) -> None:
    for key in doc:
        if key not in allowed:
            raise BadValue(f"'{where}': unknown field '{key}' for type '{doc['type']}'")


def _text(what: str, value: Any) -> str:
    """A non-empty string without NUL."""
    if not isinstance(value, str):
        raise TypeMismatch(f"{what} must be a string, got {_type_name(value)}")
    if not value or "\x00" in value:
        raise BadValue(f"{what} may not be empty or contain NUL")
    return value


def _path(where: str, doc: Mapping[str, Any]) -> str:
    if "path" not in doc:
        raise BadValue(f"'{where}.path' is required")
    path = _text(f"'{where}.path'", doc["path"])
    for part in path.split("."):
        if not part or part.startswith("$"):
            raise BadValue(
                f"'{where}.path' '{path}' has an empty part or a part that starts with '$'"
            )
    if path == "_id" and doc.get("type") != "filter":
        raise BadValue(f"'{where}.path' may not be '_id'")
    return path


def _number(where: str, value: Any, low: int, high: int) -> int:
    """An integer in low..high (a double with an integer value too: mongosh sends those)."""
    integral = isinstance(value, float) and value.is_integer()
    if not integral and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeMismatch(f"'{where}' must be an integer, got {_type_name(value)}")
    number = int(value)
    if number < low or number > high:
        raise BadValue(f"'{where}' must be between {low} and {high}, got {number}")
    return number


def _dimensions(where: str, doc: Mapping[str, Any]) -> int:
    if "numDimensions" not in doc:
        raise BadValue(f"'{where}.numDimensions' is required")
    return _number(f"{where}.numDimensions", doc["numDimensions"], 1, MAX_DIMENSIONS)


def _option(where: str, doc: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    """doc[key], one of `allowed`; the first of them when `key` is absent and optional
    (`required` is said by the caller checking presence first)."""
    value = doc.get(key, allowed[0])
    if not isinstance(value, str):
        raise TypeMismatch(f"'{where}.{key}' must be a string, got {_type_name(value)}")
    if value in allowed:
        return value
    options = ", ".join(f"'{a}'" for a in allowed)
    raise BadValue(f"'{where}.{key}' must be one of {options}, got '{value}'")


def _similarity(where: str, doc: Mapping[str, Any]) -> str:
    if "similarity" not in doc:
        raise BadValue(
            f"'{where}.similarity' is required: one of 'cosine', 'euclidean', 'dotProduct'"
        )
    return _option(where, doc, "similarity", SIMILARITIES)


def _vector_field(where: str, doc: Mapping[str, Any]) -> VectorField:
    path = _path(where, doc)
    dimensions = _dimensions(where, doc)
    similarity = _similarity(where, doc)
    quantization = _option(where, doc, "quantization", QUANTIZATIONS)
    hnsw = doc.get("hnswOptions", {})
    if not isinstance(hnsw, Mapping):
        raise TypeMismatch(f"'{where}.hnswOptions' must be a document, got {_type_name(hnsw)}")
    unknown = set(hnsw) - {"maxEdges", "numEdgeCandidates"}
    if unknown:
        raise BadValue(f"'{where}.hnswOptions': unknown field '{sorted(unknown)[0]}'")
    max_edges = hnsw.get("maxEdges")
    if max_edges is not None:
        max_edges = _number(f"{where}.hnswOptions.maxEdges", max_edges, *_MAX_EDGES)
    candidates = hnsw.get("numEdgeCandidates")
    if candidates is not None:
        where_candidates = f"{where}.hnswOptions.numEdgeCandidates"
        candidates = _number(where_candidates, candidates, *_NUM_EDGE_CANDIDATES)
    return VectorField(path, dimensions, similarity, quantization, max_edges, candidates)


def _auto_embed_field(where: str, doc: Mapping[str, Any], index_name: str) -> AutoEmbedField:
    path = _path(where, doc)
    for key, what in (("modality", "'text'"), ("model", "a modelgate text embedding model")):
        if key not in doc:
            raise BadValue(f"'{where}.{key}' is required: {what}")
    modality = _option(where, doc, "modality", MODALITIES)
    model = _text(f"'{where}.model'", doc["model"])
    given_dimensions = "numDimensions" in doc
    dimensions = _dimensions(where, doc) if given_dimensions else 0
    given_similarity = "similarity" in doc
    similarity = _similarity(where, doc) if given_similarity else "cosine"
    return AutoEmbedField(
        path=path,
        model=model,
        modality=modality,
        num_dimensions=dimensions,
        similarity=similarity,
        vector_path=f"{auto_embed_output(index_name)}.vector",
        given_dimensions=given_dimensions,
        given_similarity=given_similarity,
    )


def _check_paths(fields: tuple[Field, ...]) -> None:
    """No path indexed twice; no autoEmbed field reading modelgate's own embeddings."""
    seen: dict[str, int] = {}
    for i, f in enumerate(fields):
        if f.path in seen:
            raise BadValue(
                f"invalid vectorSearch index definition: path '{f.path}' is indexed twice "
                f"(definition.fields[{seen[f.path]}] and definition.fields[{i}])"
            )
        seen[f.path] = i
        root = f.path.split(".", 1)[0]
        if isinstance(f, AutoEmbedField) and root == AUTO_EMBED_ROOT:
            raise BadValue(
                f"an autoEmbed field may not read '{f.path}': '{AUTO_EMBED_ROOT}' holds "
                "modelgate's own embeddings"
            )
