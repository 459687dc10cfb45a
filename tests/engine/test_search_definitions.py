"""Vector search index definitions (engine/search/definitions.py): what a valid definition
gives, that it round-trips, and the MongoDB-shaped error of every wrong one."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from engine.errors import BadValue, IndexAlreadyExists, IndexNotFound, ModelgateError, TypeMismatch
from engine.search.definitions import (
    AutoEmbedField,
    FilterField,
    SearchIndex,
    SearchIndexDefinition,
    SearchIndexTypeNotServed,
    VectorField,
    auto_embed_output,
    check_index_name,
    index_type,
)

VECTOR = {"type": "vector", "path": "embedding", "numDimensions": 4, "similarity": "cosine"}


def parse(*fields: Any, name: str = "default") -> SearchIndexDefinition:
    return SearchIndexDefinition.from_document({"fields": list(fields)}, index_name=name)


def test_vector_and_filter_fields() -> None:
    definition = parse(
        VECTOR, {"type": "filter", "path": "genre"}, {"type": "filter", "path": "year"}
    )
    assert definition.fields == (
        VectorField("embedding", 4, "cosine"),
        FilterField("genre"),
        FilterField("year"),
    )
    assert definition.vector_fields == (VectorField("embedding", 4, "cosine"),)
    assert definition.filter_paths == frozenset({"genre", "year"})
    assert definition.vector_field("embedding") == VectorField("embedding", 4, "cosine")
    assert definition.vector_field("genre") is None
    assert definition.auto_embed_fields == ()


@pytest.mark.parametrize("similarity", ["cosine", "euclidean", "dotProduct"])
def test_every_similarity(similarity: str) -> None:
    definition = parse({**VECTOR, "similarity": similarity})
    assert definition.fields[0] == VectorField("embedding", 4, similarity)


def test_dimensions_bounds_and_doubles() -> None:
    assert parse({**VECTOR, "numDimensions": 1}).fields[0].num_dimensions == 1  # type: ignore[union-attr]
    assert parse({**VECTOR, "numDimensions": 8192}).fields[0].num_dimensions == 8192  # type: ignore[union-attr]
    # mongosh sends numbers as doubles
    assert parse({**VECTOR, "numDimensions": 384.0}).fields[0].num_dimensions == 384  # type: ignore[union-attr]


def test_round_trip() -> None:
    doc = {
        "fields": [
            {
                **VECTOR,
                "quantization": "scalar",
                "hnswOptions": {"maxEdges": 32, "numEdgeCandidates": 200},
            },
            {"type": "filter", "path": "a.b"},
            {"type": "vector", "path": "v2", "numDimensions": 3, "similarity": "euclidean"},
        ]
    }
    definition = SearchIndexDefinition.from_document(doc)
    assert definition.to_document() == doc
    assert SearchIndexDefinition.from_document(definition.to_document()) == definition
    assert definition.fields[0] == VectorField("embedding", 4, "cosine", "scalar", 32, 200)


def test_auto_embed_field() -> None:
    doc = {"type": "autoEmbed", "modality": "text", "path": "plot", "model": "minilm"}
    definition = parse(doc, {"type": "filter", "path": "year"}, name="plots")
    field = definition.fields[0]
    assert field == AutoEmbedField(
        path="plot",
        model="minilm",
        modality="text",
        num_dimensions=0,  # until the catalog resolves it from the model
        similarity="cosine",
        vector_path="_autoEmbed.plots.vector",
    )
    assert definition.vector_field("plot") == field
    assert definition.auto_embed_fields == (field,)
    assert definition.to_document() == {"fields": [doc, {"type": "filter", "path": "year"}]}
    resolved = definition.with_dimensions({"plot": 384})
    assert resolved.fields[0].num_dimensions == 384  # type: ignore[union-attr]
    assert resolved.to_document() == definition.to_document()  # as the client sent it


def test_auto_embed_with_dimensions_and_similarity_given() -> None:
    doc = {
        "type": "autoEmbed",
        "modality": "text",
        "path": "plot",
        "model": "minilm",
        "numDimensions": 384,
        "similarity": "dotProduct",
    }
    definition = parse(doc)
    field = definition.fields[0]
    assert isinstance(field, AutoEmbedField)
    assert (field.num_dimensions, field.similarity) == (384, "dotProduct")
    assert definition.with_dimensions({"plot": 12}).fields[0].num_dimensions == 384  # type: ignore[union-attr]
    assert definition.to_document() == {"fields": [doc]}


def test_auto_embed_output_names() -> None:
    assert auto_embed_output("default") == "_autoEmbed.default"
    dotted = auto_embed_output("a.b")
    assert dotted.startswith("_autoEmbed.i") and "." not in dotted[len("_autoEmbed.") :]
    assert auto_embed_output("$x") != auto_embed_output("$y")
    field = parse(
        {"type": "autoEmbed", "modality": "text", "path": "t", "model": "m"}, name="a.b"
    ).fields[0]
    assert isinstance(field, AutoEmbedField) and field.vector_path == f"{dotted}.vector"


def test_listing_shape() -> None:
    created = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    index = SearchIndex("a" * 24, "vi", "db.c", parse(VECTOR), 3, created)
    assert index.key == "db.c/vi"
    listing = index.listing(status="READY", queryable=True, extra={"indexed": 5})
    assert listing == {
        "id": "a" * 24,
        "name": "vi",
        "type": "vectorSearch",
        "status": "READY",
        "queryable": True,
        "latestDefinitionVersion": {"version": 3, "createdAt": created},
        "latestDefinition": {"fields": [VECTOR]},
        "indexed": 5,
    }


# --------------------------------------------------------------------------- errors


def error_of(doc: Any) -> ModelgateError:
    with pytest.raises(ModelgateError) as caught:
        SearchIndexDefinition.from_document(doc)
    return caught.value


@pytest.mark.parametrize(
    ("doc", "error", "words"),
    [
        ([], TypeMismatch, "'definition' must be a document"),
        ({}, BadValue, "'fields' is required"),
        ({"fields": []}, BadValue, "at least one field of type 'vector' or 'autoEmbed'"),
        ({"fields": {}}, TypeMismatch, "'definition.fields' must be an array"),
        ({"fields": [VECTOR], "mappings": {}}, BadValue, "unknown field 'mappings'"),
        ({"fields": [5]}, TypeMismatch, "'definition.fields[0]' must be a document"),
        ({"fields": [{"path": "x"}]}, BadValue, "'definition.fields[0].type' is required"),
        ({"fields": [{"type": 1, "path": "x"}]}, TypeMismatch, "type' must be a string"),
        ({"fields": [{"type": "knnVector", "path": "x"}]}, BadValue, "got 'knnVector'"),
        (
            {"fields": [{"type": "filter", "path": "x"}]},
            BadValue,
            "at least one field of type 'vector' or 'autoEmbed'",
        ),
        ({"fields": [{**VECTOR, "dims": 3}]}, BadValue, "unknown field 'dims'"),
        (
            {"fields": [{k: v for k, v in VECTOR.items() if k != "path"}]},
            BadValue,
            "path' is required",
        ),
        ({"fields": [{**VECTOR, "path": 3}]}, TypeMismatch, "path' must be a string"),
        ({"fields": [{**VECTOR, "path": ""}]}, BadValue, "may not be empty"),
        ({"fields": [{**VECTOR, "path": "a\x00"}]}, BadValue, "contain NUL"),
        ({"fields": [{**VECTOR, "path": "a..b"}]}, BadValue, "empty part"),
        ({"fields": [{**VECTOR, "path": "a.$b"}]}, BadValue, "a part that starts with '$'"),
        ({"fields": [{**VECTOR, "path": "_id"}]}, BadValue, "may not be '_id'"),
        (
            {"fields": [{k: v for k, v in VECTOR.items() if k != "numDimensions"}]},
            BadValue,
            "numDimensions' is required",
        ),
        ({"fields": [{**VECTOR, "numDimensions": 0}]}, BadValue, "between 1 and 8192, got 0"),
        ({"fields": [{**VECTOR, "numDimensions": 8193}]}, BadValue, "between 1 and 8192, got 8193"),
        ({"fields": [{**VECTOR, "numDimensions": -4}]}, BadValue, "between 1 and 8192"),
        ({"fields": [{**VECTOR, "numDimensions": 4.5}]}, TypeMismatch, "must be an integer"),
        ({"fields": [{**VECTOR, "numDimensions": "4"}]}, TypeMismatch, "must be an integer"),
        ({"fields": [{**VECTOR, "numDimensions": True}]}, TypeMismatch, "must be an integer"),
        (
            {"fields": [{k: v for k, v in VECTOR.items() if k != "similarity"}]},
            BadValue,
            "similarity' is required",
        ),
        ({"fields": [{**VECTOR, "similarity": "l2"}]}, BadValue, "got 'l2'"),
        ({"fields": [{**VECTOR, "similarity": 1}]}, TypeMismatch, "similarity' must be a string"),
        ({"fields": [{**VECTOR, "quantization": "pq"}]}, BadValue, "quantization' must be one of"),
        (
            {"fields": [{**VECTOR, "hnswOptions": 3}]},
            TypeMismatch,
            "hnswOptions' must be a document",
        ),
        ({"fields": [{**VECTOR, "hnswOptions": {"m": 3}}]}, BadValue, "unknown field 'm'"),
        (
            {"fields": [{**VECTOR, "hnswOptions": {"maxEdges": 8}}]},
            BadValue,
            "maxEdges' must be between 16 and 64",
        ),
        (
            {"fields": [{**VECTOR, "hnswOptions": {"numEdgeCandidates": 5000}}]},
            BadValue,
            "numEdgeCandidates' must be between 100 and 3200",
        ),
        ({"fields": [VECTOR, VECTOR]}, BadValue, "path 'embedding' is indexed twice"),
        (
            {"fields": [VECTOR, {"type": "filter", "path": "embedding"}]},
            BadValue,
            "path 'embedding' is indexed twice",
        ),
        ({"fields": [VECTOR, {"type": "filter"}]}, BadValue, "fields[1].path' is required"),
        (
            {"fields": [VECTOR, {"type": "filter", "path": "g", "x": 1}]},
            BadValue,
            "unknown field 'x'",
        ),
    ],
)
def test_invalid_definitions(doc: Any, error: type[ModelgateError], words: str) -> None:
    caught = error_of(doc)
    assert type(caught) is error
    assert words in caught.message


AUTO = {"type": "autoEmbed", "modality": "text", "path": "plot", "model": "minilm"}


@pytest.mark.parametrize(
    ("field", "error", "words"),
    [
        ({k: v for k, v in AUTO.items() if k != "model"}, BadValue, "model' is required"),
        ({**AUTO, "model": ""}, BadValue, "model' may not be empty"),
        ({**AUTO, "model": 7}, TypeMismatch, "model' must be a string"),
        ({k: v for k, v in AUTO.items() if k != "modality"}, BadValue, "modality' is required"),
        ({**AUTO, "modality": "image"}, BadValue, "got 'image'"),
        ({k: v for k, v in AUTO.items() if k != "path"}, BadValue, "path' is required"),
        ({**AUTO, "numDimensions": 0}, BadValue, "between 1 and 8192"),
        ({**AUTO, "similarity": "hamming"}, BadValue, "got 'hamming'"),
        ({**AUTO, "quantization": "none"}, BadValue, "unknown field 'quantization'"),
        ({**AUTO, "path": "_autoEmbed.x"}, BadValue, "modelgate's own embeddings"),
    ],
)
def test_invalid_auto_embed_fields(field: Any, error: type[ModelgateError], words: str) -> None:
    caught = error_of({"fields": [field]})
    assert type(caught) is error
    assert words in caught.message


def test_one_auto_embed_field_per_index() -> None:
    caught = error_of({"fields": [AUTO, {**AUTO, "path": "title"}]})
    assert isinstance(caught, BadValue) and "one 'autoEmbed' field per index" in caught.message


def test_index_types() -> None:
    assert index_type({"type": "vectorSearch", "definition": {}}) == "vectorSearch"
    # No type, and a vector search definition: what mongosh sends for createSearchIndex(name, def)
    assert index_type({"definition": {"fields": [VECTOR]}}) == "vectorSearch"
    for entry in ({"type": "search"}, {"definition": {"mappings": {"dynamic": True}}}, {}):
        with pytest.raises(SearchIndexTypeNotServed) as caught:
            index_type(entry)
        assert "modelgate serves vectorSearch indexes only" in caught.value.message
        assert caught.value.code == 2
    with pytest.raises(BadValue, match="unknown search index type 'vector'"):
        index_type({"type": "vector"})
    with pytest.raises(TypeMismatch):
        index_type({"type": 1})


def test_index_names() -> None:
    assert check_index_name("vector_index") == "vector_index"
    with pytest.raises(TypeMismatch):
        check_index_name(3)
    for bad in ("", "a\x00b"):
        with pytest.raises(BadValue, match="may not be empty or contain NUL"):
            check_index_name(bad)
    with pytest.raises(BadValue, match="longer than"):
        check_index_name("x" * 101)


def test_error_codes() -> None:
    assert (IndexNotFound("x").code, IndexNotFound("x").code_name) == (27, "IndexNotFound")
    assert (IndexAlreadyExists("x").code, IndexAlreadyExists("x").code_name) == (
        68,
        "IndexAlreadyExists",
    )
