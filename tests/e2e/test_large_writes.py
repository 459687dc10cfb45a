"""Writes that inline predictions make larger than the upstream takes, end to end with
pymongo: split into several upstream commands and answered as one, or, for a single
document pushed over maxBsonObjectSize, refused with BSONObjectTooLarge (10334) while
the others are stored. Both the insert/update commands (collection methods) and MongoDB
8's bulkWrite command (MongoClient.bulk_write). What is checked is read back straight
from the upstream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import bson
import pymongo
import pymongo.errors
import pytest

from bench.support import onnx_models
from tests.e2e.test_models import Register, register_command

EMBEDDING = {"kind": "embedding"}
# An embedding model doubles its input: a document of NEAR floats becomes about 15 MB
# with its output, one of OVER floats about 18 MB, past the 16 MB maxBsonObjectSize.
NEAR = 480_000
OVER = 560_000


@pytest.fixture
def register(client: pymongo.MongoClient, db_name: str) -> Iterator[Register]:  # type: ignore[type-arg]
    """register(suffix, onnx, **fields) -> reply, on <db>.items; dropped afterwards."""
    names: list[str] = []

    def register_model(suffix: str, onnx: bytes, **fields: Any) -> dict[str, Any]:
        names.append(f"{db_name}_{suffix}")
        command = register_command(names[-1], f"{db_name}.items", onnx, **fields)
        return dict(client.admin.command(command))

    yield register_model
    for name in names:
        client.admin.command("dropModel", name)


def _vector(dim: int, seed: int) -> list[float]:
    return [float((seed + i) % 7) for i in range(dim)]


def test_insert_many_of_100000_documents_through_an_inline_model(
    register, db, db_name, direct
) -> None:
    register("emb", onnx_models.embedding_model(8), postprocess=EMBEDDING)
    pad = "p" * 360
    documents = [{"k": i, "x": _vector(8, i), "pad": pad} for i in range(100_000)]
    # pymongo packs these into messages of up to maxMessageSizeBytes: every one of them
    # is over the limit once the predictions are in.
    assert len(bson.encode({"documents": documents[:1000]})) * 100 > 40_000_000
    result = db.items.insert_many(documents)
    assert len(result.inserted_ids) == 100_000
    items = direct[db_name].items
    output = f"_outputs.{db_name}_emb.vector"
    assert items.count_documents({}) == 100_000
    assert items.count_documents({output: {"$exists": True}}) == 100_000
    last = items.find_one({"k": 99_999})
    assert last["_outputs"][f"{db_name}_emb"]["vector"] == [2 * v for v in _vector(8, 99_999)]


def test_documents_near_the_limit_are_split_across_upstream_commands(
    register, db, db_name, direct
) -> None:
    register("emb", onnx_models.embedding_model(NEAR), postprocess=EMBEDDING)
    documents = [{"k": i, "x": _vector(NEAR, i)} for i in range(5)]
    # One message as the client sends it (about 38 MB), about 76 MB with the outputs.
    result = db.items.insert_many(documents)
    assert len(result.inserted_ids) == 5
    items = direct[db_name].items
    for k in range(5):
        stored = items.find_one({"k": k})
        assert stored["_outputs"][f"{db_name}_emb"]["vector"] == [2 * v for v in _vector(NEAR, k)]
        assert len(bson.encode(stored)) > 15_000_000


def test_bulk_write_with_mixed_operations_that_must_split(register, db, db_name, direct) -> None:
    register("emb", onnx_models.embedding_model(NEAR), postprocess=EMBEDDING)
    out = f"{db_name}_emb"
    db.items.insert_many([{"_id": 100}, {"_id": 101}])
    operations: list[Any] = [pymongo.InsertOne({"_id": i, "x": _vector(NEAR, i)}) for i in range(4)]
    operations += [
        pymongo.ReplaceOne({"_id": 10 + i}, {"x": _vector(NEAR, 10 + i)}, upsert=True)
        for i in range(3)
    ]
    operations += [
        pymongo.UpdateOne({"_id": 100}, {"$set": {"x": _vector(NEAR, 100)}}),
        pymongo.UpdateOne({"_id": 20}, {"$set": {"x": _vector(NEAR, 20)}}, upsert=True),
        pymongo.UpdateOne({"_id": 101}, {"$set": {"x": _vector(NEAR, 101)}}),
        pymongo.DeleteOne({"_id": 0}),
    ]
    result = db.items.bulk_write(operations)
    assert result.inserted_count == 4
    assert result.matched_count == 2
    assert result.modified_count == 2
    assert result.deleted_count == 1
    # The upserts' indices are the client's, across the parts the proxy sent.
    assert result.upserted_ids == {4: 10, 5: 11, 6: 12, 8: 20}
    _assert_mixed_ops_stored(direct[db_name].items, out)


def _assert_mixed_ops_stored(items: Any, out: str) -> None:
    """What the mixed-ops tests leave: every inserted, replaced, upserted or updated
    document with the embedding of its own input, and the deleted one gone."""
    for _id in (1, 2, 3, 10, 11, 12, 20, 100, 101):
        stored = items.find_one({"_id": _id})
        assert stored["_outputs"][out]["vector"] == [2 * v for v in _vector(NEAR, _id)], _id
    assert items.find_one({"_id": 0}) is None


@pytest.mark.parametrize("ordered", [False, True])
def test_a_document_pushed_over_16_mb_gets_bson_object_too_large(
    register, db, db_name, direct, ordered: bool
) -> None:
    register("emb", onnx_models.embedding_model(OVER), postprocess=EMBEDDING)
    documents = [{"_id": 0}, {"_id": 1, "x": _vector(OVER, 1)}, {"_id": 2}]
    assert len(bson.encode(documents[1])) < 16 * 1024 * 1024
    with pytest.raises(pymongo.errors.BulkWriteError) as raised:
        db.items.insert_many(documents, ordered=ordered)
    details = raised.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(1, 10334)]
    assert details["nInserted"] == (1 if ordered else 2)
    stored = sorted(d["_id"] for d in direct[db_name].items.find({}, {"_id": 1}))
    assert stored == ([0] if ordered else [0, 2])
    # The connection stayed up: the same client goes on.
    assert db.items.count_documents({}) == len(stored)


# -- MongoDB 8's bulkWrite command (MongoClient.bulk_write) --------------------------------

# A vector of WIDE floats is about 3.2 kB of BSON; with its prediction a document doubles.
WIDE = 256


def test_client_bulk_write_of_48_mb_through_an_inline_model(
    register, client, db_name, direct
) -> None:
    register("emb", onnx_models.embedding_model(WIDE), postprocess=EMBEDDING)
    out = f"{db_name}_emb"
    count = 15_000
    models = [
        pymongo.InsertOne(
            {"_id": i, "x": _vector(WIDE, i)},
            namespace=f"{db_name}.{'other' if i % 10 == 9 else 'items'}",
        )
        for i in range(count)
    ]
    # pymongo packs the ops into bulkWrite commands of up to maxMessageSizeBytes: the first
    # is about 48 MB as sent and about twice that once the predictions are in.
    assert len(bson.encode({"x": _vector(WIDE, 0)})) * count > 48_000_000
    result = client.bulk_write(models, verbose_results=True)
    assert result.inserted_count == count
    assert sorted(result.insert_results) == list(range(count))
    assert all(result.insert_results[i].inserted_id == i for i in range(count))
    items, other = direct[db_name].items, direct[db_name].other
    assert items.count_documents({}) == count - count // 10
    assert items.count_documents(
        {f"_outputs.{out}.vector": {"$exists": True}}
    ) == items.count_documents({})
    assert other.count_documents({}) == count // 10
    assert other.count_documents({"_outputs": {"$exists": True}}) == 0
    last = items.find_one({"_id": count - 2})
    assert last["_outputs"][out]["vector"] == [2 * v for v in _vector(WIDE, count - 2)]


def test_client_bulk_write_with_mixed_operations_that_must_split(
    register, client, db_name, direct
) -> None:
    register("emb", onnx_models.embedding_model(NEAR), postprocess=EMBEDDING)
    out = f"{db_name}_emb"
    namespace = f"{db_name}.items"
    direct[db_name].items.insert_many([{"_id": 100}, {"_id": 101}, {"_id": 0}])
    models: list[Any] = [
        pymongo.InsertOne({"_id": i, "x": _vector(NEAR, i)}, namespace=namespace)
        for i in range(1, 4)
    ]
    models += [
        pymongo.ReplaceOne(
            {"_id": 10 + i}, {"x": _vector(NEAR, 10 + i)}, upsert=True, namespace=namespace
        )
        for i in range(3)
    ]
    models += [
        pymongo.UpdateOne({"_id": 100}, {"$set": {"x": _vector(NEAR, 100)}}, namespace=namespace),
        pymongo.UpdateOne(
            {"_id": 20}, {"$set": {"x": _vector(NEAR, 20)}}, upsert=True, namespace=namespace
        ),
        pymongo.UpdateOne({"_id": 101}, {"$set": {"x": _vector(NEAR, 101)}}, namespace=namespace),
        pymongo.DeleteOne({"_id": 0}, namespace=namespace),
    ]
    result = client.bulk_write(models, verbose_results=True)
    assert result.inserted_count == 3
    assert result.matched_count == 2
    assert result.modified_count == 2
    assert result.upserted_count == 4
    assert result.deleted_count == 1
    # The upserts' indices are the client's, across the parts the proxy sent.
    upserted = {i: r.upserted_id for i, r in result.update_results.items() if r.upserted_id}
    assert upserted == {3: 10, 4: 11, 5: 12, 7: 20}
    assert sorted(result.insert_results) == [0, 1, 2]
    assert sorted(result.delete_results) == [9]
    _assert_mixed_ops_stored(direct[db_name].items, out)


@pytest.mark.parametrize("ordered", [False, True])
def test_a_client_bulk_write_op_pushed_over_16_mb_gets_bson_object_too_large(
    register, client, db_name, direct, ordered: bool
) -> None:
    register("emb", onnx_models.embedding_model(OVER), postprocess=EMBEDDING)
    namespace = f"{db_name}.items"
    documents = [{"_id": 0}, {"_id": 1, "x": _vector(OVER, 1)}, {"_id": 2}]
    models = [pymongo.InsertOne(d, namespace=namespace) for d in documents]
    with pytest.raises(pymongo.errors.ClientBulkWriteException) as raised:
        client.bulk_write(models, ordered=ordered, verbose_results=True)
    errors = raised.value.write_errors
    assert [(e["idx"], e["code"]) for e in errors] == [(1, 10334)]
    partial = raised.value.partial_result
    assert partial.inserted_count == (1 if ordered else 2)
    assert sorted(partial.insert_results) == ([0] if ordered else [0, 2])
    stored = sorted(d["_id"] for d in direct[db_name].items.find({}, {"_id": 1}))
    assert stored == ([0] if ordered else [0, 2])
    # The connection stayed up: the same client goes on.
    assert client[db_name].items.count_documents({}) == len(stored)
