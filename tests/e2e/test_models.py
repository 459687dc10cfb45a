"""Inline models end to end: real pymongo, through `modelgate serve`, in front of a real
upstream. Predictions are read back straight from the upstream (`direct`), so what is
checked is what was stored."""

from __future__ import annotations

import datetime
import io
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pymongo
import pymongo.errors
import pytest
from PIL import Image

from bench.support import onnx_models
from bench.support.processes import ProxyProcess
from engine.outputs import softmax

LABELS = ["a", "b", "c"]
CLASSIFY = {"kind": "classify", "labels": LABELS, "topK": 2}
# One-hot inputs of the linear classifier and the class each one scores highest.
KNOWN = [([1, 0, 0, 0], "a"), ([0, 1, 0, 0], "b"), ([0, 0, 1, 0], "c"), ([0, 0, 0, 1], "a")]

Register = Callable[..., dict[str, Any]]


def register_command(name: str, collection: str, onnx: bytes, **fields: Any) -> dict[str, Any]:
    command: dict[str, Any] = {
        "registerModel": name,
        "collection": collection,
        "input": fields.pop("input", "x"),
        "mode": fields.pop("mode", "inline"),
        "onnx": bson.Binary(onnx),
    }
    command.update(fields)
    return command


@pytest.fixture
def register(client: pymongo.MongoClient, db_name: str) -> Iterator[Register]:  # type: ignore[type-arg]
    """register(suffix, onnx, collection="items", **fields) -> reply; the model is named
    after the test and dropped afterwards (the session's proxy and registry are shared)."""
    names: set[str] = set()

    def register_model(
        suffix: str, onnx: bytes, collection: str = "items", **fields: Any
    ) -> dict[str, Any]:
        name = f"{db_name}_{suffix}"
        names.add(name)
        command = register_command(name, f"{db_name}.{collection}", onnx, **fields)
        return dict(client.admin.command(command))

    yield register_model
    for name in names:
        try:
            client.admin.command("dropModel", name)
        except pymongo.errors.OperationFailure as exc:
            assert exc.code == 4, exc  # already dropped by the test


