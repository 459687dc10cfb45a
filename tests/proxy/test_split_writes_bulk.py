"""MongoDB 8's bulkWrite command when predictions make it too large for the upstream: how
it is split, how each part is sent (its cursor read to the end, stmtIds dropped for an
upstream that refuses them), how the parts' replies are merged into the client's, and a
session that does all of it. The upstream replies are shaped as SecantusDB and mongod
8 send them (recorded from SecantusDB 0.7). No processes."""

from __future__ import annotations

from typing import Any

import bson
import pytest

from engine.documents import FAITHFUL
from proxy.hello import UpstreamLimits
from proxy.inline import InlineWrites
from proxy.split_writes import (
    INTERNAL_ALLOWANCE,
    ForwardInParts,
    merge_bulk_write_replies,
    split_bulk_write,
)
from proxy.wire.framing import Frame
from proxy.wire.opmsg import DocumentSequence, OpMsg, command_name, decode_op_msg, encode_op_msg
from tests.proxy.test_inline import NAMESPACE, A, B, _Served, _server
from tests.proxy.wired_session import body_of, op_msg, upstream_reply, wired_session

# Room for about three 1 kB ops per message.
SMALL = UpstreamLimits(max_bson_object_size=2_000, max_message_size_bytes=3_700)
LSID = {"id": bson.Binary(b"\x02" * 16, 4)}
NS_INFO = DocumentSequence("nsInfo", (bson.encode({"ns": "db.a"}), bson.encode({"ns": "db.b"})))
RESULTS_NS = "admin.$cmd.bulkWrite"
# What SecantusDB answers to a bulkWrite that carries stmtIds (mongod takes them).
STMT_IDS_REFUSED = {
    "ok": 0.0,
    "errmsg": "BSON field 'bulkWrite.stmtIds' is an unknown field.",
    "code": 40415,
    "codeName": "IDLUnknownField",
}


def _ops(count: int, size: int = 1_000) -> list[tuple[int, bytes]]:
    return [
        (i, bson.encode({"insert": i % 2, "document": {"_id": i, "pad": "p" * (size - 50)}}))
        for i in range(count)
    ]


def _split(body: dict[str, Any], count: int) -> ForwardInParts:
    body = {"bulkWrite": 1, **body, "$db": "admin"}
    message = OpMsg(0, bson.encode(body), (NS_INFO,))
    return split_bulk_write(body, message, _ops(count), count, [], SMALL)


def _part(message: OpMsg) -> tuple[dict[str, Any], list[int]]:
    """A part's body, and the _ids of its ops' documents."""
    sequences = {s.identifier: s for s in message.sequences}
    assert sequences["nsInfo"] == NS_INFO  # every part names every namespace, as sent
    ids = [bson.decode(op)["document"]["_id"] for op in sequences["ops"].documents]
    return bson.decode(message.body), ids


def _result(idx: int, ok: bool = True, **fields: Any) -> dict[str, Any]:
    if ok:
        return {"ok": 1.0, "idx": idx, "n": 1, **fields}
    return {"ok": 0.0, "idx": idx, "code": 11000, "errmsg": "E11000 duplicate key", "n": 0}


def _reply(results: list[dict[str, Any]], cursor_id: int = 0, **counters: int) -> dict[str, Any]:
    """A bulkWrite reply in mongod's field order: the cursor, the counters, ok."""
    errors = sum(1 for r in results if not r["ok"])
    reply: dict[str, Any] = {
        "cursor": {"id": bson.Int64(cursor_id), "firstBatch": results, "ns": RESULTS_NS},
        "nErrors": errors,
        "nInserted": len(results) - errors,
        "nMatched": 0,
        "nModified": 0,
        "nUpserted": 0,
        "nDeleted": 0,
    }
    reply.update(counters)
    reply["ok"] = 1.0
    return reply


# -- splitting ---------------------------------------------------------------------------


