"""Writes that predictions make too large for the upstream: how they are split into
parts, how the parts' replies are merged into the client's, and a session that learns
the limits from the upstream's hello and forwards a write in parts. No processes."""

from __future__ import annotations

from typing import Any

import bson
import pytest

from engine.documents import FAITHFUL
from proxy.hello import UpstreamLimits, limits_from_hello
from proxy.inline import InlineWrites
from proxy.split_writes import ForwardInParts, merge_write_replies, split_write
from proxy.wire.framing import Frame
from proxy.wire.opmsg import DocumentSequence, OpMsg, command_name, decode_op_msg, encode_op_msg
from tests.proxy.test_inline import A, B, _Served, _server
from tests.proxy.wired_session import body_of, op_msg, upstream_reply, wired_session

# Room for about three 1 kB statements per message.
SMALL = UpstreamLimits(max_bson_object_size=2_000, max_message_size_bytes=3_600)
LSID = {"id": bson.Binary(b"\x01" * 16, 4)}


def _statements(count: int, size: int = 1_000) -> list[tuple[int, bytes]]:
    return [(i, bson.encode({"_id": i, "pad": "p" * (size - 30)})) for i in range(count)]


def _part(message: OpMsg) -> tuple[dict[str, Any], list[int]]:
    """A part's body, and the _ids of its statements."""
    (sequence,) = message.sequences
    return bson.decode(message.body), [bson.decode(d)["_id"] for d in sequence.documents]


def _split(body: dict[str, Any], count: int, limits: UpstreamLimits = SMALL) -> ForwardInParts:
    message = OpMsg(0, bson.encode(body))
    return split_write(body, message, "documents", _statements(count), count, [], limits)


# -- splitting ---------------------------------------------------------------------------


def test_parts_fit_the_message_size_and_keep_the_order() -> None:
    split = _split({"insert": "c", "$db": "db"}, 10)
    parts = [_part(p) for p in split.parts]
    assert [ids for _, ids in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert all(len(p.body) + sum(map(len, p.sequences[0].documents)) < 3_600 for p in split.parts)
    assert all(body == {"insert": "c", "$db": "db"} for body, _ in parts)


def test_parts_fit_the_write_batch_size() -> None:
    limits = UpstreamLimits(max_write_batch_size=4)
    split = _split({"insert": "c", "$db": "db"}, 10, limits)
    assert [len(_part(p)[1]) for p in split.parts] == [4, 4, 2]


def test_a_retryable_write_keeps_its_identity_on_every_part_with_statement_ids() -> None:
    body = {"insert": "c", "ordered": False, "lsid": LSID, "txnNumber": bson.Int64(7), "$db": "db"}
    split = _split(body, 7)
    parts = [_part(p) for p in split.parts]
    assert [part["stmtIds"] for part, _ in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(part["lsid"] == LSID and part["txnNumber"] == 7 for part, _ in parts)
    assert split.ordered is False


def test_statement_ids_follow_the_clients_own() -> None:
    body = {"insert": "c", "lsid": LSID, "txnNumber": 1, "stmtId": 10, "$db": "db"}
    assert [_part(p)[0]["stmtIds"] for p in _split(body, 4).parts] == [[10, 11, 12], [13]]


def test_only_a_transactions_first_part_starts_it() -> None:
    body = {
        "insert": "c",
        "lsid": LSID,
        "txnNumber": 3,
        "autocommit": False,
        "startTransaction": True,
        "readConcern": {"level": "snapshot"},
        "$db": "db",
    }
    first, second = (_part(p)[0] for p in _split(body, 6).parts)
    assert first["startTransaction"] is True and first["readConcern"] == {"level": "snapshot"}
    assert "startTransaction" not in second and "readConcern" not in second
    assert second["autocommit"] is False and second["txnNumber"] == 3
    assert "stmtIds" not in first  # statements of a transaction are not retried one by one


# -- merging -----------------------------------------------------------------------------


def test_counts_upserts_and_write_errors_get_the_clients_indices() -> None:
    replies = [
        {"ok": 1.0, "n": 2, "nModified": 1, "upserted": [{"index": 1, "_id": "u1"}]},
        {
            "ok": 1.0,
            "n": 1,
            "nModified": 0,
            "upserted": [{"index": 0, "_id": "u2"}],
            "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup"}],
            "writeConcernError": {"code": 64, "errmsg": "timeout"},
            "operationTime": 9,
        },
    ]
    refused = [{"index": 5, "code": 10334, "errmsg": "too large"}]
    merged = merge_write_replies(replies, [[0, 1], [3, 4]], refused, ordered=False)
    assert merged["n"] == 3
    assert merged["nModified"] == 1
    assert merged["upserted"] == [{"index": 1, "_id": "u1"}, {"index": 3, "_id": "u2"}]
    assert [(e["index"], e["code"]) for e in merged["writeErrors"]] == [(4, 11000), (5, 10334)]
    assert merged["writeConcernError"]["code"] == 64
    assert merged["operationTime"] == 9