def png(
    color: int | tuple[int, int, int], size: tuple[int, int] = (28, 28), mode: str = "L"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_scores(x: list[float]) -> np.ndarray:
    return softmax(onnx_models.linear_logits(np.array([x]))[0].astype(np.float64))


def stored(direct: pymongo.MongoClient, db_name: str, collection: str = "items") -> list[dict]:  # type: ignore[type-arg]
    return list(direct[db_name][collection].find().sort("_id", 1))


# --------------------------------------------------------------------------- admin commands


def test_register_list_status_drop_round_trip(register, client, db, db_name, direct) -> None:
    reply = register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    name = f"{db_name}_lin"
    assert reply["ok"] == 1.0
    assert reply["name"] == name
    assert reply["version"] == 1
    assert "CPUExecutionProvider" in reply["providers"]

    listed = {m["name"]: m for m in client.admin.command("listModels")["models"]}
    model = listed[name]
    assert model["version"] == 1
    assert model["namespace"] == f"{db_name}.items"
    assert model["input"] == "x"
    assert model["output"] == f"_outputs.{name}"
    assert model["mode"] == "inline"
    assert "CPUExecutionProvider" in model["providers"]
    assert isinstance(model["created"], datetime.datetime)

    db.items.insert_many([{"x": x} for x, _ in KNOWN])
    db.items.insert_one({"x": KNOWN[1][0]})
    status = client.admin.command("modelStatus", name)
    assert status["name"] == name
    assert status["version"] == 1
    assert status["predicted"] == 5
    assert status["errors"] == 0
    assert 1 <= status["batches"] <= 5
    assert status["meanBatchSize"] == pytest.approx(5 / status["batches"])
    latency = status["latencyMs"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert "CPUExecutionProvider" in status["providers"]

    dropped = client.admin.command("dropModel", name)
    assert dropped["version"] == 1
    assert name not in {m["name"] for m in client.admin.command("listModels")["models"]}
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        client.admin.command("modelStatus", name)
    assert failure.value.code == 4
    # Writes after the drop are not predicted; outputs already stored stay.
    db.items.insert_one({"x": [1, 0, 0, 0], "after": True})
    docs = stored(direct, db_name)
    assert all("_outputs" in d for d in docs if not d.get("after"))
    assert "_outputs" not in direct[db_name].items.find_one({"after": True})


# --------------------------------------------------------------------------- known answers


def test_tensor_input_known_answers(register, db, db_name, direct) -> None:
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    out = f"{db_name}_lin"
    db.items.insert_many([{"i": i, "x": x} for i, (x, _) in enumerate(KNOWN)])
    for doc in stored(direct, db_name):
        x, label = KNOWN[doc["i"]]
        prediction = doc["_outputs"][out]
        scores = expected_scores(x)
        assert prediction["label"] == label
        assert prediction["score"] == pytest.approx(scores.max(), rel=1e-5)
        assert prediction["version"] == 1
        top = prediction["top"]
        assert [t["label"] for t in top] == [LABELS[i] for i in np.argsort(-scores)[:2]]
        assert [t["score"] for t in top] == pytest.approx(sorted(scores, reverse=True)[:2])


def test_image_input_known_answers(register, db, db_name, direct) -> None:
    register(
        "img",
        onnx_models.image_classifier(1, (28, 28)),
        input="image",
        preprocess={"kind": "image", "size": [28, 28], "mode": "L"},
        postprocess={"kind": "classify", "labels": ["black", "white"], "topK": 1},
    )
    images = {
        "black": png(0),
        "white": png(255),
        "big-white-rgb": png((255, 255, 255), (64, 40), "RGB"),  # resized and converted
        "big-black-rgb": png((0, 0, 0), (13, 50), "RGB"),
    }
    db.items.insert_many(
        [{"name": name, "image": bson.Binary(data)} for name, data in images.items()]
    )
    got = {d["name"]: d["_outputs"][f"{db_name}_img"]["label"] for d in stored(direct, db_name)}
    assert got == {
        "black": "black",
        "white": "white",
        "big-white-rgb": "white",
        "big-black-rgb": "black",
    }


def test_embedding_and_raw_outputs(register, db, db_name, direct) -> None:
    register("emb", onnx_models.embedding_model(8, factor=2.0), postprocess={"kind": "embedding"})
    register("raw", onnx_models.linear_classifier(), collection="raw", postprocess={"kind": "raw"})
    vector = [0.5 * i for i in range(8)]
    db.items.insert_one({"x": vector})
    db.raw.insert_one({"x": [1, 2, 3, 4]})
    embedded = direct[db_name].items.find_one()["_outputs"][f"{db_name}_emb"]
    assert embedded == {"vector": pytest.approx([2 * v for v in vector]), "version": 1}
    raw = direct[db_name].raw.find_one()["_outputs"][f"{db_name}_raw"]
    expected = onnx_models.linear_logits(np.array([[1, 2, 3, 4]]))[0]
    assert raw["value"] == pytest.approx(expected.tolist(), rel=1e-6)
    assert raw["version"] == 1


# --------------------------------------------------------------------------- every write form


def test_insert_in_body_and_in_document_sequence(register, db, db_name, direct) -> None:
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    out = f"{db_name}_lin"
    # The documents in the command body (kind 0 section)...
    reply = db.command("insert", "items", documents=[{"via": "body", "x": x} for x, _ in KNOWN])
    assert reply["n"] == len(KNOWN)
    # ... and as a document sequence (kind 1), as insert_many sends them.
    db.items.insert_many([{"via": "sequence", "x": x} for x, _ in KNOWN])
    for via in ("body", "sequence"):
        docs = list(direct[db_name].items.find({"via": via}).sort("_id", 1))
        assert [d["_outputs"][out]["label"] for d in docs] == [label for _, label in KNOWN]


def test_updates_upserts_replacements_and_find_and_modify(register, db, db_name, direct) -> None:
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    out = f"{db_name}_lin"
    items = direct[db_name].items

    def label(query: dict[str, Any]) -> str:
        return items.find_one(query)["_outputs"][out]["label"]

    # Upsert with $set of the input: the upserted document is predicted.
    result = db.items.update_one({"k": 1}, {"$set": {"x": [0, 1, 0, 0]}}, upsert=True)
    assert result.upserted_id is not None
    assert label({"k": 1}) == "b"
    # Upsert whose input comes from the query's equality.
    db.items.update_one({"k": 2, "x": [0, 0, 1, 0]}, {"$set": {"y": 1}}, upsert=True)
    assert label({"k": 2}) == "c"
    # $set of the input recomputes the prediction.
    assert db.items.update_one({"k": 1}, {"$set": {"x": [0, 0, 1, 0]}}).modified_count == 1
    assert label({"k": 1}) == "c"
    # An update that does not touch the input leaves the prediction alone.
    db.items.update_one({"k": 1}, {"$inc": {"n": 1}})
    assert label({"k": 1}) == "c"
    # A replacement document is predicted.
    assert db.items.replace_one({"k": 1}, {"k": 1, "x": [1, 0, 0, 0]}).modified_count == 1
    assert label({"k": 1}) == "a"
    # findAndModify with an upsert, returning the new document with its prediction.
    after = db.items.find_one_and_update(
        {"k": 3},
        {"$set": {"x": [0, 1, 0, 0]}},
        upsert=True,
        return_document=pymongo.ReturnDocument.AFTER,
    )
    assert after["_outputs"][out]["label"] == "b"
    assert label({"k": 3}) == "b"
    # findAndModify updating an existing document.
    db.items.find_one_and_update({"k": 3}, {"$set": {"x": [0, 0, 0, 1]}})
    assert label({"k": 3}) == "a"


def test_client_bulk_write(register, client, db_name, direct) -> None:
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    out = f"{db_name}_lin"
    namespace = f"{db_name}.items"
    models = [
        pymongo.InsertOne({"k": 1, "x": [0, 1, 0, 0]}, namespace=namespace),
        pymongo.InsertOne({"k": 2, "x": [0, 0, 1, 0]}, namespace=f"{db_name}.other"),
        pymongo.UpdateOne(
            {"k": 3}, {"$set": {"x": [0, 0, 1, 0]}}, upsert=True, namespace=namespace
        ),
        pymongo.UpdateOne({"k": 1}, {"$set": {"x": [1, 0, 0, 0]}}, namespace=namespace),
    ]
    try:
        result = client.bulk_write(models)
    except (pymongo.errors.InvalidOperation, pymongo.errors.OperationFailure) as exc:
        if isinstance(exc, pymongo.errors.OperationFailure) and exc.code != 59:
            raise
        pytest.skip(f"the upstream does not take the bulkWrite command: {exc}")
    assert result.inserted_count == 2
    assert result.upserted_count == 1
    items = direct[db_name].items
    assert items.find_one({"k": 1})["_outputs"][out]["label"] == "a"
    assert items.find_one({"k": 3})["_outputs"][out]["label"] == "c"
    # The other namespace has no model: untouched.
    assert "_outputs" not in direct[db_name].other.find_one({"k": 2})


# --------------------------------------------------------------------------- failures


def test_on_error_record_stores_an_error_record(register, db, db_name, direct) -> None:
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY, onError="record")
    out = f"{db_name}_lin"
    db.items.insert_many(
        [{"i": 0, "x": [1, 0, 0, 0]}, {"i": 1, "x": [1, 2]}, {"i": 2, "x": "text"}]
    )
    docs = stored(direct, db_name)
    assert len(docs) == 3
    assert docs[0]["_outputs"][out]["label"] == "a"
    for doc in docs[1:]:
        record = doc["_outputs"][out]
        assert set(record) == {"error", "version"}
        assert record["version"] == 1
        assert record["error"]
    assert "4 values" in docs[1]["_outputs"][out]["error"]


def test_on_error_reject_ordered_stops_at_the_refused_document(register, db, db_name, direct):
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY, onError="reject")
    docs = [{"i": 0, "x": [1, 0, 0, 0]}, {"i": 1, "x": [0, 1, 0, 0]}, {"i": 2, "x": [1]}]
    docs += [{"i": 3, "x": [0, 0, 1, 0]}, {"i": 4, "x": "bad"}]
    with pytest.raises(pymongo.errors.BulkWriteError) as failure:
        db.items.insert_many(docs, ordered=True)
    details = failure.value.details
    assert [e["index"] for e in details["writeErrors"]] == [2]
    assert details["writeErrors"][0]["code"] == 121
    assert "could not predict" in details["writeErrors"][0]["errmsg"]
    assert details["nInserted"] == 2
    assert sorted(d["i"] for d in stored(direct, db_name)) == [0, 1]


