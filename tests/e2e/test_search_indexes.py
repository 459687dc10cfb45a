"""MongoDB's search index API through modelgate: pymongo's create_search_index /
list_search_indexes / update_search_index / drop_search_index and mongosh's
createSearchIndex / getSearchIndexes / updateSearchIndex / dropSearchIndex, served by
modelgate's catalog on an upstream without search of its own (SecantusDB), with MongoDB's
replies and errors; autoEmbed indexes embedding a collection's text with a registered
text model. The first tests run the command handlers in this process over the real
upstream; the rest run through a `modelgate serve` process."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import quote

import pymongo
import pymongo.errors
import pytest
import trio
from bson import json_util
from pymongo.operations import SearchIndexModel

from bench.support import text_models
from bench.support.processes import ProxyProcess
from engine.errors import (
    BadValue,
    IndexAlreadyExists,
    IndexNotFound,
    ModelgateError,
    NamespaceNotFound,
    TypeMismatch,
)
from engine.leases import WorkQueue
from engine.registry import ModelRegistry
from engine.search.catalog import SearchCatalog
from proxy.commands import COMMANDS
from proxy.session import CommandContext, Session
from tests.e2e.test_deferred import wait_for
from tests.support import MONGOSH, mongosh, upstream_with_users

Client = pymongo.MongoClient[dict[str, Any]]
VECTOR = {"type": "vector", "path": "embedding", "numDimensions": 3, "similarity": "cosine"}
DEFINITION = {"fields": [VECTOR, {"type": "filter", "path": "genre"}]}


# --------------------------------------------------------------------------- in process


class _Session:
    """What CommandContext reads of a session, with the client's upstream connection
    played by a pymongo client of the real upstream."""

    def __init__(self, direct: Client, catalog: SearchCatalog | None) -> None:
        self.connection_id = 1
        self.log = logging.LoggerAdapter(logging.getLogger("test.session"), {})
        self.services = SimpleNamespace(
            models=None,
            deferred=None,
            model_sources=None,
            search_catalog=catalog,
            search_indexes=None,
        )
        self.direct = direct

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        command = {k: v for k, v in document.items() if k != "$db"}

        def run() -> dict[str, Any]:
            try:
                reply: dict[str, Any] = self.direct[document["$db"]].command(command)
            except pymongo.errors.OperationFailure as exc:
                return dict(exc.details or {"ok": 0.0})
            return reply

        return await trio.to_thread.run_sync(run)


@pytest.fixture
def meta_db(db_name: str, direct: Client) -> Iterator[str]:
    name = f"{db_name}_mg"[:60]
    direct.drop_database(name)
    yield name
    direct.drop_database(name)


async def run(direct: Client, catalog: SearchCatalog | None, command: dict[str, Any]) -> Any:
    context = CommandContext(cast(Session, _Session(direct, catalog)))
    name = next(iter(command))
    return await COMMANDS[name](context, command)


async def test_commands_in_process(direct: Client, db_name: str, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    entries = [
        {"name": "a", "type": "vectorSearch", "definition": DEFINITION},
        {"definition": {"fields": [VECTOR]}},  # name "default"; type taken from the fields
    ]
    reply = await run(
        direct, catalog, {"createSearchIndexes": "movies", "indexes": entries, "$db": db_name}
    )
    assert [entry["name"] for entry in reply["indexesCreated"]] == ["a", "default"]
    ids = {entry["name"]: entry["id"] for entry in reply["indexesCreated"]}
    assert ids["a"] == catalog.get(f"{db_name}.movies", "a").id  # type: ignore[union-attr]
    update = {"updateSearchIndex": "movies", "id": ids["a"], "definition": {"fields": [VECTOR]}}
    assert await run(direct, catalog, {**update, "$db": db_name}) == {"ok": 1.0}
    index = catalog.get(f"{db_name}.movies", "a")
    assert index is not None and index.version == 1
    drop = {"dropSearchIndex": "movies", "name": "default", "$db": db_name}
    assert await run(direct, catalog, drop) == {"ok": 1.0}
    assert [i.name for i in catalog.for_namespace(f"{db_name}.movies")] == ["a"]


@pytest.mark.parametrize(
    ("command", "error", "words"),
    [
        ({"createSearchIndexes": 5, "indexes": []}, TypeMismatch, "collection name"),
        ({"createSearchIndexes": "c"}, BadValue, "'indexes' is required"),
        ({"createSearchIndexes": "c", "indexes": []}, BadValue, "may not be empty"),
        ({"createSearchIndexes": "c", "indexes": [{"name": "x"}]}, BadValue, "definition' is"),
        (
            {"createSearchIndexes": "c", "indexes": [{"definition": DEFINITION, "x": 1}]},
            BadValue,
            "unknown field 'x'",
        ),
        (
            {"createSearchIndexes": "c", "indexes": [{"definition": {"mappings": {}}}]},
            BadValue,
            "modelgate serves vectorSearch indexes only",
        ),
        (
            {
                "createSearchIndexes": "c",
                "indexes": [{"definition": DEFINITION}, {"definition": DEFINITION}],
            },
            IndexAlreadyExists,
            "'default' is named twice",
        ),
        (
            {"createSearchIndexes": "c", "indexes": [{"definition": {"fields": []}}]},
            BadValue,
            "at least one field",
        ),
        ({"createSearchIndexes": "c", "indexes": [], "bogus": 1}, BadValue, "unknown field"),
        ({"updateSearchIndex": "c", "definition": DEFINITION}, BadValue, "either 'name' or 'id'"),
        (
            {"updateSearchIndex": "c", "name": "a", "id": "b", "definition": DEFINITION},
            BadValue,
            "either 'name' or 'id'",
        ),
        ({"updateSearchIndex": "c", "name": "a"}, BadValue, "'definition' is required"),
        ({"updateSearchIndex": "c", "name": "a", "definition": DEFINITION}, IndexNotFound, "'a'"),
        ({"dropSearchIndex": "c", "id": 5}, TypeMismatch, "'id' must be a string"),
    ],
)
async def test_command_errors(
    direct: Client, db_name: str, meta_db: str, command: dict[str, Any], error: type, words: str
) -> None:
    catalog = SearchCatalog(direct, meta_db)
    with pytest.raises(ModelgateError) as caught:
        await run(direct, catalog, {**command, "$db": db_name})
    assert isinstance(caught.value, error) and caught.value.code_name == error.code_name  # type: ignore[attr-defined]
    assert words in caught.value.message
    assert catalog.indexes == {}


async def test_drop_of_a_missing_index(direct: Client, db_name: str, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    drop = {"dropSearchIndex": "movies", "name": "vi", "$db": db_name}
    with pytest.raises(NamespaceNotFound):  # no collection: drivers ignore this one
        await run(direct, catalog, drop)
    direct[db_name].movies.insert_one({"_id": 1})
    with pytest.raises(IndexNotFound) as caught:
        await run(direct, catalog, drop)
    assert caught.value.code == 27


async def test_reserved_databases(direct: Client, meta_db: str) -> None:
    catalog = SearchCatalog(direct, meta_db)
    for db in ("admin", "local", "config", "modelgate"):
        command = {"createSearchIndexes": "c", "indexes": [{"definition": DEFINITION}]}
        with pytest.raises(BadValue, match=f"cannot be created in database '{db}'"):
            await run(direct, catalog, {**command, "$db": db})


async def test_without_a_catalog_the_upstream_answers(direct: Client, db_name: str) -> None:
    # --search passthrough: the command goes to the upstream as it came (SecantusDB has
    # no search: it refuses, with its own error).
    command = {"createSearchIndexes": "c", "indexes": [{"definition": DEFINITION}]}
    reply = await run(direct, None, {**command, "$db": db_name})
    assert reply["ok"] == 0


# --------------------------------------------------------------------------- pymongo


def listed(collection: Any, name: str | None = None) -> list[dict[str, Any]]:
    return list(collection.list_search_indexes(name))


def test_pymongo_create_list_update_drop(client: Client, db_name: str) -> None:
    movies = client[db_name].movies
    movies.insert_one({"_id": 1, "embedding": [1.0, 0.0, 0.0], "genre": "drama"})
    model = SearchIndexModel(definition=DEFINITION, name="vi", type="vectorSearch")
    assert movies.create_search_index(model) == "vi"
    [index] = listed(movies)
    assert (index["name"], index["type"], index["latestDefinition"]) == (
        "vi",
        "vectorSearch",
        DEFINITION,
    )
    assert len(index["id"]) == 24
    assert index["latestDefinitionVersion"]["version"] == 0
    assert index["status"] in ("PENDING", "BUILDING", "READY")
    assert isinstance(index["queryable"], bool)

    new_definition = {"fields": [{**VECTOR, "similarity": "euclidean"}]}
    movies.update_search_index("vi", new_definition)
    [updated] = listed(movies, "vi")
    assert updated["latestDefinition"] == new_definition
    assert updated["latestDefinitionVersion"]["version"] == 1
    assert updated["id"] == index["id"]

    names = movies.create_search_indexes(
        [
            SearchIndexModel(definition=DEFINITION, name="second", type="vectorSearch"),
            SearchIndexModel(definition={"fields": [VECTOR]}, type="vectorSearch"),
        ]
    )
    assert names == ["second", "default"]
    assert sorted(i["name"] for i in listed(movies)) == ["default", "second", "vi"]
    movies.drop_search_index("vi")
    movies.drop_search_index("second")
    assert [i["name"] for i in listed(movies)] == ["default"]
    # Another collection's indexes are its own.
    assert listed(client[db_name].shows) == []


def test_pymongo_errors(client: Client, db_name: str) -> None:
    movies = client[db_name].movies
    movies.insert_one({"_id": 1})
    model = SearchIndexModel(definition=DEFINITION, name="vi", type="vectorSearch")
    movies.create_search_index(model)
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        movies.create_search_index(model)
    assert (caught.value.code, caught.value.details["codeName"]) == (68, "IndexAlreadyExists")  # type: ignore[index]
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        movies.update_search_index("nope", DEFINITION)
    assert caught.value.code == 27
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        movies.drop_search_index("nope")
    assert caught.value.code == 27
    # No collection: NamespaceNotFound, which pymongo ignores on drop.
    client[db_name].missing.drop_search_index("vi")
    # Atlas Search (full-text) indexes are not served.
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        movies.create_search_index({"definition": {"mappings": {"dynamic": True}}})
    assert caught.value.code == 2
    assert "modelgate serves vectorSearch indexes only" in str(caught.value)
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        bad = {"fields": [{**VECTOR, "numDimensions": 9000}]}
        movies.create_search_index(SearchIndexModel(bad, name="big", type="vectorSearch"))
    assert caught.value.code == 2 and "between 1 and 8192" in str(caught.value)
    assert [i["name"] for i in listed(movies)] == ["vi"]


# --------------------------------------------------------------------------- autoEmbed


@pytest.fixture
def text_model(client: Client, db_name: str) -> Iterator[tuple[str, int]]:
    """A text embedding model registered through the proxy: (name, dimension)."""
    tokenizer = text_models.tokenizer_json()
    vocab = len(json.loads(tokenizer)["model"]["vocab"])
    name = f"{db_name}_text"
    client.admin.command(
        {
            "registerModel": name,
            "collection": f"{db_name}.unused",
            "input": "text",
            "onnx": text_models.lookup_encoder(vocab, 8, pooled=True),
            "preprocess": {"kind": "text", "tokenizer": tokenizer},
            "postprocess": {"kind": "embedding", "normalize": True},
        }
    )
    yield name, 8
    try:
        client.admin.command("dropModel", name)
    except pymongo.errors.OperationFailure as exc:
        assert exc.code == 4, exc


def test_auto_embed_through_the_proxy(
    client: Client, direct: Client, db_name: str, text_model: tuple[str, int]
) -> None:
    model, dimension = text_model
    products = client[db_name].products
    texts = text_models.sample_texts(6)
    products.insert_many([{"_id": i, "description": t} for i, t in enumerate(texts[:3])])
    auto = {"type": "autoEmbed", "modality": "text", "path": "description", "model": model}
    definition = {"fields": [auto, {"type": "filter", "path": "category"}]}
    products.create_search_index(SearchIndexModel(definition, name="semantic", type="vectorSearch"))
    [index] = listed(products)
    assert index["latestDefinition"] == definition

    derived = f"autoEmbed:{db_name}.products:semantic"
    listed_models = {m["name"]: m for m in client.admin.command("listModels")["models"]}
    assert listed_models[derived]["mode"] == "deferred"
    assert listed_models[derived]["input"] == "description"
    assert listed_models[derived]["output"] == "_autoEmbed.semantic"
    # Documents already there (initial sync) and written later, through the proxy or not.
    products.insert_one({"_id": 3, "description": texts[3]})
    direct[db_name].products.insert_one({"_id": 4, "description": texts[4]})

    def embedded() -> list[dict[str, Any]]:
        found = list(direct[db_name].products.find({"_autoEmbed.semantic.vector": {"$exists": 1}}))
        return found if len(found) == 5 else []

    documents = wait_for(embedded, what="autoEmbed vectors")
    for document in documents:
        assert len(document["_autoEmbed"]["semantic"]["vector"]) == dimension
    # Dropping the index drops its model and its vectors.
    products.drop_search_index("semantic")
    assert derived not in {m["name"] for m in client.admin.command("listModels")["models"]}
    assert direct[db_name].products.count_documents({"_autoEmbed": {"$exists": True}}) == 0


def test_auto_embed_is_building_until_its_initial_sync_is_done(
    client: Client, direct: Client, db_name: str, text_model: tuple[str, int]
) -> None:
    """As MongoDB's automated embedding: BUILDING and not queryable until every document
    there has its embedding, then READY with each of them searchable; a text that cannot
    be embedded counts as failed. Deterministic: this test holds the deferred lease on
    every document (as another modelgate process busy with them would) until it lets
    them go, so the derived model cannot finish before."""
    model, _ = text_model
    products = client[db_name].products
    texts = text_models.sample_texts(7, seed=3)
    documents: list[dict[str, Any]] = [
        {"_id": i, "description": t} for i, t in enumerate(texts[:5])
    ]
    documents.append({"_id": 5, "description": ""})  # empty: an error record, not a vector
    products.insert_many(documents)
    spec = replace(
        ModelRegistry(direct).get(model).spec,
        name=f"autoEmbed:{db_name}.products:semantic",
        namespace=f"{db_name}.products",
        input_field="description",
        output_field="_autoEmbed.semantic",
        mode="deferred",
        on_error="record",
    )
    holder = WorkQueue.on(direct, spec, 1, owner="test-holder")
    held = holder.claim(len(documents), lease_seconds=600)
    assert sorted(doc["_id"] for doc in held.documents) == list(range(6))
    auto = {"type": "autoEmbed", "modality": "text", "path": "description", "model": model}
    try:
        products.create_search_index(
            SearchIndexModel({"fields": [auto]}, name="semantic", type="vectorSearch")
        )

        def building() -> dict[str, Any] | None:
            [index] = listed(products, "semantic")
            assert (index["status"], index["queryable"]) == ("BUILDING", False), index
            return index if index["modelgate"]["pending"] == len(documents) else None

        index = wait_for(building, what="the derived model's pending documents counted")
        assert index is not None and index["modelgate"] == {"indexed": 0, "pending": 6, "failed": 0}
        with pytest.raises(pymongo.errors.OperationFailure) as caught:
            list(products.aggregate([search(texts[0])]))
        assert "is not queryable while in state BUILDING" in str(caught.value)
        assert direct[db_name].products.count_documents({"_autoEmbed": {"$exists": 1}}) == 0

        holder.release(held)  # the proxy's workers take them now

        def ready() -> dict[str, Any] | None:
            [index] = listed(products, "semantic")
            if index["status"] != "READY":
                assert (index["status"], index["queryable"]) == ("BUILDING", False), index
                return None
            # Whenever it says READY, every document is embedded and searchable.
            assert index["queryable"], index
            assert index["modelgate"] == {"indexed": 5, "pending": 0, "failed": 1}, index
            return index

        wait_for(ready, timeout=120, what="the index READY")
        for text in texts[:5]:
            found = {doc["_id"] for doc in products.aggregate([search(text)])}
            assert found == set(range(5)), text

        # Later writes are pending until embedded and indexed; the index stays READY.
        products.insert_one({"_id": 6, "description": texts[5]})
        direct[db_name].products.insert_one({"_id": 7, "description": texts[6]})

        def caught_up() -> bool:
            [index] = listed(products, "semantic")
            assert (index["status"], index["queryable"]) == ("READY", True), index
            return bool(index["modelgate"] == {"indexed": 7, "pending": 0, "failed": 1})

        wait_for(caught_up, timeout=120, what="the later writes indexed")
        found = {doc["_id"] for doc in products.aggregate([search(texts[6])])}
        assert found == set(range(5)) | {6, 7}
    finally:
        holder.release(held)
        products.drop_search_index("semantic")


def test_auto_embed_index_in_a_process_started_later(
    client: Client,
    direct: Client,
    db_name: str,
    text_model: tuple[str, int],
    upstream_uri: str,
    tmp_path: Path,
) -> None:
    """A modelgate process started after the initial sync finds the derived model caught
    up: it builds its own local index from the stored vectors (BUILDING meanwhile), then
    READY with every document; started again, it loads what it saved."""
    model, _ = text_model
    products = client[db_name].products
    texts = text_models.sample_texts(8, seed=5)
    products.insert_many([{"_id": i, "description": text} for i, text in enumerate(texts)])
    auto = {"type": "autoEmbed", "modality": "text", "path": "description", "model": model}
    products.create_search_index(
        SearchIndexModel({"fields": [auto]}, name="semantic", type="vectorSearch")
    )
    try:
        wait_for(
            lambda: listed(products, "semantic")[0]["status"] == "READY",
            timeout=120,
            what="the index READY in the first process",
        )
        for run in range(2):
            later = ProxyProcess(
                upstream_uri,
                tmp_path / f"later{run}.log",
                args=("--data-dir", str(tmp_path / "later")),
            )
            later_client: Client
            with later, pymongo.MongoClient(later.uri) as later_client:
                theirs: Any = later_client[db_name].products

                def ready(theirs: Any = theirs) -> bool:
                    [index] = listed(theirs, "semantic")
                    if index["status"] != "READY":
                        assert (index["status"], index["queryable"]) == ("BUILDING", False)
                        return False
                    assert index["queryable"], index
                    assert index["modelgate"] == {"indexed": 8, "pending": 0, "failed": 0}
                    return True

                wait_for(ready, timeout=120, what=f"the index READY in process {run + 2}")
                found = {doc["_id"] for doc in theirs.aggregate([search(texts[0])])}
                assert found == set(range(8))
    finally:
        products.drop_search_index("semantic")


def search(text: str) -> dict[str, Any]:
    return {
        "$vectorSearch": {
            "index": "semantic",
            "path": "description",
            "query": text,
            "numCandidates": 20,
            "limit": 10,
        }
    }


def test_auto_embed_errors_through_the_proxy(
    client: Client, db_name: str, text_model: tuple[str, int]
) -> None:
    products = client[db_name].products
    auto = {"type": "autoEmbed", "modality": "text", "path": "description", "model": "nope"}
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        products.create_search_index(
            SearchIndexModel({"fields": [auto]}, name="semantic", type="vectorSearch")
        )
    assert caught.value.code == 2 and "'nope' is not a registered model" in str(caught.value)
    assert listed(products) == []


# --------------------------------------------------------------------------- mongosh


@pytest.mark.skipif(not MONGOSH.exists(), reason=f"mongosh is not installed ({MONGOSH})")
def test_mongosh_create_get_update_drop(
    proxy: ProxyProcess, db_name: str, direct: Client, tmp_path: Path
) -> None:
    script = f"""