def test_an_ordered_write_that_failed_upstream_never_reached_the_refusal() -> None:
    replies = [{"ok": 1.0, "n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "d"}]}]
    refused = [{"index": 3, "code": 10334, "errmsg": "too large"}]
    merged = merge_write_replies(replies, [[0, 1, 2]], refused, ordered=True)
    assert [e["index"] for e in merged["writeErrors"]] == [0]
    clean = merge_write_replies([{"ok": 1.0, "n": 3}], [[0, 1, 2]], refused, ordered=True)
    assert [e["index"] for e in clean["writeErrors"]] == [3]
    assert clean["n"] == 3


def test_a_part_failed_as_a_command_becomes_write_errors_of_its_statements() -> None:
    failed = {"ok": 0.0, "code": 91, "codeName": "ShutdownInProgress", "errmsg": "bye"}
    replies = [{"ok": 1.0, "n": 2}, failed]
    unordered = merge_write_replies(replies, [[0, 1], [2, 3]], [], ordered=False)
    assert unordered["ok"] == 1.0 and unordered["n"] == 2
    assert [(e["index"], e["code"]) for e in unordered["writeErrors"]] == [(2, 91), (3, 91)]
    ordered = merge_write_replies(replies, [[0, 1], [2, 3]], [], ordered=True)
    assert [e["index"] for e in ordered["writeErrors"]] == [2]


def test_a_write_whose_every_part_failed_as_a_command_gets_the_first_failure() -> None:
    failed = {"ok": 0.0, "code": 13, "codeName": "Unauthorized", "errmsg": "no"}
    assert merge_write_replies([failed, dict(failed)], [[0], [1]], [], ordered=False) is failed


@pytest.mark.parametrize(("ordered", "sent"), [(True, 2), (False, 3)], ids=["ordered", "unordered"])
async def test_an_ordered_write_stops_at_the_first_part_with_an_error(
    ordered: bool, sent: int
) -> None:
    replies = [
        {"ok": 1.0, "n": 1},
        {"ok": 1.0, "n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "d"}]},
        {"ok": 1.0, "n": 1},
    ]
    parts = tuple(OpMsg(0, bson.encode({"insert": "c", "part": i})) for i in range(3))
    seen: list[int] = []

    async def send(part: OpMsg) -> dict[str, Any]:
        seen.append(bson.decode(part.body)["part"])
        return replies[seen[-1]]

    def merge(got: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_write_replies(got, [[0], [1], [2]], [], ordered)

    merged = await ForwardInParts(parts, merge, ordered).run(send)
    assert seen == list(range(sent))
    assert merged["n"] == (1 if ordered else 2)
    assert [e["index"] for e in merged["writeErrors"]] == [1]


def test_limits_come_from_the_hello_reply() -> None:
    reply = {"ok": 1.0, "maxBsonObjectSize": 100, "maxMessageSizeBytes": 1000}
    limits = limits_from_hello(reply, UpstreamLimits())
    assert limits == UpstreamLimits(100, 1000, UpstreamLimits().max_write_batch_size)
    assert limits_from_hello({"ok": 0.0, "code": 1}, limits) == limits


# -- through a session -------------------------------------------------------------------


def _upstream(frame: Frame) -> list[bytes]:
    """A small upstream: tiny limits in its hello; an insert answers n per statement."""
    message = decode_op_msg(frame.header, frame.payload)
    name = command_name(message.body)
    if name == "hello":
        reply = {"ok": 1.0, "maxBsonObjectSize": 2_000, "maxMessageSizeBytes": 3_600}
    else:
        reply = {"ok": 1.0, "n": sum(len(s.documents) for s in message.sequences)}
    return [upstream_reply(reply, frame.header.request_id)]


def _insert(documents: list[dict[str, Any]], request_id: int) -> bytes:
    sequence = DocumentSequence("documents", tuple(bson.encode(d) for d in documents))
    body = bson.encode({"insert": "coll", "ordered": False, "$db": "db"})
    return encode_op_msg(OpMsg(0, body, (sequence,)), request_id, 0)


async def test_a_session_splits_a_write_its_predictions_made_too_large() -> None:
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    pad = "p" * 900
    documents: list[dict[str, Any]] = [{"_id": i, "x": [A, B][i % 2], "pad": pad} for i in range(6)]
    # Predictions push this one over the upstream's maxBsonObjectSize of 2,000 bytes.
    documents.insert(2, {"_id": "big", "x": A, "pad": "p" * 1_930})
    async with wired_session(_upstream, writes=writes) as wired:
        hello = await wired.round_trip(op_msg({"hello": 1, "$db": "admin"}, 1))
        assert body_of(hello)["maxMessageSizeBytes"] == 3_600
        reply = body_of(await wired.round_trip(_insert(documents, 2)))
        inserts = [f for f in wired.upstream.received if command_name(_body(f)) == "insert"]
    assert reply["n"] == 6
    assert [(e["index"], e["code"], e["codeName"]) for e in reply["writeErrors"]] == [
        (2, 10334, "BSONObjectTooLarge")
    ]
    assert len(inserts) > 1
    stored = [
        bson.decode(doc, codec_options=FAITHFUL)
        for frame in inserts
        for doc in decode_op_msg(frame.header, frame.payload).sequences[0].documents
    ]
    assert [doc["_id"] for doc in stored] == [0, 1, 2, 3, 4, 5]
    assert all(doc["_outputs"]["m"]["label"] in ("a", "b") for doc in stored)


def _body(frame: Frame) -> bytes:
    return decode_op_msg(frame.header, frame.payload).body