def test_on_error_reject_unordered_stores_the_others(register, db, db_name, direct) -> None:
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)  # reject: default
    docs = [{"i": 0, "x": [1, 0, 0, 0]}, {"i": 1, "x": [1]}, {"i": 2, "x": [0, 1, 0, 0]}]
    docs += [{"i": 3, "x": None}, {"i": 4, "x": [0, 0, 1, 0]}]
    with pytest.raises(pymongo.errors.BulkWriteError) as failure:
        db.items.insert_many(docs, ordered=False)
    details = failure.value.details
    assert [e["index"] for e in details["writeErrors"]] == [1, 3]
    assert details["nInserted"] == 3
    docs_stored = stored(direct, db_name)
    assert sorted(d["i"] for d in docs_stored) == [0, 2, 4]
    assert all(d["_outputs"][f"{db_name}_lin"]["version"] == 1 for d in docs_stored)


def test_reject_keeps_upstream_write_errors_in_place(register, db, db_name, direct) -> None:
    """An unordered insert with one refusal (ours) and one duplicate key (the upstream's):
    both come back at the client's own indexes."""
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    docs = [
        {"_id": 1, "x": [1, 0, 0, 0]},
        {"_id": 2, "x": [1]},
        {"_id": 1, "x": [0, 1, 0, 0]},
        {"_id": 4, "x": [0, 0, 1, 0]},
    ]
    with pytest.raises(pymongo.errors.BulkWriteError) as failure:
        db.items.insert_many(docs, ordered=False)
    errors = failure.value.details["writeErrors"]
    assert [(e["index"], e["code"]) for e in errors] == [(1, 121), (2, 11000)]
    assert sorted(d["_id"] for d in stored(direct, db_name)) == [1, 4]


