"""`$vectorSearch` and `$listSearchIndexes` through a real modelgate process on a real
SecantusDB, from pymongo, mongosh and the Node.js driver: results in score order equal to
a numpy exact search (exact) or close to it (approximate), filters, later stages with the
score, writes through the proxy seen by the index, MongoDB's errors; and with
--search passthrough, the stages reach the upstream untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pymongo
import pymongo.errors
import pytest
from pymongo.operations import SearchIndexModel

from bench.support import text_models
from bench.support.processes import ROOT, ProxyProcess
from tests.e2e.test_deferred import wait_for

Client = pymongo.MongoClient[dict[str, Any]]

DIM = 8
COUNT = 120
CATEGORIES = ("a", "b", "c")
MONGOSH = ROOT / "node_modules" / ".bin" / "mongosh"
NODE = shutil.which("node")
SCORE = {"$meta": "vectorSearchScore"}


def vectors(count: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


VECTORS = vectors(COUNT)
QUERY = vectors(1, seed=99)[0]


def listed(collection: Any) -> list[dict[str, Any]]:
    return list(collection.list_search_indexes())


def wait_ready(collection: Any, name: str, count: int) -> dict[str, Any]:
    def ready() -> dict[str, Any]:
        for index in listed(collection):
            counts = index.get("modelgate", {})
            if index["name"] == name and index["queryable"] and counts.get("indexed") == count:
                return index
        return {}

    return wait_for(ready, what=f"search index {name} READY with {count} documents")


def exact_top(
    query: np.ndarray, ids: list[int], rows: np.ndarray, limit: int
) -> list[tuple[int, float]]:
    """The exact cosine search: (id, MongoDB's score (1 + cos) / 2), best first."""
    cos = rows @ query / (np.linalg.norm(rows, axis=1) * np.linalg.norm(query))
    order = np.argsort(-cos, kind="stable")[:limit]
    return [(ids[i], float((1 + cos[i]) / 2)) for i in order]


def stage(**fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "index": "vi",
        "path": "v",
        "queryVector": QUERY.tolist(),
        "numCandidates": 100,
        "limit": 10,
    }
    spec.update(fields)
    return {"$vectorSearch": {k: v for k, v in spec.items() if v is not None}}


@pytest.fixture
def items(db: Any) -> Iterator[Any]:
    """COUNT documents with vectors written through the proxy, and a ready index on them."""
    collection = db.items
    collection.insert_many(
        [
            {"_id": i, "v": VECTORS[i].tolist(), "category": CATEGORIES[i % 3], "n": i}
            for i in range(COUNT)
        ]
    )
    definition = {
        "fields": [
            {"type": "vector", "path": "v", "numDimensions": DIM, "similarity": "cosine"},
            {"type": "filter", "path": "category"},
            {"type": "filter", "path": "n"},
        ]
    }
    collection.create_search_index(SearchIndexModel(definition, name="vi", type="vectorSearch"))
    index = wait_ready(collection, "vi", COUNT)
    assert index["status"] == "READY" and index["type"] == "vectorSearch"
    assert index["latestDefinition"] == definition
    assert index["modelgate"] == {"indexed": COUNT, "pending": 0, "failed": 0}
    yield collection
    collection.drop_search_index("vi")


def ids_and_scores(docs: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(doc["_id"], doc["score"]) for doc in docs]


def assert_same_ranking(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def test_exact_search_equals_numpy(items: Any) -> None:
    got = list(
        items.aggregate([stage(exact=True, numCandidates=None), {"$project": {"score": SCORE}}])
    )
    assert_same_ranking(ids_and_scores(got), exact_top(QUERY, list(range(COUNT)), VECTORS, 10))


def test_approximate_search_finds_the_nearest(items: Any) -> None:
    got = ids_and_scores(list(items.aggregate([stage(), {"$project": {"score": SCORE}}])))
    expected = exact_top(QUERY, list(range(COUNT)), VECTORS, 10)
    assert len({i for i, _ in got} & {i for i, _ in expected}) >= 9
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)


def test_without_later_stages_the_documents_come_as_stored(
    items: Any, direct: Client, db_name: str
) -> None:
    got = list(items.aggregate([stage(limit=3)]))
    stored = {
        doc["_id"]: doc
        for doc in direct[db_name].items.find({"_id": {"$in": [d["_id"] for d in got]}})
    }
    assert got == [stored[doc["_id"]] for doc in got]


@pytest.mark.parametrize("exact", [True, False])
def test_filter(items: Any, exact: bool) -> None:
    filter_doc = {
        "$and": [{"category": {"$in": ["a", "c"]}}, {"n": {"$gte": 30}}],
        "n": {"$ne": 42},
    }
    chosen = [i for i in range(COUNT) if CATEGORIES[i % 3] in ("a", "c") and i >= 30 and i != 42]
    extra = {"exact": True, "numCandidates": None} if exact else {"numCandidates": 200}
    got = ids_and_scores(
        list(items.aggregate([stage(filter=filter_doc, **extra), {"$project": {"score": SCORE}}]))
    )
    expected = exact_top(QUERY, chosen, VECTORS[chosen], 10)
    assert {i for i, _ in got} <= set(chosen)
    if exact:
        assert_same_ranking(got, expected)
    else:
        assert len({i for i, _ in got} & {i for i, _ in expected}) >= 9


def test_later_stages_with_the_score(items: Any) -> None:
    expected = exact_top(QUERY, list(range(COUNT)), VECTORS, 20)
    got = list(
        items.aggregate(
            [
                stage(limit=20, numCandidates=None, exact=True),
                {"$project": {"n": 1, "category": 1, "score": SCORE}},
                {"$match": {"category": "b"}},
                {"$addFields": {"percent": {"$multiply": [SCORE, 100]}}},
                {"$limit": 3},
            ]
        )
    )
    best_b = [(i, s) for i, s in expected if CATEGORIES[i % 3] == "b"][:3]
    assert_same_ranking(ids_and_scores(got), best_b)
    for doc in got:
        assert set(doc) == {"_id", "n", "category", "score", "percent"}
        assert doc["percent"] == pytest.approx(doc["score"] * 100)


def test_get_more_pages_through_the_upstream_cursor(items: Any) -> None:
    cursor = items.aggregate([stage(limit=100, numCandidates=None, exact=True)], batchSize=7)
    assert [doc["_id"] for doc in cursor] == [
        i for i, _ in exact_top(QUERY, list(range(COUNT)), VECTORS, 100)
    ]


def test_out_writes_the_matches(items: Any, db: Any) -> None:
    items.aggregate([stage(limit=5), {"$set": {"score": SCORE}}, {"$out": "best"}])
    written = list(db.best.find())
    assert len(written) == 5
    assert all("score" in doc and not any(k.startswith("__") for k in doc) for doc in written)


def test_writes_through_the_proxy_are_seen(items: Any) -> None:
    query = QUERY.tolist()
    items.insert_one({"_id": "new", "v": query, "category": "a", "n": 1000})

    def top() -> Any:
        first = list(items.aggregate([stage(limit=1), {"$project": {"score": SCORE}}]))
        return first if first and first[0]["_id"] == "new" else None

    (hit,) = wait_for(top, what="the inserted document at the top")
    assert hit["score"] == pytest.approx(1.0)
    items.update_one({"_id": "new"}, {"$set": {"v": (-QUERY).tolist()}})
    wait_for(lambda: top() is None, what="the updated document gone from the top")
    items.delete_one({"_id": "new"})
    wait_for(
        lambda: wait_ready(items, "vi", COUNT),
        what="the deleted document gone from the index",
    )


def test_missing_index_gives_nothing(items: Any) -> None:
    assert list(items.aggregate([stage(index="nope")])) == []
    assert list(items.database.nothing_here.aggregate([stage()])) == []


@pytest.mark.parametrize(
    ("pipeline", "code", "message"),
    [
        (
            [{"$match": {}}, stage()],
            40602,
            "$vectorSearch is only valid as the first stage in a pipeline.",
        ),
        (
            [stage(queryVector=[1.0, 2.0])],
            8,
            "vector field is indexed with 8 dimensions but queried with 2",
        ),
        ([stage(filter={"v": 1})], 8, "Path 'v' needs to be indexed as filter"),
        ([stage(numCandidates=5)], 8, "limit should be less than or equal to numCandidates"),
        ([stage(path="w")], 8, "Path 'w' needs to be indexed as vector"),
        ([stage(filter={"n": {"$regex": "x"}})], 8, 'Operator "$regex" is not supported'),
    ],
)
def test_errors_as_mongodb_gives_them(
    items: Any, pipeline: list[Any], code: int, message: str
) -> None:
    with pytest.raises(pymongo.errors.OperationFailure) as caught:
        list(items.aggregate(pipeline))
    assert caught.value.code == code
    assert message in str(caught.value)


OTHERS = vectors(40, seed=11)


def test_union_with_of_two_vector_searches_on_two_collections(items: Any, db: Any) -> None:
    """MongoDB 8.0 takes $vectorSearch first in a $unionWith's sub-pipeline: each search
    runs on its own collection's index, and each side comes in its own score order."""
    others = db.others
    others.insert_many([{"_id": i, "v": OTHERS[i].tolist(), "n": i} for i in range(40)])
    definition = {
        "fields": [{"type": "vector", "path": "v", "numDimensions": DIM, "similarity": "cosine"}]
    }
    others.create_search_index(SearchIndexModel(definition, name="vi", type="vectorSearch"))
    wait_ready(others, "vi", 40)
    try:

        def side(name: str, limit: int) -> list[Any]:
            return [
                stage(exact=True, numCandidates=None, limit=limit),
                {"$project": {"score": SCORE, "side": {"$literal": name}}},
            ]

        got = list(
            items.aggregate(
                [*side("items", 5), {"$unionWith": {"coll": "others", "pipeline": side("o", 4)}}]
            )
        )
        assert [doc["side"] for doc in got] == ["items"] * 5 + ["o"] * 4
        assert_same_ranking(
            ids_and_scores(got[:5]), exact_top(QUERY, list(range(COUNT)), VECTORS, 5)
        )
        assert_same_ranking(ids_and_scores(got[5:]), exact_top(QUERY, list(range(40)), OTHERS, 4))
        assert not any(key.startswith("__") for doc in got for key in doc)

        # The outer pipeline need not search; a union within a union is served too.
        nested = {"coll": "items", "pipeline": side("items", 2)}
        got = list(
            items.aggregate(
                [
                    {"$match": {"n": {"$lt": 2}}},
                    {"$project": {"n": 1}},
                    {
                        "$unionWith": {
                            "coll": "others",
                            "pipeline": [*side("o", 3), {"$unionWith": nested}],
                        }
                    },
                ]
            )
        )
        assert [doc.get("side") for doc in got] == [None, None, "o", "o", "o", "items", "items"]
        assert_same_ranking(ids_and_scores(got[2:5]), exact_top(QUERY, list(range(40)), OTHERS, 3))
        assert_same_ranking(
            ids_and_scores(got[5:]), exact_top(QUERY, list(range(COUNT)), VECTORS, 2)
        )

        # Still refused where MongoDB refuses it.
        with pytest.raises(pymongo.errors.OperationFailure) as caught:
            list(
                items.aggregate(
                    [{"$unionWith": {"coll": "others", "pipeline": [{"$match": {}}, stage()]}}]
                )
            )
        assert caught.value.code == 40602
    finally:
        others.drop_search_index("vi")


def test_list_search_indexes_by_name_and_with_later_stages(items: Any) -> None:
    (index,) = listed(items)
    assert [i["name"] for i in items.list_search_indexes("vi")] == ["vi"]
    assert list(items.list_search_indexes("nope")) == []
    by_id = list(items.aggregate([{"$listSearchIndexes": {"id": index["id"]}}]))
    assert [i["name"] for i in by_id] == ["vi"]
    projected = list(
        items.aggregate(
            [{"$listSearchIndexes": {}}, {"$project": {"_id": 0, "name": 1, "status": 1}}]
        )
    )
    assert projected == [{"name": "vi", "status": "READY"}]


# --------------------------------------------------------------------------- autoEmbed


def test_query_text_through_an_auto_embed_index(client: Client, db: Any, db_name: str) -> None:
    tokenizer = text_models.tokenizer_json()
    vocab = len(json.loads(tokenizer)["model"]["vocab"])
    model = f"{db_name}_text"
    client.admin.command(
        {
            "registerModel": model,
            "collection": f"{db_name}.unused",
            "input": "text",
            "onnx": text_models.lookup_encoder(vocab, DIM, pooled=True),
            "preprocess": {"kind": "text", "tokenizer": tokenizer},
            "postprocess": {"kind": "embedding", "normalize": True},
        }
    )
    try:
        texts = text_models.sample_texts(12, seed=3)
        db.products.insert_many([{"_id": i, "description": t, "n": i} for i, t in enumerate(texts)])
        auto = {"type": "autoEmbed", "modality": "text", "path": "description", "model": model}
        definition = {"fields": [auto, {"type": "filter", "path": "n"}]}
        db.products.create_search_index(
            SearchIndexModel(definition, name="semantic", type="vectorSearch")
        )
        wait_ready(db.products, "semantic", len(texts))
        for query in (texts[5], {"text": texts[5]}):
            got = list(
                db.products.aggregate(
                    [
                        {
                            "$vectorSearch": {
                                "index": "semantic",
                                "path": "description",
                                "query": query,
                                "numCandidates": 20,
                                "limit": 3,
                                "filter": {"n": {"$lte": 10}},
                            }
                        },
                        {"$project": {"_id": 1, "score": SCORE}},
                    ]
                )
            )
            assert got[0]["_id"] == 5 and got[0]["score"] == pytest.approx(1.0, abs=1e-5)
            assert len(got) == 3
        db.products.drop_search_index("semantic")
    finally:
        client.admin.command("dropModel", model)


# --------------------------------------------------------------------------- mongosh, Node


def _run(command: list[str], cwd: Path = ROOT) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _last_json(output: str) -> Any:
    lines = [line for line in output.splitlines() if line.strip().startswith(("{", "["))]
    assert lines, output
    return json.loads(lines[-1])


MONGOSH_SCRIPT = """
const rows = %(rows)s;
db.docs.insertMany(rows.map((v, i) => ({_id: i, v: v, tag: i %% 2 ? "odd" : "even"})));
db.docs.createSearchIndex("vi", "vectorSearch", {fields: [
  {type: "vector", path: "v", numDimensions: %(dim)d, similarity: "euclidean"},
  {type: "filter", path: "tag"}]});
let ready = false;
for (let i = 0; i < 600 && !ready; i++) {
  const [index] = db.docs.getSearchIndexes("vi");
  ready = index && index.queryable && index.modelgate.indexed === rows.length;
  if (!ready) sleep(100);
}
const found = db.docs.aggregate([
  {$vectorSearch: {index: "vi", path: "v", queryVector: %(query)s, exact: true, limit: 4,
                   filter: {tag: "even"}}},
  {$project: {_id: 1, score: {$meta: "vectorSearchScore"}}}]).toArray();
let error = null;
try { db.docs.aggregate([{$match: {}}, {$vectorSearch: {}}]).toArray(); }
catch (e) { error = e.code; }
print(EJSON.stringify({ready, found, error, names: db.docs.getSearchIndexes().map(i => i.name)}));
"""


@pytest.mark.skipif(not MONGOSH.exists() or NODE is None, reason="mongosh is not installed: npm ci")
def test_mongosh_create_search_index_and_vector_search(proxy: ProxyProcess, db_name: str) -> None:
    rows = VECTORS[:20]
    script = MONGOSH_SCRIPT % {
        "rows": json.dumps(rows.tolist()),
        "dim": DIM,
        "query": json.dumps(QUERY.tolist()),
    }
    result = _last_json(
        _run([str(MONGOSH), f"{proxy.uri}{db_name}", "--quiet", "--norc", "--eval", script])
    )
    assert result["ready"] and result["error"] == 40602 and result["names"] == ["vi"]
    even = [i for i in range(20) if i % 2 == 0]
    distance = np.linalg.norm(rows[even] - QUERY, axis=1)
    expected = [even[i] for i in np.argsort(distance)[:4]]
    assert [doc["_id"] for doc in result["found"]] == expected
    scores = [doc["score"] for doc in result["found"]]
    assert np.allclose(scores, 1 / (1 + np.sort(distance)[:4]), atol=1e-5)


NODE_SCRIPT = """
const { MongoClient } = require('mongodb');
(async () => {
  const client = new MongoClient(process.argv[1], { serverSelectionTimeoutMS: 5000 });
  try {
    await client.connect();
    const coll = client.db(process.argv[2]).collection('items');
    const query = JSON.parse(process.argv[3]);
    const found = await coll.aggregate([
      { $vectorSearch: { index: 'vi', path: 'v', queryVector: query, numCandidates: 100, limit: 5,
                         exact: false } },
      { $project: { _id: 1, score: { $meta: 'vectorSearchScore' } } }]).toArray();
    const indexes = await coll.listSearchIndexes().toArray();
    console.log(JSON.stringify({ found, names: indexes.map((i) => i.name) }));
  } finally { await client.close(); }
})().catch((err) => { console.error(err); process.exit(1); });
"""


@pytest.mark.skipif(
    NODE is None or not (ROOT / "node_modules" / "mongodb").exists(), reason="npm ci"
)
def test_node_driver_vector_search(items: Any, proxy: ProxyProcess, db_name: str) -> None:
    assert NODE is not None
    result = _last_json(
        _run([NODE, "-e", NODE_SCRIPT, proxy.uri, db_name, json.dumps(QUERY.tolist())])
    )
    assert result["names"] == ["vi"]
    expected = exact_top(QUERY, list(range(COUNT)), VECTORS, 5)
    got = [(doc["_id"], doc["score"]) for doc in result["found"]]
    assert len({i for i, _ in got} & {i for i, _ in expected}) >= 4


# --------------------------------------------------------------------------- passthrough


def test_passthrough_leaves_search_to_the_upstream(
    upstream_uri: str, tmp_path: Path, db_name: str
) -> None:
    args = ("--data-dir", str(tmp_path), "--search", "passthrough")
    with ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=args) as process:
        client: Client
        with pymongo.MongoClient(process.uri) as client:
            collection: Any = client[db_name].items
            collection.insert_one({"_id": 1, "v": [1.0, 0.0]})
            for call in (
                lambda: list(collection.aggregate([stage()])),
                lambda: list(collection.list_search_indexes()),
                lambda: collection.create_search_index(
                    SearchIndexModel({"fields": []}, name="vi", type="vectorSearch")
                ),
            ):
                # SecantusDB has no search of its own: its refusal comes through untouched.
                with pytest.raises(pymongo.errors.OperationFailure) as caught:
                    call()
                assert caught.value.code == 115, caught.value.details


