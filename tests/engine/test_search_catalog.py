"""The search index catalog (engine/search/catalog.py) on a real SecantusDB: create,
update, drop and list, versions, duplicate names, persistence across catalogs (two
processes), next_change, and autoEmbed's derived models (engine/search/auto_embed.py)
with real onnxruntime sessions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pymongo
import pytest
import trio
import trio.testing

from bench.support import onnx_models, text_models
from engine.errors import BadValue, IndexAlreadyExists, IndexNotFound, ModelgateError, TypeMismatch
from engine.models import ModelSet
from engine.registry import ModelRegistry
from engine.runtime import RuntimeSettings
from engine.search.auto_embed import derived_model_name
from engine.search.catalog import SearchCatalog
from engine.search.definitions import (
    AutoEmbedField,
    SearchIndexTypeNotServed,
    VectorField,
)
from engine.spec import (
    ClassifyPostprocess,
    EmbeddingPostprocess,
    ModelSpec,
    TensorPreprocess,
    TextPreprocess,
)

Client = pymongo.MongoClient[dict[str, Any]]
RUNTIME = RuntimeSettings(providers=("CPUExecutionProvider",), intra_op_threads=1)
VECTOR = {"type": "vector", "path": "embedding", "numDimensions": 4, "similarity": "cosine"}
DEFINITION = {"fields": [VECTOR, {"type": "filter", "path": "genre"}]}


@pytest.fixture
def meta_db(request: pytest.FixtureRequest, direct: Client) -> Iterator[str]:
    """A database of the test's own for the catalog and the registry (modelgate's)."""
    name = "mgcat_" + re.sub(r"\W", "_", request.node.name)[:40]
    direct.drop_database(name)
    yield name
    direct.drop_database(name)


@pytest.fixture
def data_db(meta_db: str, direct: Client) -> Iterator[str]:
    name = meta_db.replace("mgcat_", "data_", 1)
    direct.drop_database(name)
    yield name
    direct.drop_database(name)


async def test_create_get_and_stored_document(direct: Client, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    index = await catalog.create("db.movies", "vi", DEFINITION)
    assert re.fullmatch(r"[0-9a-f]{24}", index.id)
    assert (index.name, index.namespace, index.version, index.type) == (
        "vi",
        "db.movies",
        0,
        "vectorSearch",
    )
    assert index.definition.vector_field("embedding") == VectorField("embedding", 4, "cosine")
    assert index.definition.filter_paths == {"genre"}
    assert catalog.get("db.movies", "vi") == index
    assert catalog.get_by_id("db.movies", index.id) == index
    assert catalog.for_namespace("db.movies") == [index]
    assert catalog.for_namespace("db.other") == []
    assert catalog.indexes == {"db.movies/vi": index}
    stored = direct[meta_db].searchIndexes.find_one({"_id": index.id})
    assert stored is not None
    assert {k: stored[k] for k in ("name", "namespace", "type", "definition", "version")} == {
        "name": "vi",
        "namespace": "db.movies",
        "type": "vectorSearch",
        "definition": DEFINITION,
        "version": 0,
    }
    assert stored["createdAt"].replace(tzinfo=index.created_at.tzinfo) == index.created_at
    unique = [i for i in direct[meta_db].searchIndexes.list_indexes() if i.get("unique")]
    assert [dict(i["key"]) for i in unique] == [{"namespace": 1, "name": 1}]


async def test_duplicate_names(direct: Client, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    await catalog.create("db.movies", "vi", DEFINITION)
    with pytest.raises(IndexAlreadyExists) as caught:
        await catalog.create("db.movies", "vi", {"fields": [VECTOR]})
    assert caught.value.code == 68
    assert "'vi' already exists on db.movies" in caught.value.message
    # The same name on another collection is another index.
    other = await catalog.create("db.shows", "vi", DEFINITION)
    assert sorted(catalog.indexes) == ["db.movies/vi", "db.shows/vi"]
    assert catalog.get("db.shows", "vi") == other
    # A second process that did not see the first index: the unique index refuses it.
    stale = SearchCatalog(direct, meta_db)
    with pytest.raises(IndexAlreadyExists):
        await stale.create("db.movies", "vi", DEFINITION)
    assert direct[meta_db].searchIndexes.count_documents({}) == 2


async def test_invalid_definitions_store_nothing(direct: Client, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    with pytest.raises(BadValue, match="between 1 and 8192"):
        await catalog.create("db.c", "vi", {"fields": [{**VECTOR, "numDimensions": 0}]})
    with pytest.raises(TypeMismatch):
        await catalog.create("db.c", 3, DEFINITION)  # type: ignore[arg-type]
    with pytest.raises(BadValue, match="autoEmbed is off"):
        auto = {"type": "autoEmbed", "modality": "text", "path": "t", "model": "m"}
        await catalog.create("db.c", "vi", {"fields": [auto]})
    assert direct[meta_db].searchIndexes.count_documents({}) == 0
    assert catalog.indexes == {}


async def test_update_makes_a_new_version(direct: Client, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    created = await catalog.create("db.movies", "vi", DEFINITION)
    new_definition = {"fields": [{**VECTOR, "numDimensions": 8, "similarity": "euclidean"}]}
    updated = await catalog.update("db.movies", "vi", new_definition)
    assert (updated.id, updated.version) == (created.id, 1)
    assert updated.created_at >= created.created_at
    assert updated.definition.to_document() == new_definition
    assert catalog.get("db.movies", "vi") == updated
    by_id = await catalog.update("db.movies", None, DEFINITION, index_id=created.id)
    assert by_id.version == 2 and by_id.definition.to_document() == DEFINITION
    with pytest.raises(IndexNotFound) as caught:
        await catalog.update("db.movies", "nope", DEFINITION)
    assert caught.value.code == 27 and "no search index named 'nope' on db.movies" in str(
        caught.value
    )
    with pytest.raises(IndexNotFound, match="with id"):
        await catalog.update("db.other", None, DEFINITION, index_id=created.id)
    # A bad definition leaves the index as it was.
    with pytest.raises(BadValue):
        await catalog.update("db.movies", "vi", {"fields": []})
    assert catalog.get("db.movies", "vi") == by_id


async def test_drop(direct: Client, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    first = await catalog.create("db.movies", "a", DEFINITION)
    await catalog.create("db.movies", "b", DEFINITION)
    assert [i.name for i in catalog.for_namespace("db.movies")] == ["a", "b"]
    assert await catalog.drop("db.movies", "b") == "b"
    assert [i.name for i in catalog.for_namespace("db.movies")] == ["a"]
    assert await catalog.drop("db.movies", index_id=first.id) == "a"
    assert catalog.indexes == {}
    with pytest.raises(IndexNotFound):
        await catalog.drop("db.movies", "a")
    assert direct[meta_db].searchIndexes.count_documents({}) == 0
    # The name is free again: a new index, version 0, another id.
    again = await catalog.create("db.movies", "a", DEFINITION)
    assert again.version == 0 and again.id != first.id


async def test_another_process_sees_every_change_on_refresh(direct: Client, meta_db: str) -> None:
    one, two = SearchCatalog(direct, meta_db), SearchCatalog(direct, meta_db)
    assert not two.loaded
    await two.refresh()
    assert two.loaded and two.indexes == {}
    created = await one.create("db.movies", "vi", DEFINITION)
    await two.refresh()
    assert two.indexes == one.indexes == {"db.movies/vi": created}
    updated = await one.update("db.movies", "vi", {"fields": [VECTOR]})
    await two.refresh()
    assert two.get("db.movies", "vi") == updated
    await one.drop("db.movies", "vi")
    await two.refresh()
    assert two.indexes == {}
    # A restarted process (a new catalog) starts from what is stored.
    await one.create("db.movies", "vi", DEFINITION)
    restarted = SearchCatalog(direct, meta_db)
    await restarted.refresh()
    assert restarted.indexes == one.indexes


async def test_next_change(direct: Client, meta_db: str) -> None:
    one, two = SearchCatalog(direct, meta_db), SearchCatalog(direct, meta_db)
    await two.refresh()
    woken: list[str] = []

    async def wait(catalog: SearchCatalog, label: str) -> None:
        await catalog.next_change()
        woken.append(label)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, one, "one")
        nursery.start_soon(wait, two, "two")
        await trio.testing.wait_all_tasks_blocked()
        await one.create("db.movies", "vi", DEFINITION)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["one"]  # `two` learns of it at its next refresh
        await two.refresh()
    assert woken == ["one", "two"]

    # A refresh that finds nothing new wakes nobody.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, two, "again")
        await trio.testing.wait_all_tasks_blocked()
        await two.refresh()
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["one", "two"]
        await one.update("db.movies", "vi", DEFINITION)
        await two.refresh()
    assert woken == ["one", "two", "again"]


async def test_a_stored_definition_changed_by_hand_is_left_out(
    direct: Client, meta_db: str
) -> None:
    catalog = SearchCatalog(direct, meta_db)
    await catalog.create("db.movies", "good", DEFINITION)
    bad = await catalog.create("db.movies", "bad", DEFINITION)
    direct[meta_db].searchIndexes.update_one(
        {"_id": bad.id}, {"$set": {"definition.fields.0.numDimensions": -1}}
    )
    await catalog.refresh()
    assert sorted(catalog.indexes) == ["db.movies/good"]
    # It can still be dropped.
    assert await catalog.drop("db.movies", "bad") == "bad"


# --------------------------------------------------------------------------- autoEmbed


def _spec(name: str, postprocess: Any) -> ModelSpec:
    return ModelSpec(
        name=name,
        namespace="elsewhere.items",
        input_field="x",
        output_field=f"_outputs.{name}",
        mode="inline",
        preprocess=TensorPreprocess(),
        postprocess=postprocess,
    )


def _text_model() -> tuple[TextPreprocess, bytes]:
    """A small text embedding model (a lookup "encoder", mean-pooled in the graph) of 8
    dimensions, over the test tokenizer."""
    tokenizer = text_models.tokenizer_json()
    vocab = len(json.loads(tokenizer)["model"]["vocab"])
    return TextPreprocess(tokenizer), text_models.lookup_encoder(vocab, 8, pooled=True)


async def _models(direct: Client, meta_db: str) -> ModelSet:
    models = ModelSet(ModelRegistry(direct, meta_db), RUNTIME)
    preprocess, onnx = _text_model()
    embedder = replace(_spec("embedder", EmbeddingPostprocess()), preprocess=preprocess)
    await models.register(embedder, onnx)
    await models.register(_spec("vectors", EmbeddingPostprocess()), onnx_models.embedding_model(8))
    await models.register(
        _spec("classifier", ClassifyPostprocess(labels=("a", "b", "c"))),
        onnx_models.linear_classifier(),
    )
    return models


def auto_field(path: str = "plot", model: str = "embedder", **extra: Any) -> dict[str, Any]:
    return {"type": "autoEmbed", "modality": "text", "path": path, "model": model, **extra}


async def test_auto_embed_registers_a_derived_deferred_model(
    direct: Client, meta_db: str, data_db: str
) -> None:
    models = await _models(direct, meta_db)
    prepared: list[str] = []

    async def prepare(server: Any) -> None:
        prepared.append(server.model.spec.name)

    catalog = SearchCatalog(direct, meta_db, models=models, prepare=prepare)
    namespace = f"{data_db}.movies"
    # Outputs left by an earlier index of the same name are cleared.
    direct[data_db].movies.insert_one(
        {"_id": 1, "plot": "x", "_autoEmbed": {"plots": {"version": 1}}}
    )
    definition = {"fields": [auto_field(), {"type": "filter", "path": "year"}]}
    index = await catalog.create(namespace, "plots", definition)
    field = index.definition.vector_field("plot")
    assert field == AutoEmbedField(
        path="plot",
        model="embedder",
        modality="text",
        num_dimensions=8,  # from the model
        similarity="cosine",
        vector_path="_autoEmbed.plots.vector",
    )
    assert index.definition.to_document() == definition  # as the client sent it
    assert direct[data_db].movies.find_one({"_id": 1}) == {"_id": 1, "plot": "x"}

    name = derived_model_name(namespace, "plots")
    assert name == f"autoEmbed:{namespace}:plots"
    assert prepared == [name]
    server = models.get(name)
    assert server is not None
    spec = server.model.spec
    assert (spec.namespace, spec.input_field, spec.output_field, spec.mode) == (
        namespace,
        "plot",
        "_autoEmbed.plots",
        "deferred",
    )
    assert spec.postprocess == EmbeddingPostprocess()
    assert spec.preprocess == models.records["embedder"].spec.preprocess
    assert spec.metadata == {
        "autoEmbed": {
            "namespace": namespace,
            "index": "plots",
            "path": "plot",
            "model": "embedder",
            "modelVersion": 1,
        }
    }
    stored = direct[meta_db].searchIndexes.find_one({"_id": index.id})
    assert stored is not None and stored["autoEmbed"] == {
        "path": "plot",
        "model": "embedder",
        "modelVersion": 1,
        "numDimensions": 8,
        "derivedModel": name,
    }
    # Another process's catalog resolves the dimension from what is stored.
    other = SearchCatalog(direct, meta_db)
    await other.refresh()
    assert other.get(namespace, "plots") == index

    # Same model and path: the derived model stays as it is.
    await catalog.update(namespace, "plots", {"fields": [auto_field()]})
    assert models.records[name].version == 1
    # Another path: a new version of the derived model, reading the new path.
    updated = await catalog.update(namespace, "plots", {"fields": [auto_field("title")]})
    assert updated.definition.vector_field("title") is not None
    assert models.records[name].version == 2
    assert models.records[name].spec.input_field == "title"
    # No autoEmbed field any more: the derived model goes.
    await catalog.update(namespace, "plots", {"fields": [VECTOR]})
    assert models.get(name) is None
    await catalog.update(namespace, "plots", {"fields": [auto_field()]})
    assert models.get(name) is not None
    # Dropping the index drops the derived model and its outputs.
    direct[data_db].movies.update_one({"_id": 1}, {"$set": {"_autoEmbed.plots": {"version": 1}}})
    await catalog.drop(namespace, "plots")
    assert models.get(name) is None
    current = await trio.to_thread.run_sync(models.registry.current_versions)
    assert sorted(current) == ["classifier", "embedder", "vectors"]
    assert direct[data_db].movies.find_one({"_id": 1}) == {"_id": 1, "plot": "x"}


async def test_auto_embed_errors(direct: Client, meta_db: str, data_db: str) -> None:
    models = await _models(direct, meta_db)
    catalog = SearchCatalog(direct, meta_db, models=models)
    namespace = f"{data_db}.movies"
    cases: list[tuple[dict[str, Any], str]] = [
        (auto_field(model="nope"), "'nope' is not a registered model"),
        (auto_field(model="classifier"), "'classifier' is not a text embedding model"),
        (auto_field(model="vectors"), "its preprocess is 'tensor' and its postprocess 'embedding'"),
        (auto_field(numDimensions=4), "numDimensions is 4 but model 'embedder' makes vectors of 8"),
    ]
    for field, words in cases:
        with pytest.raises(BadValue) as caught:
            await catalog.create(namespace, "plots", {"fields": [field]})
        assert words in caught.value.message
    assert catalog.indexes == {}
    assert direct[meta_db].searchIndexes.count_documents({}) == 0
    assert sorted(models.servers) == ["classifier", "embedder", "vectors"]
    # The dimension the model makes, given: accepted.
    index = await catalog.create(namespace, "plots", {"fields": [auto_field(numDimensions=8)]})
    assert index.definition.vector_fields[0].num_dimensions == 8
    # A derived model is no model to embed with.
    derived = derived_model_name(namespace, "plots")
    with pytest.raises(BadValue, match="itself an index's derived model"):
        await catalog.create(namespace, "again", {"fields": [auto_field(model=derived)]})


def test_derived_model_names() -> None:
    assert derived_model_name("db.c", "vi") == "autoEmbed:db.c:vi"
    long = derived_model_name("db." + "c" * 150, "vi")
    assert long.startswith("autoEmbed:") and len(long) <= 120
    assert derived_model_name("db.c", "$vi") != derived_model_name("db.c", "$vj")
    assert "$" not in derived_model_name("db.c", "$vi")


def test_search_type_error_is_bad_value() -> None:
    assert issubclass(SearchIndexTypeNotServed, BadValue)
    assert issubclass(IndexNotFound, ModelgateError)


async def test_update_follows_a_new_version_of_the_model(
    direct: Client, meta_db: str, data_db: str
) -> None:
    models = await _models(direct, meta_db)
    catalog = SearchCatalog(direct, meta_db, models=models)
    namespace = f"{data_db}.movies"
    definition = {"fields": [auto_field()]}
    await catalog.create(namespace, "plots", definition)
    name = derived_model_name(namespace, "plots")
    assert models.records[name].spec.metadata["autoEmbed"]["modelVersion"] == 1  # type: ignore[index]
    # The named model is registered again: the same definition, updated, takes it up.
    record = models.records["embedder"]
    onnx = await trio.to_thread.run_sync(models.registry.onnx_bytes, record)
    await models.register(record.spec, onnx)
    await catalog.update(namespace, "plots", definition)
    assert models.records[name].version == 2
    assert models.records[name].spec.metadata["autoEmbed"]["modelVersion"] == 2  # type: ignore[index]