def test_reject_in_updates_find_and_modify_and_bulk_writes(register, client, db, db_name, direct):
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    out = f"{db_name}_lin"
    items = direct[db_name].items
    # Refused first statement of an ordered insert: nothing reaches MongoDB.
    with pytest.raises(pymongo.errors.BulkWriteError) as failure:
        db.items.insert_many([{"i": 0, "x": [1]}, {"i": 1, "x": [1, 0, 0, 0]}])
    assert [e["index"] for e in failure.value.details["writeErrors"]] == [0]
    assert failure.value.details["nInserted"] == 0
    assert items.count_documents({}) == 0
    # A collection's bulk_write: inserts, then updates (upserts) in one update command.
    with pytest.raises(pymongo.errors.BulkWriteError) as failure:
        db.items.bulk_write(
            [
                pymongo.UpdateOne({"k": 1}, {"$set": {"x": [0, 1, 0, 0]}}, upsert=True),
                pymongo.UpdateOne({"k": 2}, {"$set": {"x": "bad"}}, upsert=True),
                pymongo.UpdateOne({"k": 3}, {"$set": {"x": [0, 0, 1, 0]}}, upsert=True),
            ],
            ordered=False,
        )
    details = failure.value.details
    assert [e["index"] for e in details["writeErrors"]] == [1]
    assert sorted(u["index"] for u in details["upserted"]) == [0, 2]
    assert items.find_one({"k": 1})["_outputs"][out]["label"] == "b"
    assert items.find_one({"k": 2}) is None
    assert items.find_one({"k": 3})["_outputs"][out]["label"] == "c"
    # findAndModify whose new input cannot be predicted: refused, the document unchanged.
    with pytest.raises(pymongo.errors.OperationFailure) as op_failure:
        db.items.find_one_and_update({"k": 1}, {"$set": {"x": [1, 2]}})
    assert op_failure.value.code == 121
    assert items.find_one({"k": 1})["x"] == [0, 1, 0, 0]
    # An unacknowledged insert (w:0, moreToCome) is predicted all the same.
    unacknowledged = db.get_collection("items", write_concern=pymongo.WriteConcern(w=0))
    unacknowledged.insert_one({"k": 4, "x": [0, 0, 0, 1]})
    deadline = time.monotonic() + 10
    while items.find_one({"k": 4}) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert items.find_one({"k": 4})["_outputs"][out]["label"] == "a"
    # The client bulkWrite command: refusals at the client's own indexes.
    namespace = f"{db_name}.items"
    models = [
        pymongo.InsertOne({"k": 5, "x": [1, 0, 0, 0]}, namespace=namespace),
        pymongo.InsertOne({"k": 6, "x": [9]}, namespace=namespace),
        pymongo.InsertOne({"k": 7, "x": [0, 1, 0, 0]}, namespace=namespace),
    ]
    try:
        with pytest.raises(pymongo.errors.ClientBulkWriteException) as bulk_failure:
            client.bulk_write(models, ordered=False)
    except pymongo.errors.InvalidOperation as exc:
        pytest.skip(f"the upstream does not take the bulkWrite command: {exc}")
    assert [e["idx"] for e in bulk_failure.value.write_errors] == [1]
    assert bulk_failure.value.partial_result.inserted_count == 2
    assert sorted(d["k"] for d in items.find({"k": {"$gte": 5}})) == [5, 7]


