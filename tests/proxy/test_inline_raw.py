"""Inline inserts keep the client's documents as BSON: what goes upstream is each document
as the client sent it, byte for byte, with the model's output appended; a document the
model does not predict goes as it came."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import bson
from bson import Decimal128, Int64, ObjectId
from bson.binary import Binary, UuidRepresentation

from engine.documents import FAITHFUL
from proxy.inline import InlineWrites
from proxy.session import AnswerLocally, ForwardRewritten, WriteDecision
from proxy.wire.opmsg import DocumentSequence, OpMsg
from tests.proxy.test_inline import BAD, A, B, _context, _hooked, _Served, _server

# Types a decode/encode round trip must not change, in an order that is not sorted.
DOCUMENT: dict[str, Any] = {
    "_id": ObjectId("64b7f0c2a1b2c3d4e5f60718"),
    "zeta": "héllo",
    "count": Int64(3),
    "price": Decimal128("9.90"),
    "at": datetime.datetime(2024, 5, 6, 7, 8, 9, 123000),
    "far": bson.DatetimeMS(2**62),
    "legacy": Binary(b"0123456789abcdef", 3),
    "id": Binary.from_uuid(uuid.UUID(int=5), UuidRepresentation.STANDARD),
    "nested": {"b": 1, "a": [1, {"c": None}]},
}


def _raw(document: dict[str, Any]) -> bytes:
    return bson.encode(document, codec_options=FAITHFUL)


async def _insert_sequence(documents: list[bytes], on_error: str = "reject") -> WriteDecision:
    writes = InlineWrites(_Served(_server(on_error)))  # type: ignore[arg-type]
    body = bson.encode({"insert": "coll", "ordered": False, "$db": "db"})
    message = OpMsg(0, body, (DocumentSequence("documents", tuple(documents)),))
    return await writes.intercept(_context(), "insert", message)


def _sent(decision: WriteDecision) -> list[bytes]:
    assert isinstance(decision, ForwardRewritten)
    [sequence] = decision.message.sequences
    assert sequence.identifier == "documents"
    return list(sequence.documents)


async def test_each_document_goes_as_sent_with_its_output_appended() -> None:
    sent = [_raw({**DOCUMENT, "x": A}), _raw({"x": B, **DOCUMENT})]
    forwarded = _sent(await _insert_sequence(sent))
    for client, upstream in zip(sent, forwarded, strict=True):
        assert upstream[4 : len(client) - 1] == client[4:-1]  # every element, byte for byte
        decoded = bson.decode(upstream, codec_options=FAITHFUL)
        assert list(decoded)[-1] == "_outputs"
        assert decoded == {
            **bson.decode(client, codec_options=FAITHFUL),
            "_outputs": decoded["_outputs"],
        }
        assert isinstance(decoded["count"], Int64) and decoded["far"] == DOCUMENT["far"]
    labels = [
        bson.decode(doc, codec_options=FAITHFUL)["_outputs"]["m"]["label"] for doc in forwarded
    ]
    assert labels == ["a", "b"]


async def test_a_document_the_model_does_not_predict_goes_as_it_came() -> None:
    without_input = _raw(DOCUMENT)
    sent = [without_input, _raw({"_id": 2, "x": A})]
    forwarded = _sent(await _insert_sequence(sent))
    assert forwarded[0] == without_input


async def test_an_output_already_there_is_replaced_in_its_place() -> None:
    sent = [_raw({"_id": 1, "_outputs": {"m": "old", "other": 1}, "x": A})]
    [forwarded] = _sent(await _insert_sequence(sent))
    decoded = bson.decode(forwarded, codec_options=FAITHFUL)
    assert list(decoded) == ["_id", "_outputs", "x"]
    assert list(decoded["_outputs"]) == ["m", "other"]
    assert decoded["_outputs"]["m"]["label"] == "a"
    assert forwarded.endswith(_raw({"x": A})[4:])


async def test_documents_the_model_refuses_are_left_out_at_their_index() -> None:
    sent = [_raw({"_id": 0, "x": A}), _raw({"_id": 1, "x": BAD}), _raw({"_id": 2, "x": "a"})]
    sent.append(_raw({"_id": 3, "items": [{"x": A}]}))  # no input "x": stored as it is
    sent.append(_raw({"_id": 4, "x": B}))
    decision = await _insert_sequence(sent)
    forwarded = _sent(decision)
    assert [bson.decode(doc)["_id"] for doc in forwarded] == [0, 3, 4]
    assert forwarded[1] == sent[3]
    reply = _hooked(decision, {"n": 3, "ok": 1.0})
    assert [(e["index"], e["code"]) for e in reply["writeErrors"]] == [(1, 121), (2, 121)]
    assert reply["n"] == 3


async def test_on_error_record_appends_the_error_record() -> None:
    sent = [_raw({"_id": 1, "x": BAD, "after": True})]
    [forwarded] = _sent(await _insert_sequence(sent, on_error="record"))
    assert forwarded[4 : len(sent[0]) - 1] == sent[0][4:-1]
    record = bson.decode(forwarded)["_outputs"]["m"]
    assert set(record) == {"error", "version"} and "expected 4 values" in record["error"]


async def test_body_documents_get_their_outputs_and_keep_their_types() -> None:
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    documents = [{**DOCUMENT, "x": A}, {"_id": 2, "x": BAD}]
    body = {"insert": "coll", "documents": documents, "ordered": False, "$db": "db"}
    decision = await writes.intercept(_context(), "insert", OpMsg(0, _raw(body)))
    assert isinstance(decision, ForwardRewritten)
    forwarded = bson.decode(decision.message.body, codec_options=FAITHFUL)
    [stored] = forwarded["documents"]
    assert {k: v for k, v in stored.items() if k != "_outputs"} == documents[0]
    assert stored["_outputs"]["m"]["label"] == "a"
    assert list(forwarded) == ["insert", "documents", "ordered", "$db"]


async def test_body_documents_that_are_not_documents_go_to_the_upstream_to_refuse() -> None:
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    body = {"insert": "coll", "documents": [{"x": A}, 5], "$db": "db"}
    decision = await writes.intercept(_context(), "insert", OpMsg(0, _raw(body)))
    assert not isinstance(decision, (ForwardRewritten, AnswerLocally))