def test_inserts_through_the_proxy_are_indexed_without_change_streams(
    upstream_uri: str, tmp_path: Path, db_name: str, direct: Client
) -> None:
    """With no change streams and no sweep in sight, only the proxy's word that it wrote
    a document brings it into the index: a document written around the proxy stays out."""
    args = (
        "--data-dir",
        str(tmp_path),
        "--no-change-streams",
        "--search-sweep-interval",
        "3600",
    )
    with ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=args) as process:
        client: Client
        with pymongo.MongoClient(process.uri) as client:
            collection: Any = client[db_name].items
            collection.insert_many([{"_id": i, "v": VECTORS[i].tolist()} for i in range(10)])
            definition = {
                "fields": [
                    {"type": "vector", "path": "v", "numDimensions": DIM, "similarity": "cosine"}
                ]
            }
            collection.create_search_index(
                SearchIndexModel(definition, name="vi", type="vectorSearch")
            )
            wait_ready(collection, "vi", 10)
            direct[db_name].items.insert_one({"_id": "around", "v": QUERY.tolist()})
            collection.insert_one({"_id": "through", "v": QUERY.tolist()})

            def found() -> list[Any]:
                got = [d["_id"] for d in collection.aggregate([stage(limit=2)])]
                return got if "through" in got else []

            assert wait_for(found, what="the document inserted through the proxy")[0] == "through"
            assert "around" not in found()
            collection.drop_search_index("vi")