# --------------------------------------------------------------------------- output and scope


def test_default_and_custom_output_and_other_collections(register, db, db_name, direct) -> None:
    register("dflt", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    register(
        "custom",
        onnx_models.linear_classifier(),
        collection="custom",
        output="prediction.cls",
        postprocess=CLASSIFY,
    )
    db.items.insert_one({"x": [0, 1, 0, 0]})
    db.custom.insert_one({"x": [0, 0, 1, 0]})
    db.untouched.insert_one({"x": [0, 0, 1, 0]})
    db.client[f"{db_name}_b"].items.insert_one({"x": [0, 0, 1, 0]})  # same name, other db
    try:
        assert direct[db_name].items.find_one()["_outputs"][f"{db_name}_dflt"]["label"] == "b"
        custom = direct[db_name].custom.find_one()
        assert custom["prediction"]["cls"]["label"] == "c"
        assert "_outputs" not in custom
        assert set(direct[db_name].untouched.find_one()) == {"_id", "x"}
        assert set(direct[f"{db_name}_b"].items.find_one()) == {"_id", "x"}
    finally:
        direct.drop_database(f"{db_name}_b")


# --------------------------------------------------------------------------- versions


def test_reregistering_makes_version_two(register, client, db, db_name, direct) -> None:
    out = f"{db_name}_lin"
    assert register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)["version"] == 1
    db.items.insert_one({"i": 1, "x": [1, 0, 0, 0]})
    upper = {"kind": "classify", "labels": ["A", "B", "C"], "topK": 1}
    assert register("lin", onnx_models.linear_classifier(), postprocess=upper)["version"] == 2
    db.items.insert_one({"i": 2, "x": [1, 0, 0, 0]})
    first, second = stored(direct, db_name)
    assert (first["_outputs"][out]["label"], first["_outputs"][out]["version"]) == ("a", 1)
    assert (second["_outputs"][out]["label"], second["_outputs"][out]["version"]) == ("A", 2)
    assert client.admin.command("modelStatus", out)["version"] == 2
    listed = {m["name"]: m for m in client.admin.command("listModels")["models"]}
    assert listed[out]["version"] == 2