def test_parts_fit_the_message_size_keep_the_order_and_every_namespace() -> None:
    split = _split({"ordered": True, "errorsOnly": True}, 8)
    parts = [_part(p) for p in split.parts]
    assert [ids for _, ids in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    for part in split.parts:
        size = len(part.body) + sum(len(d) for s in part.sequences for d in s.documents)
        assert size < SMALL.max_message_size_bytes
    assert all(
        body == {"bulkWrite": 1, "ordered": True, "errorsOnly": True, "$db": "admin"}
        for body, _ in parts
    )


def test_parts_fit_the_write_batch_size() -> None:
    body = {"bulkWrite": 1, "$db": "admin"}
    message = OpMsg(0, bson.encode(body), (NS_INFO,))
    limits = UpstreamLimits(max_write_batch_size=3)
    split = split_bulk_write(body, message, _ops(7, 100), 7, [], limits)
    assert [len(_part(p)[1]) for p in split.parts] == [3, 3, 1]


def test_a_retryable_bulk_write_keeps_its_identity_and_numbers_its_statements() -> None:
    split = _split({"lsid": LSID, "txnNumber": bson.Int64(4), "ordered": False}, 7)
    bodies = [_part(p)[0] for p in split.parts]
    assert [b["stmtIds"] for b in bodies] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(b["lsid"] == LSID and b["txnNumber"] == 4 for b in bodies)
    assert split.ordered is False


def test_parts_ask_for_no_cursor_batch_size() -> None:
    split = _split({"cursor": {"batchSize": 1}}, 4)
    assert all("cursor" not in _part(p)[0] for p in split.parts)


def test_only_a_transactions_first_part_starts_it() -> None:
    body = {
        "lsid": LSID,
        "txnNumber": bson.Int64(2),
        "autocommit": False,
        "startTransaction": True,
        "readConcern": {"level": "snapshot"},
    }
    first, *others = (_part(p)[0] for p in _split(body, 6).parts)
    assert first["startTransaction"] is True
    assert others and all("startTransaction" not in b and "readConcern" not in b for b in others)
    assert "stmtIds" not in first


# -- merging -----------------------------------------------------------------------------


def test_counters_are_summed_and_results_get_the_clients_indices() -> None:
    replies = [
        _reply([_result(0), _result(1, upserted={"_id": "u"}, nModified=0)], nUpserted=1),
        {
            **_reply([_result(0, ok=False), _result(1)], nMatched=1, nModified=1),
            "writeConcernError": {"code": 64, "errmsg": "timeout"},
            "operationTime": bson.Timestamp(9, 1),
        },
    ]
    refused = [{"ok": 0.0, "idx": 5, "code": 10334, "codeName": "BSONObjectTooLarge", "n": 0}]
    merged = merge_bulk_write_replies(replies, [[0, 1], [3, 4]], refused, ordered=False)
    batch = merged["cursor"]["firstBatch"]
    assert [(r["idx"], r["ok"], r.get("code")) for r in batch] == [
        (0, 1.0, None),
        (1, 1.0, None),
        (3, 0.0, 11000),
        (4, 1.0, None),
        (5, 0.0, 10334),
    ]
    assert batch[1]["upserted"] == {"_id": "u"}
    assert (merged["nInserted"], merged["nUpserted"], merged["nMatched"]) == (3, 1, 1)
    assert merged["nModified"] == 1 and merged["nErrors"] == 2
    assert merged["cursor"]["id"] == 0 and merged["cursor"]["ns"] == RESULTS_NS
    assert merged["writeConcernError"]["code"] == 64
    assert merged["operationTime"] == bson.Timestamp(9, 1)


def test_an_ordered_bulk_write_that_failed_upstream_never_reached_the_refusal() -> None:
    refused = [{"ok": 0.0, "idx": 3, "code": 10334, "n": 0}]
    failed = merge_bulk_write_replies(
        [_reply([_result(0), _result(1, ok=False)])], [[0, 1, 2]], refused, ordered=True
    )
    assert [r["idx"] for r in failed["cursor"]["firstBatch"]] == [0, 1]
    assert failed["nErrors"] == 1
    clean = merge_bulk_write_replies([_reply([_result(0)])], [[0, 1, 2]], refused, ordered=True)
    assert [r["idx"] for r in clean["cursor"]["firstBatch"]] == [0, 3]
    assert clean["nErrors"] == 1 and clean["nInserted"] == 1


def test_a_part_failed_as_a_command_becomes_errors_of_its_ops() -> None:
    failed = {"ok": 0.0, "code": 91, "codeName": "ShutdownInProgress", "errmsg": "bye"}
    replies = [_reply([_result(0), _result(1)]), failed]
    unordered = merge_bulk_write_replies(replies, [[0, 1], [2, 3]], [], ordered=False)
    assert [(r["idx"], r.get("code")) for r in unordered["cursor"]["firstBatch"]] == [
        (0, None),
        (1, None),
        (2, 91),
        (3, 91),
    ]
    assert unordered["ok"] == 1.0 and unordered["nErrors"] == 2 and unordered["nInserted"] == 2
    ordered = merge_bulk_write_replies(replies, [[0, 1], [2, 3]], [], ordered=True)
    assert [r["idx"] for r in ordered["cursor"]["firstBatch"]] == [0, 1, 2]


def test_a_bulk_write_whose_every_part_failed_gets_the_first_failure() -> None:
    failed = {"ok": 0.0, "code": 13, "codeName": "Unauthorized", "errmsg": "no"}
    assert merge_bulk_write_replies([failed, dict(failed)], [[0], [1]], [], False) is failed


# -- sending the parts -------------------------------------------------------------------


class _Upstream:
    """Answers each part from `replies` in turn, getMores from `more`; records what came."""

    def __init__(
        self, replies: list[dict[str, Any]], more: list[dict[str, Any]] | None = None
    ) -> None:
        self.replies = list(replies)
        self.more = list(more or [])
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: OpMsg) -> dict[str, Any]:
        body = bson.decode(message.body, codec_options=FAITHFUL)
        self.sent.append(body)
        return self.more.pop(0) if "getMore" in body else self.replies.pop(0)