const movies = db.getSiblingDB("{db_name}").movies;
movies.insertOne({{_id: 1, embedding: [1, 0, 0], genre: "drama"}});
const created = movies.createSearchIndex("vi", "vectorSearch", {json.dumps(DEFINITION)});
const plain = {{name: "plain", definition: {{fields: [{json.dumps(VECTOR)}]}}}};
const second = movies.createSearchIndex(plain);
const listed = movies.getSearchIndexes();
movies.updateSearchIndex("vi", {{fields: [{json.dumps(VECTOR)}]}});
const updated = movies.getSearchIndexes("vi");
movies.dropSearchIndex("plain");
const afterDrop = movies.getSearchIndexes();
let duplicate = null;
try {{ movies.createSearchIndex("vi", "vectorSearch", {json.dumps(DEFINITION)}); }}
catch (e) {{ duplicate = {{code: e.code, message: e.message}}; }}
const output = {{created, second, listed, updated, afterDrop, duplicate}};
print(EJSON.stringify(output, {{relaxed: true}}));
"""
    result = mongosh(proxy.uri, script, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    output = json_util.loads(result.stdout.strip().splitlines()[-1])
    assert (output["created"], output["second"]) == ("vi", "plain")
    assert sorted(i["name"] for i in output["listed"]) == ["plain", "vi"]
    [vi] = [i for i in output["listed"] if i["name"] == "vi"]
    assert vi["latestDefinition"] == DEFINITION and vi["type"] == "vectorSearch"
    [updated] = output["updated"]
    assert updated["latestDefinitionVersion"]["version"] == 1
    assert updated["latestDefinition"] == {"fields": [VECTOR]}
    assert [i["name"] for i in output["afterDrop"]] == ["vi"]
    assert output["duplicate"]["code"] == 68


# --------------------------------------------------------------------------- authorization

USERS = {
    "root": [{"role": "root", "db": "admin"}],
    "shopadmin": [{"role": "dbAdmin", "db": "shop"}, {"role": "readWrite", "db": "shop"}],
    "reader": [{"role": "readWrite", "db": "shop"}],
}
PASSWORD = "pw-0123456789"


@pytest.fixture(scope="module")
def auth_proxy_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("auth-search")
    users = {user: (PASSWORD, roles) for user, roles in USERS.items()}
    with upstream_with_users(folder, users) as upstream:
        service_uri = (
            f"mongodb://root:{quote(PASSWORD)}@127.0.0.1:{upstream.port}/"
            "?directConnection=true&authSource=admin"
        )
        args = ("--data-dir", str(folder))
        with ProxyProcess(service_uri, folder / "modelgate.log", args=args) as proxy:
            yield proxy.uri


def test_only_database_admins_change_search_indexes(auth_proxy_uri: str) -> None:
    def connect(user: str) -> Client:
        return pymongo.MongoClient(
            auth_proxy_uri, username=user, password=PASSWORD, authSource="admin"
        )

    model = SearchIndexModel(definition=DEFINITION, name="vi", type="vectorSearch")
    with connect("reader") as reader, connect("shopadmin") as admin:
        reader.shop.items.insert_one({"_id": 1})
        with pytest.raises(pymongo.errors.OperationFailure) as caught:
            reader.shop.items.create_search_index(model)
        assert caught.value.code == 13
        assert "not authorized on shop to execute command createSearchIndexes" in str(caught.value)
        assert admin.shop.items.create_search_index(model) == "vi"
        for change in (
            lambda: reader.shop.items.update_search_index("vi", DEFINITION),
            lambda: reader.shop.items.drop_search_index("vi"),
        ):
            with pytest.raises(pymongo.errors.OperationFailure) as caught:
                change()
            assert caught.value.code == 13
        admin.shop.items.update_search_index("vi", {"fields": [VECTOR]})
        admin.shop.items.drop_search_index("vi")