def test_reregistering_while_twenty_clients_insert(register, proxy, db_name, direct) -> None:
    out = f"{db_name}_lin"
    register("lin", onnx_models.linear_classifier(), postprocess=CLASSIFY)
    switched = threading.Event()
    half_done = threading.Barrier(21)
    failures: list[BaseException] = []
    after_switch: list[Any] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        try:
            with pymongo.MongoClient(proxy.uri) as mongo_client:
                items = mongo_client[db_name].items
                for i in range(50):
                    if i == 25:
                        half_done.wait(timeout=60)
                    was_switched = switched.is_set()
                    result = items.insert_one({"t": t, "i": i, "x": [0, 1, 0, 0]})
                    if was_switched:
                        with lock:
                            after_switch.append(result.inserted_id)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            half_done.abort()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(20)]
    for thread in threads:
        thread.start()
    half_done.wait(timeout=60)  # every writer is mid-way: re-register under load
    v2 = {"kind": "classify", "labels": ["A", "B", "C"], "topK": 1}
    with pymongo.MongoClient(proxy.uri) as admin_client:
        reply = admin_client.admin.command(
            register_command(
                out, f"{db_name}.items", onnx_models.linear_classifier(), postprocess=v2
            )
        )
    assert reply["version"] == 2
    switched.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    docs = stored(direct, db_name)
    assert len(docs) == 20 * 50
    versions = {d["_id"]: d["_outputs"][out]["version"] for d in docs}
    labels = {d["_id"]: d["_outputs"][out]["label"] for d in docs}
    assert set(versions.values()) == {1, 2}
    assert all(labels[key] == ("b" if v == 1 else "B") for key, v in versions.items())
    assert after_switch, "no insert started after the switch"
    assert {versions[key] for key in after_switch} == {2}


# --------------------------------------------------------------------------- processes


def test_models_survive_a_restart_and_are_shared_by_proxies(
    client, upstream_uri: str, tmp_path: Path, db_name: str, direct
) -> None:
    name = f"{db_name}_lin"
    args = ("--data-dir", str(tmp_path), "--registry-refresh", "0.5")
    first = ProxyProcess(upstream_uri, tmp_path / "first.log", args=args)
    second = ProxyProcess(upstream_uri, tmp_path / "second.log", args=args)
    items = direct[db_name].items
    with first, second:
        try:
            with pymongo.MongoClient(first.uri) as first_client:
                first_client.admin.command(
                    register_command(
                        name,
                        f"{db_name}.items",
                        onnx_models.linear_classifier(),
                        postprocess=CLASSIFY,
                    )
                )
            # The second proxy, already running, picks the model up at its next refresh.
            with pymongo.MongoClient(second.uri) as second_client:
                deadline = time.monotonic() + 10
                while True:
                    inserted = second_client[db_name].items.insert_one({"x": [0, 0, 1, 0]})
                    doc = items.find_one({"_id": inserted.inserted_id})
                    if "_outputs" in doc or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            assert doc["_outputs"][name]["label"] == "c"
            assert doc["_outputs"][name]["version"] == 1
            # A restart keeps the model: the registry lives in the upstream.
            first.stop()
            first.start()
            with pymongo.MongoClient(first.uri) as restarted_client:
                assert name in {
                    m["name"] for m in restarted_client.admin.command("listModels")["models"]
                }
                inserted = restarted_client[db_name].items.insert_one({"x": [0, 1, 0, 0]})
            prediction = items.find_one({"_id": inserted.inserted_id})["_outputs"][name]
            assert (prediction["label"], prediction["version"]) == ("b", 1)
        finally:
            # Through the session's proxy, which shares the registry.
            try:
                client.admin.command("dropModel", name)
            except pymongo.errors.OperationFailure as exc:
                assert exc.code == 4, exc