@pytest.mark.parametrize(("ordered", "sent"), [(True, 2), (False, 3)], ids=["ordered", "unordered"])
async def test_an_ordered_bulk_write_stops_after_the_first_part_with_an_error(
    ordered: bool, sent: int
) -> None:
    upstream = _Upstream(
        [
            _reply([_result(i) for i in range(3)]),
            _reply([_result(0), _result(1, ok=False)]),
            _reply([_result(0), _result(1)]),
        ]
    )
    merged = await _split({"ordered": ordered}, 8).run(upstream.send)
    assert len(upstream.sent) == sent
    assert [r["idx"] for r in merged["cursor"]["firstBatch"] if not r["ok"]] == [4]
    assert merged["nInserted"] == (4 if ordered else 6)


async def test_an_upstream_that_refuses_stmt_ids_gets_the_parts_without_them() -> None:
    upstream = _Upstream(
        [STMT_IDS_REFUSED, _reply([_result(i) for i in range(3)]), _reply([_result(0)])]
    )
    split = _split({"lsid": LSID, "txnNumber": bson.Int64(1), "ordered": True}, 4)
    merged = await split.run(upstream.send)
    # Refused once, sent again without them; the next part goes without them at once.
    assert ["stmtIds" in body for body in upstream.sent] == [True, False, False]
    assert all(body["txnNumber"] == 1 and body["lsid"] == LSID for body in upstream.sent)
    assert merged["nInserted"] == 4 and merged["nErrors"] == 0
    assert [r["idx"] for r in merged["cursor"]["firstBatch"]] == [0, 1, 2, 3]


async def test_a_parts_cursor_is_read_to_its_end_in_the_clients_session() -> None:
    first = _reply([_result(0)], cursor_id=77, nInserted=3)
    more = [
        {"cursor": {"id": bson.Int64(77), "nextBatch": [_result(1)], "ns": RESULTS_NS}, "ok": 1},
        {"cursor": {"id": bson.Int64(0), "nextBatch": [_result(2)], "ns": RESULTS_NS}, "ok": 1},
    ]
    upstream = _Upstream([first, _reply([_result(0)])], more)
    split = _split({"lsid": LSID, "txnNumber": bson.Int64(5), "ordered": False}, 4)
    merged = await split.run(upstream.send)
    get_mores = [body for body in upstream.sent if "getMore" in body]
    assert (
        get_mores
        == [{"getMore": 77, "collection": "$cmd.bulkWrite", "$db": "admin", "lsid": LSID}] * 2
    )
    assert [r["idx"] for r in merged["cursor"]["firstBatch"]] == [0, 1, 2, 3]
    assert merged["cursor"]["id"] == 0 and merged["nInserted"] == 4


# -- through a session -------------------------------------------------------------------


