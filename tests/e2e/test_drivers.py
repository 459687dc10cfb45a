"""pymongo through modelgate behaves as it does against MongoDB."""

from __future__ import annotations

import threading
import time

import bson
import pymongo
import pytest
from pymongo.cursor import CursorType
from pymongo.write_concern import WriteConcern

from bench.support.processes import ProxyProcess


def test_driver_sees_a_mongos_with_upstream_limits(client, direct) -> None:
    hello = client.admin.command("hello")
    upstream_hello = direct.admin.command("hello")
    assert hello["msg"] == "isdbgrid"
    for hidden in ("setName", "hosts", "primary", "me"):
        assert hidden not in hello
    for kept in (
        "maxWireVersion",
        "maxBsonObjectSize",
        "maxMessageSizeBytes",
        "maxWriteBatchSize",
        "logicalSessionTimeoutMinutes",
    ):
        assert hello[kept] == upstream_hello[kept]
    assert client.topology_description.topology_type_name == "Sharded"


def test_legacy_ismaster_handshake_is_rewritten(client) -> None:
    assert client.admin.command("isMaster")["msg"] == "isdbgrid"


def test_crud(db) -> None:
    people = db.people
    inserted = people.insert_one({"name": "ada", "age": 36})
    assert people.find_one({"_id": inserted.inserted_id})["name"] == "ada"
    assert people.update_one({"name": "ada"}, {"$inc": {"age": 1}}).modified_count == 1
    assert people.find_one({"name": "ada"})["age"] == 37
    assert people.replace_one({"name": "ada"}, {"name": "ada", "age": 1}).matched_count == 1
    assert (
        people.find_one_and_update(
            {"name": "ada"}, {"$set": {"age": 2}}, return_document=pymongo.ReturnDocument.AFTER
        )["age"]
        == 2
    )
    assert people.delete_one({"name": "ada"}).deleted_count == 1
    assert people.count_documents({}) == 0


def test_insert_many_ten_thousand(db) -> None:
    result = db.many.insert_many([{"i": i, "pad": "x" * 100} for i in range(10_000)])
    assert len(result.inserted_ids) == 10_000
    assert db.many.count_documents({}) == 10_000
    assert db.many.find_one({"i": 9_999})["pad"] == "x" * 100


def test_cursor_get_more_and_kill_cursors(db) -> None:
    db.items.insert_many([{"i": i} for i in range(1_000)])
    seen = [doc["i"] for doc in db.items.find().sort("i", 1).batch_size(50)]
    assert seen == list(range(1_000))
    cursor = db.items.find().batch_size(10)
    next(cursor)
    cursor_id = cursor.cursor_id
    assert cursor_id
    cursor.close()
    # The cursor is gone upstream: getMore on it fails with CursorNotFound.
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        db.command("getMore", cursor_id, collection="items")
    assert failure.value.code == 43


def test_exhaust_cursor_streams_every_batch(db) -> None:
    db.stream.insert_many([{"i": i} for i in range(5_000)])
    cursor = db.stream.find(cursor_type=CursorType.EXHAUST).batch_size(100)
    assert sorted(doc["i"] for doc in cursor) == list(range(5_000))
    # The connection is still usable afterwards.
    assert db.stream.count_documents({}) == 5_000


def test_aggregation(db) -> None:
    db.sales.insert_many([{"item": k, "qty": q} for k, q in [("a", 1), ("a", 2), ("b", 5)]])
    totals = {
        d["_id"]: d["total"]
        for d in db.sales.aggregate([{"$group": {"_id": "$item", "total": {"$sum": "$qty"}}}])
    }
    assert totals == {"a": 3, "b": 5}


def test_indexes_drop_and_listing(client, db) -> None:
    db.indexed.insert_one({"email": "a@b.c"})
    db.indexed.create_index("email", unique=True)
    assert "email_1" in db.indexed.index_information()
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db.indexed.insert_one({"email": "a@b.c"})
    assert "indexed" in db.list_collection_names()
    assert db.name in client.list_database_names()
    db.indexed.drop_index("email_1")
    assert "email_1" not in db.indexed.index_information()
    db.indexed.drop()
    assert "indexed" not in db.list_collection_names()


