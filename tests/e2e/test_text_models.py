"""Text embedding models end to end: registered through modelgate (the admin command and
modelgate.register_model), texts written with pymongo, vectors read back straight from the
upstream and compared with onnxruntime run directly on the same tokenized texts
(bench.support.text_models.embed_reference)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pymongo
import pymongo.errors
import pytest

import modelgate
from bench.support import text_models
from bench.support.processes import ProxyProcess
from tests.e2e.test_deferred import wait_for

MODEL = text_models.text_encoder(dim=16, layers=2)
TYPED = text_models.text_encoder(dim=16, token_types=True)
POOLED = text_models.text_encoder(dim=16, pooled=True)
TEXTS = text_models.sample_texts(24, seed=7)
MEAN = {"kind": "embedding", "pooling": "mean", "normalize": True}

Register = Callable[..., str]


def preprocess(model: text_models.TextModel = MODEL, max_length: int = 32) -> dict[str, Any]:
    return {"kind": "text", "tokenizer": bson.Binary(model.tokenizer), "maxLength": max_length}


@pytest.fixture
def register(client: pymongo.MongoClient, db_name: str) -> Iterator[Register]:  # type: ignore[type-arg]
    """register(suffix, model=MODEL, **fields) -> the model's name (dropped afterwards)."""
    names: set[str] = set()

    def register_model(suffix: str, model: text_models.TextModel = MODEL, **fields: Any) -> str:
        name = f"{db_name}_{suffix}"
        names.add(name)
        command: dict[str, Any] = {
            "registerModel": name,
            "collection": f"{db_name}.{fields.pop('collection', 'texts')}",
            "input": "text",
            "onnx": bson.Binary(model.onnx),
            "preprocess": fields.pop("preprocess", preprocess(model)),
            "postprocess": fields.pop("postprocess", MEAN),
        }
        command.update(fields)
        client.admin.command(command)
        return name

    yield register_model
    for name in names:
        try:
            client.admin.command("dropModel", name)
        except pymongo.errors.OperationFailure as exc:
            assert exc.code == 4, exc


def stored_vectors(
    direct: pymongo.MongoClient,  # type: ignore[type-arg]
    db_name: str,
    name: str,
    collection: str = "texts",
) -> dict[Any, Any]:
    docs = direct[db_name][collection].find({}, {"_outputs": 1})
    return {doc["_id"]: doc.get("_outputs", {}).get(name) for doc in docs}


def check_vectors(
    outputs: dict[Any, Any],
    texts: dict[Any, str],
    model: text_models.TextModel = MODEL,
    **kwargs: Any,
) -> None:
    ids = sorted(texts)
    reference = text_models.embed_reference(model, [texts[i] for i in ids], **kwargs)
    got = np.array([outputs[i]["vector"] for i in ids])
    assert got.shape == (len(ids), model.dim)
    np.testing.assert_allclose(got, reference, atol=2e-5)
    assert {outputs[i]["version"] for i in ids} == {1}


def test_inline_text_embeddings_match_onnxruntime(register, db, db_name, direct) -> None:  # type: ignore[no-untyped-def]
    name = register("inline")
    texts = dict(enumerate(TEXTS))
    db.texts.insert_many([{"_id": i, "text": t} for i, t in texts.items()])
    check_vectors(stored_vectors(direct, db_name, name), texts, max_length=32, normalize=True)
    vector = np.array(stored_vectors(direct, db_name, name)[0]["vector"])
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-6


def test_deferred_text_embeddings_through_the_client_helper(  # type: ignore[no-untyped-def]
    client, register, db, db_name, direct
) -> None:
    name = f"{db_name}_deferred"
    modelgate.register_model(
        client,
        name,
        collection=f"{db_name}.texts",
        input="text",
        model=TYPED.onnx,
        mode="deferred",
        preprocess=preprocess(TYPED, max_length=8),
        postprocess={"kind": "embedding", "pooling": "cls"},
    )
    try:
        texts = dict(enumerate(TEXTS))
        db.texts.insert_many([{"_id": i, "text": t} for i, t in texts.items()])
        direct[db_name].texts.insert_one({"_id": 100, "text": "written around modelgate"})
        texts[100] = "written around modelgate"

        def all_embedded() -> dict[Any, Any] | None:
            outputs = stored_vectors(direct, db_name, name)
            return outputs if all(outputs.values()) else None

        outputs = wait_for(all_embedded, what="deferred text embeddings")
        assert outputs is not None
        check_vectors(outputs, texts, TYPED, max_length=8, pooling="cls")
    finally:
        modelgate.drop_model(client, name)


def test_a_pooled_output_model(register, db, db_name, direct) -> None:  # type: ignore[no-untyped-def]
    name = register(
        "pooled", POOLED, postprocess={"kind": "embedding"}, preprocess=preprocess(POOLED, 256)
    )
    texts = dict(enumerate(TEXTS[:5]))
    db.texts.insert_many([{"_id": i, "text": t} for i, t in texts.items()])
    check_vectors(stored_vectors(direct, db_name, name), texts, POOLED, pooling="none")