class _BulkUpstream:
    """A small upstream with tiny limits in its hello that runs bulkWrite inserts as
    SecantusDB does: refuses stmtIds, a duplicate _id is a per-op error."""

    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []
        self.bulk_writes: list[dict[str, Any]] = []

    def __call__(self, frame: Frame) -> list[bytes]:
        message = decode_op_msg(frame.header, frame.payload)
        body = bson.decode(message.body)
        name = command_name(message.body)
        reply: dict[str, Any]
        if name == "hello":
            reply = {"ok": 1.0, "maxBsonObjectSize": 2_000, "maxMessageSizeBytes": 3_700}
        elif name != "bulkWrite":
            reply = {"ok": 1.0}
        elif "stmtIds" in body:
            reply = STMT_IDS_REFUSED
        else:
            self.bulk_writes.append(body)
            (ops,) = (s for s in message.sequences if s.identifier == "ops")
            results = []
            for idx, data in enumerate(ops.documents):
                document = bson.decode(data, codec_options=FAITHFUL)["document"]
                duplicate = any(d["_id"] == document["_id"] for d in self.stored)
                if not duplicate:
                    self.stored.append(document)
                results.append(_result(idx, ok=not duplicate))
                if duplicate and body.get("ordered", True):
                    break
            reply = _reply(results)
        return [upstream_reply(reply, frame.header.request_id)]


def _bulk_write(documents: list[dict[str, Any]], ordered: bool, request_id: int) -> bytes:
    ops = tuple(bson.encode({"insert": 0, "document": d}) for d in documents)
    namespaces = DocumentSequence("nsInfo", (bson.encode({"ns": NAMESPACE}),))
    body = {
        "bulkWrite": 1,
        "errorsOnly": False,
        "ordered": ordered,
        "lsid": LSID,
        "txnNumber": bson.Int64(1),
        "$db": "admin",
    }
    message = OpMsg(0, bson.encode(body), (DocumentSequence("ops", ops), namespaces))
    return encode_op_msg(message, request_id, 0)


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
async def test_a_session_splits_a_bulk_write_its_predictions_made_too_large(
    ordered: bool,
) -> None:
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    pad = "p" * 880
    documents: list[dict[str, Any]] = [{"_id": i, "x": [A, B][i % 2], "pad": pad} for i in range(6)]
    # Predictions push this one over what the upstream takes of an op: maxBsonObjectSize
    # and MongoDB's allowance for the fields around a document.
    big = {"_id": "big", "x": A, "pad": ""}
    limit = SMALL.max_bson_object_size + INTERNAL_ALLOWANCE
    big["pad"] = "p" * (limit - 10 - len(bson.encode({"insert": 0, "document": big})))
    documents.insert(4, big)
    documents.insert(2, {"_id": 1, "x": A, "pad": pad})  # a duplicate: the upstream's error
    upstream = _BulkUpstream()
    async with wired_session(upstream, writes=writes) as wired:
        await wired.round_trip(op_msg({"hello": 1, "$db": "admin"}, 1))
        reply = body_of(await wired.round_trip(_bulk_write(documents, ordered, 2)))
        # The connection stays up: the client goes on.
        ping = body_of(await wired.round_trip(op_msg({"ping": 1, "$db": "admin"}, 3)))
    assert ping["ok"] == 1.0
    results = [(r["idx"], r["ok"], r.get("code")) for r in reply["cursor"]["firstBatch"]]
    if ordered:
        # Stopped at the duplicate: the too-large op after it was never reached.
        assert results == [(0, 1.0, None), (1, 1.0, None), (2, 0.0, 11000)]
        assert [d["_id"] for d in upstream.stored] == [0, 1]
    else:
        assert results == [
            (0, 1.0, None),
            (1, 1.0, None),
            (2, 0.0, 11000),
            (3, 1.0, None),
            (4, 1.0, None),
            (5, 0.0, 10334),
            (6, 1.0, None),
            (7, 1.0, None),
        ]
        assert reply["cursor"]["firstBatch"][5]["codeName"] == "BSONObjectTooLarge"
        assert [d["_id"] for d in upstream.stored] == [0, 1, 2, 3, 4, 5]
        assert all(d["_outputs"]["m"]["label"] in ("a", "b") for d in upstream.stored)
    assert reply["nErrors"] == (1 if ordered else 2)
    assert reply["nInserted"] == len(upstream.stored)
    # An ordered write stops after its first part, whose last op was the duplicate.
    assert len(upstream.bulk_writes) == 1 if ordered else len(upstream.bulk_writes) > 1
    assert all(body["lsid"] == LSID and body["txnNumber"] == 1 for body in upstream.bulk_writes)