def test_transactions_commit_and_abort(client, db) -> None:
    db.create_collection("accounts")
    with client.start_session() as session:
        with session.start_transaction():
            db.accounts.insert_one({"_id": 1, "balance": 10}, session=session)
        session.start_transaction()
        db.accounts.insert_one({"_id": 2, "balance": 20}, session=session)
        session.abort_transaction()
    assert [d["_id"] for d in db.accounts.find()] == [1]


def test_change_stream_through_the_proxy(db) -> None:
    db.create_collection("events")
    with db.events.watch(max_await_time_ms=500) as stream:
        db.events.insert_one({"kind": "created"})
        change = stream.try_next()
        for _ in range(20):
            if change is not None:
                break
            change = stream.try_next()
    assert change is not None
    assert change["operationType"] == "insert"
    assert change["fullDocument"]["kind"] == "created"


@pytest.mark.parametrize("compressor", ["zlib", "zstd", "snappy"])
def test_compression(proxy, db_name, compressor) -> None:
    with pymongo.MongoClient(proxy.uri, compressors=compressor) as compressed:
        collection = compressed[db_name].packed
        collection.insert_many([{"i": i, "text": "compressible " * 20} for i in range(500)])
        assert collection.count_documents({}) == 500
        assert len(list(collection.find())) == 500
        pool = next(iter(compressed._topology._servers.values())).pool
        # The handshake agreed on the compressor, so the bytes above really were compressed.
        with pool.checkout() as conn:
            assert conn.compression_context is not None
            assert conn.compression_context.compressor_id is not None


def test_unacknowledged_writes(proxy, db_name, direct) -> None:
    with pymongo.MongoClient(proxy.uri) as w0:
        collection = w0[db_name].get_collection("fire", write_concern=WriteConcern(w=0))
        for i in range(100):
            collection.insert_one({"i": i})
        # The next acknowledged command on the same connection proves the stream is in sync.
        assert w0[db_name].command("ping")["ok"] == 1.0
    for _ in range(50):
        if direct[db_name].fire.count_documents({}) == 100:
            break
    assert direct[db_name].fire.count_documents({}) == 100


def test_document_near_16_megabytes(db) -> None:
    blob = bson.Binary(b"\x07" * (16 * 1024 * 1024 - 1024))
    db.big.insert_one({"_id": 1, "blob": blob})
    assert db.big.find_one({"_id": 1})["blob"] == bytes(blob)


def test_fifty_concurrent_clients(proxy, db_name) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with pymongo.MongoClient(proxy.uri) as own:
                collection = own[db_name].shared
                for i in range(20):
                    collection.insert_one({"client": n, "i": i})
                assert collection.count_documents({"client": n}) == 20
        except BaseException as exc:  # collected and re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with pymongo.MongoClient(proxy.uri) as check:
        assert check[db_name].shared.count_documents({}) == 1_000


def test_second_proxy_process_on_same_upstream(upstream_uri, db, tmp_path) -> None:
    db.shared.insert_one({"from": "first"})
    with ProxyProcess(upstream_uri, tmp_path / "second.log") as second:
        with pymongo.MongoClient(second.uri) as other:
            assert other[db.name].shared.find_one()["from"] == "first"


def test_streaming_hello_keeps_the_driver_on_the_proxy(proxy) -> None:
    # pymongo's monitor switches to streaming (exhaust) hello after its first heartbeat;
    # every streamed reply must be rewritten too, or the driver drops the "mongos".
    with pymongo.MongoClient(proxy.uri, heartbeatFrequencyMS=500) as monitored:
        monitored.admin.command("ping")
        time.sleep(3)
        assert monitored.admin.command("ping")["ok"] == 1.0
        servers = monitored.topology_description.server_descriptions().values()
        assert [s.server_type_name for s in servers] == ["Mongos"]