def test_mean_pooling_of_a_padded_batch_equals_each_text_alone(  # type: ignore[no-untyped-def]
    register, db, db_name, direct
) -> None:
    name = register("alone")
    alone_name = register("alone_single", collection="single")
    db.texts.insert_many([{"_id": i, "text": t} for i, t in enumerate(TEXTS)])
    for i, text in enumerate(TEXTS):
        db.single.insert_one({"_id": i, "text": text})
    together = stored_vectors(direct, db_name, name)
    alone = stored_vectors(direct, db_name, alone_name, "single")
    lengths = {len(text.split()) for text in TEXTS}
    assert len(lengths) > 3  # the batch really was padded
    np.testing.assert_allclose(
        [together[i]["vector"] for i in range(len(TEXTS))],
        [alone[i]["vector"] for i in range(len(TEXTS))],
        atol=1e-5,
    )


BAD = [3, "", "   ", None, ["a", "list"]]


def test_on_error_reject_refuses_only_the_bad_texts(register, db, db_name, direct) -> None:  # type: ignore[no-untyped-def]
    name = register("reject", onError="reject")
    docs = [{"_id": i, "text": TEXTS[i]} for i in range(3)]
    docs += [{"_id": 10 + i, "text": value} for i, value in enumerate(BAD)]
    with pytest.raises(pymongo.errors.BulkWriteError) as info:
        db.texts.insert_many(docs, ordered=False)
    errors = info.value.details["writeErrors"]
    assert sorted(e["index"] for e in errors) == list(range(3, 3 + len(BAD)))
    assert {e["code"] for e in errors} == {121}
    messages = {e["index"]: e["errmsg"] for e in errors}
    assert "expected a string, got int" in messages[3]
    assert "empty or whitespace-only" in messages[4] and "empty or whitespace-only" in messages[5]
    assert "expected a string, got null" in messages[6]
    outputs = stored_vectors(direct, db_name, name)
    assert sorted(outputs) == [0, 1, 2]
    check_vectors(outputs, {i: TEXTS[i] for i in range(3)}, max_length=32, normalize=True)


def test_on_error_record_stores_the_error(register, db, db_name, direct) -> None:  # type: ignore[no-untyped-def]
    name = register("record", onError="record")
    db.texts.insert_many(
        [{"_id": 0, "text": TEXTS[0]}] + [{"_id": 1 + i, "text": v} for i, v in enumerate(BAD)]
    )
    outputs = stored_vectors(direct, db_name, name)
    assert outputs[1] == {"error": "expected a string, got int", "version": 1}
    assert outputs[2]["error"] == "expected text, got an empty or whitespace-only string"
    assert outputs[4] == {"error": "expected a string, got null", "version": 1}
    assert outputs[5] == {"error": "expected a string, got list", "version": 1}
    check_vectors({0: outputs[0]}, {0: TEXTS[0]}, max_length=32, normalize=True)


def test_registration_refusals(client, db_name) -> None:  # type: ignore[no-untyped-def]
    command: dict[str, Any] = {
        "registerModel": f"{db_name}_bad",
        "collection": f"{db_name}.texts",
        "input": "text",
        "onnx": bson.Binary(MODEL.onnx),
        "preprocess": {"kind": "text", "tokenizer": bson.Binary(b'{"not": "a tokenizer"}')},
        "postprocess": MEAN,
    }
    with pytest.raises(pymongo.errors.OperationFailure) as info:
        client.admin.command(command)
    assert info.value.code == 2 and "does not load" in str(info.value)
    command["preprocess"] = {**preprocess(), "maxLength": 0}
    with pytest.raises(pymongo.errors.OperationFailure, match="maxLength"):
        client.admin.command(command)
    command["preprocess"] = preprocess()
    command["postprocess"] = {"kind": "embedding"}  # token states need pooling
    with pytest.raises(pymongo.errors.OperationFailure, match=r"set postprocess\.pooling"):
        client.admin.command(command)
    command["onnx"] = bson.Binary(text_models.lookup_encoder(10, 4, inputs=["ids", "mask"]))
    command["postprocess"] = MEAN
    with pytest.raises(pymongo.errors.OperationFailure, match="input_ids, attention_mask"):
        client.admin.command(command)


def test_another_process_reloads_the_text_model_from_the_registry(  # type: ignore[no-untyped-def]
    register, db_name, direct, upstream_uri, tmp_path: Path
) -> None:
    """The tokenizer travels as BinData in the stored spec: a second modelgate process
    reads it back from the registry and embeds exactly as the first."""
    name = register("reload")
    stored = direct.modelgate.models.find_one({"_id": name})
    assert stored["spec"]["preprocess"]["tokenizer"] == MODEL.tokenizer
    args = ("--data-dir", str(tmp_path))
    with (
        ProxyProcess(upstream_uri, tmp_path / "second.log", args=args) as second,
        pymongo.MongoClient[dict[str, Any]](second.uri) as second_client,
    ):
        second_client[db_name].texts.insert_one({"_id": 1, "text": TEXTS[1]})
    check_vectors(
        stored_vectors(direct, db_name, name), {1: TEXTS[1]}, max_length=32, normalize=True
    )