def test_register_and_drop_are_immediate_despite_frequent_refreshes(
    client, upstream_uri: str, tmp_path: Path, db_name: str, direct
) -> None:
    """A registry refresh running while a model is registered or dropped must not apply
    its older view afterwards (un-serving the new model, or serving the dropped one)."""
    name = f"{db_name}_lin"
    args = ("--data-dir", str(tmp_path), "--registry-refresh", "0.005")
    items = direct[db_name].items
    with (
        ProxyProcess(upstream_uri, tmp_path / "proxy.log", args=args) as proxy_process,
        pymongo.MongoClient(proxy_process.uri) as busy,
    ):
        try:
            for round_number in range(8):
                busy.admin.command(
                    register_command(
                        name,
                        f"{db_name}.items",
                        onnx_models.linear_classifier(),
                        postprocess=CLASSIFY,
                    )
                )
                inserted = busy[db_name].items.insert_one({"x": [0, 1, 0, 0]})
                doc = items.find_one({"_id": inserted.inserted_id})
                assert "_outputs" in doc, f"round {round_number}: not predicted after register"
                busy.admin.command("dropModel", name)
                inserted = busy[db_name].items.insert_one({"x": [0, 1, 0, 0]})
                doc = items.find_one({"_id": inserted.inserted_id})
                assert "_outputs" not in doc, f"round {round_number}: predicted after drop"
        finally:
            try:
                client.admin.command("dropModel", name)
            except pymongo.errors.OperationFailure as exc:
                assert exc.code == 4, exc


class _HeldImage:
    """An HTTP server on 127.0.0.1 with one PNG whose every request is held, unanswered,
    until the test calls release(); `requested` is set once a request has come."""

    def __init__(self, body: bytes) -> None:
        self.requested = threading.Event()
        self.released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requested.set()
                # Bounded only so that a failing test cannot hang its server thread.
                owner.released.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/held.png"

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> _HeldImage:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def test_a_write_held_in_its_prediction_does_not_block_other_connections(
    register, proxy, db_name, direct
) -> None:
    """While one connection's insert is held inside its inline prediction (its image URL
    is served by a server that answers only when the test lets it), another connection's
    pings, reads, writes and inline predictions of the same model are answered. Then the
    held insert is released and stored with its prediction. No timing is measured: the
    held insert cannot finish before the release, whatever the machine's speed."""
    register(
        "img",
        onnx_models.image_classifier(1, (28, 28)),
        input="image",
        preprocess={"kind": "image", "size": [28, 28], "mode": "L"},
        postprocess={"kind": "classify", "labels": ["black", "white"], "topK": 1},
    )
    out = f"{db_name}_img"
    items = direct[db_name].items
    held_done = threading.Event()
    held_error: list[BaseException] = []

    with _HeldImage(png(255)) as server:

        def held_insert() -> None:
            try:
                with pymongo.MongoClient(proxy.uri) as held_client:
                    held_client[db_name].items.insert_one({"k": "held", "image": server.url})
            except BaseException as exc:
                held_error.append(exc)
            finally:
                held_done.set()

        with pymongo.MongoClient(proxy.uri) as other_client:
            other = other_client[db_name]
            other_client.admin.command("ping")  # connected before the held insert starts
            thread = threading.Thread(target=held_insert, daemon=True)
            thread.start()
            try:
                assert server.requested.wait(60), "the held insert's image was never fetched"
                # From here until release() the held insert waits for its image.
                other_client.admin.command("ping")
                other.other.insert_one({"k": "during"})
                assert other.other.find_one({"k": "during"}) is not None
                other.items.insert_one({"k": "beside", "image": bson.Binary(png(0))})
                beside = items.find_one({"k": "beside"})
                held_stored = items.find_one({"k": "held"})
                held_running = not held_done.is_set()
            finally:
                server.release()
                thread.join(timeout=60)
    assert not held_error, held_error
    assert held_running, "the held insert finished before its image was served"
    assert held_stored is None
    assert beside["_outputs"][out]["label"] == "black"
    assert items.find_one({"k": "held"})["_outputs"][out]["label"] == "white"
