"""Writes that predictions make larger than the upstream takes.

An upstream closes the connection over a message larger than its maxMessageSizeBytes, so
a write that fitted as the client sent it may not fit once every document carries its
prediction. Such a write (insert, update) goes upstream in several commands, as mongos
splits a batch across shards: in order, on the client's own upstream connection, each
with the client's lsid and txnNumber and with `stmtIds` naming its statements by their
place in the client's write, so that a retryable write stays one write to the upstream.
Their replies are merged into the one the client expects, with the client's indices. A
single statement over maxBsonObjectSize gets a BSONObjectTooLarge write error instead.

MongoDB 8's bulkWrite command is split the same way (its `ops`, with the whole `nsInfo`
in every part); each part's cursor of per-op results is read to its end, and the client
gets one reply with the summed counters and every result at the client's own index."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import bson

from engine.documents import FAITHFUL
from engine.errors import BSONObjectTooLarge
from proxy.hello import UpstreamLimits
from proxy.replies import ReplyHook
from proxy.wire.header import HEADER_SIZE
from proxy.wire.opmsg import DocumentSequence, OpMsg

__all__ = [
    "ForwardInParts",
    "fits_in_one",
    "merge_bulk_write_replies",
    "merge_hook",
    "merge_write_replies",
    "split_bulk_write",
    "split_write",
    "statement_limit",
    "too_large",
]

# MongoDB lets a command body or a write statement exceed maxBsonObjectSize by this much
# (BSONObjMaxInternalSize), for the fields around a document of the full size.
INTERNAL_ALLOWANCE = 16 * 1024
# An int32 element of the stmtIds array: type byte, a key of up to 6 digits and its NUL,
# the value.
_STMT_ID_BYTES = 1 + 7 + 4
# What an OP_MSG spends around its sections: the flags, a kind byte for the body, and for
# a document sequence its kind byte and size.
_FLAGS_BYTES = 4
_SEQUENCE_HEAD_BYTES = 1 + 4

Send = Callable[[OpMsg], Awaitable[dict[str, Any]]]
# Sends one part with `send` and returns its reply as the merge needs it.
SendPart = Callable[[OpMsg, Send], Awaitable[dict[str, Any]]]
Merge = Callable[[list[dict[str, Any]]], dict[str, Any]]

# The summary counters of a bulkWrite reply, summed over its parts.
_BULK_COUNTERS = ("nErrors", "nInserted", "nMatched", "nModified", "nUpserted", "nDeleted")
_BULK_RESULTS_NS = "admin.$cmd.bulkWrite"
# MongoDB's code for an unknown field of a command (IDLUnknownField).
_UNKNOWN_FIELD = 40415


@dataclass(frozen=True)
class ForwardInParts:
    """Forward `parts` one after the other in place of the client's message (an ordered
    write stops after the first part with an error), and answer the client with `merge`
    of their replies, then the hook, if any. `send_part`, if given, sends each part in
    place of a plain `send` (a bulkWrite reads each part's cursor to its end)."""

    parts: tuple[OpMsg, ...]
    merge: Merge
    ordered: bool
    reply_hook: ReplyHook | None = None
    send_part: SendPart | None = None

    async def run(self, send: Send) -> dict[str, Any]:
        replies = []
        for part in self.parts:
            reply = await (send(part) if self.send_part is None else self.send_part(part, send))
            replies.append(reply)
            failed = not reply.get("ok") or reply.get("writeErrors") or reply.get("nErrors")
            if self.ordered and failed:
                break
        merged = self.merge(replies)
        return self.reply_hook(merged) if self.reply_hook is not None else merged


def too_large(statement: bytes, field: str, limits: UpstreamLimits) -> BSONObjectTooLarge | None:
    """The error for a statement the upstream would not take, or None. An inserted
    document is the statement itself; an update or bulkWrite statement wraps its document
    and gets MongoDB's allowance for that (the upstream checks what it stores itself)."""
    limit = statement_limit(field, limits)
    if len(statement) <= limit:
        return None
    return BSONObjectTooLarge(
        f"document too large with its predictions: {len(statement)} bytes, "
        f"max size {limit} (the upstream's maxBsonObjectSize)"
    )


def statement_limit(field: str, limits: UpstreamLimits) -> int:
    """The largest statement of a write's `field` that the upstream takes (see too_large)."""
    return limits.max_bson_object_size + (0 if field == "documents" else INTERNAL_ALLOWANCE)


def _message_size(message: OpMsg) -> int:
    size = (
        HEADER_SIZE + _FLAGS_BYTES + 1 + len(message.body) + (4 if message.checksum_present else 0)
    )
    for sequence in message.sequences:
        size += _SEQUENCE_HEAD_BYTES + len(sequence.identifier.encode()) + 1
        size += sum(len(document) for document in sequence.documents)
    return size


def fits_in_one(message: OpMsg, statements: int, limits: UpstreamLimits) -> bool:
    return (
        statements <= limits.max_write_batch_size
        and len(message.body) <= limits.max_bson_object_size + INTERNAL_ALLOWANCE
        and _message_size(message) <= limits.max_message_size_bytes
    )


def _statement_ids(body: dict[str, Any], count: int) -> list[int]:
    """Each statement's id as the upstream would number the client's write: its own
    stmtIds, or consecutive from its stmtId, or its index."""
    given = body.get("stmtIds")
    if isinstance(given, list) and len(given) == count:
        return [int(i) for i in given]
    first = body.get("stmtId")
    start = int(first) if isinstance(first, int) else 0
    return list(range(start, start + count))


def _parts(
    body: dict[str, Any],
    message: OpMsg,
    field: str,
    statements: Sequence[tuple[int, bytes]],
    count: int,
    limits: UpstreamLimits,
    dropped: tuple[str, ...] = (),
) -> tuple[tuple[OpMsg, ...], list[list[int]]]:
    """The write of `statements` ((client index, encoded statement) of the client's
    `count`, in order) as parts that each fit the upstream's limits, without the body's
    `dropped` fields; and the client's index of each statement of each part."""
    in_transaction = body.get("autocommit") is False
    retryable = "txnNumber" in body and not in_transaction
    ids = _statement_ids(body, count)
    base = {k: v for k, v in body.items() if k not in (field, "stmtId", "stmtIds", *dropped)}
    others = tuple(s for s in message.sequences if s.identifier != field)
    overhead = _message_size(OpMsg(0, bson.encode(base, codec_options=FAITHFUL), others))
    overhead += _SEQUENCE_HEAD_BYTES + len(field.encode()) + 1 + len("stmtIds") + 6
    budget = limits.max_message_size_bytes - overhead
    groups: list[list[tuple[int, bytes]]] = [[]]
    used = 0
    for index, data in statements:
        cost = len(data) + (_STMT_ID_BYTES if retryable else 0)
        if groups[-1] and (used + cost > budget or len(groups[-1]) >= limits.max_write_batch_size):
            groups.append([])
            used = 0
        groups[-1].append((index, data))
        used += cost
    parts = []
    for number, group in enumerate(groups):
        part_body = dict(base)
        if retryable:
            part_body["stmtIds"] = [ids[index] for index, _ in group]
        if in_transaction and number:
            # Only a transaction's first statement starts it and sets its read concern.
            part_body.pop("startTransaction", None)
            part_body.pop("readConcern", None)
        sequence = DocumentSequence(field, tuple(data for _, data in group))
        encoded_body = bson.encode(part_body, codec_options=FAITHFUL)
        parts.append(OpMsg(0, encoded_body, (*others, sequence)))
    return tuple(parts), [[index for index, _ in group] for group in groups]


def split_write(
    body: dict[str, Any],
    message: OpMsg,
    field: str,
    statements: Sequence[tuple[int, bytes]],
    count: int,
    refused: list[dict[str, Any]],
    limits: UpstreamLimits,
) -> ForwardInParts:
    """The insert or update of `statements` ((client index, encoded statement) of the
    client's `count`, in order) as parts that each fit the upstream's limits; `refused`
    are the write errors of statements the proxy refused itself."""
    ordered = body.get("ordered", True) is not False
    parts, indices = _parts(body, message, field, statements, count, limits)

    def merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_write_replies(replies, indices, refused, ordered)

    return ForwardInParts(parts, merge, ordered)


def split_bulk_write(
    body: dict[str, Any],
    message: OpMsg,
    statements: Sequence[tuple[int, bytes]],
    count: int,
    refused: list[dict[str, Any]],
    limits: UpstreamLimits,
) -> ForwardInParts:
    """The bulkWrite command of `statements` (its ops, as for split_write) in parts that
    each fit the upstream's limits, or in one part where only the proxy's refusals
    (`refused`, cursor entries) must be merged in. The parts ask for no cursor batch
    size: each part's results are read to their end and the client gets them all in
    its first batch, with the client's indices."""
    ordered = body.get("ordered", True) is not False
    parts, indices = _parts(body, message, "ops", statements, count, limits, ("cursor",))
    sender = _BulkPartSender(body)

    def merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_bulk_write_replies(replies, indices, refused, ordered)

    return ForwardInParts(parts, merge, ordered, send_part=sender.send)


class _BulkPartSender:
    """Sends the parts of one bulkWrite.

    MongoDB takes `stmtIds` on bulkWrite (mongos numbers the statements it sends each
    shard with them); an upstream that refuses the field as unknown keeps no per-statement
    record of retryable writes by it, so its parts go without it. A part's results that
    did not all fit its first batch are read with getMore on the same connection and
    session; should a getMore fail, the part's counters stand and the results not read
    are left out."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.without_statement_ids = False
        self.session = {key: body[key] for key in ("lsid",) if key in body}
        if body.get("autocommit") is False:
            self.session.update(txnNumber=body.get("txnNumber"), autocommit=False)

    async def send(self, part: OpMsg, send: Send) -> dict[str, Any]:
        if self.without_statement_ids:
            part = _without_statement_ids(part)
        reply = await send(part)
        if not self.without_statement_ids and _refuses_statement_ids(reply):
            self.without_statement_ids = True
            reply = await send(_without_statement_ids(part))
        cursor = reply.get("cursor")
        if not reply.get("ok") or not isinstance(cursor, dict):
            return reply
        results = list(cursor.get("firstBatch") or [])
        cursor_id = cursor.get("id") or 0
        while cursor_id:
            command = {"getMore": bson.Int64(cursor_id), "collection": "$cmd.bulkWrite"}
            more = await send(OpMsg(0, bson.encode({**command, "$db": "admin", **self.session})))
            batch = more.get("cursor") if more.get("ok") else None
            if not isinstance(batch, dict):
                break
            results += batch.get("nextBatch") or []
            cursor_id = batch.get("id") or 0
        reply["cursor"] = {**cursor, "id": bson.Int64(0), "firstBatch": results}
        return reply


def _refuses_statement_ids(reply: dict[str, Any]) -> bool:
    return reply.get("code") == _UNKNOWN_FIELD and "stmtIds" in str(reply.get("errmsg"))


def _without_statement_ids(part: OpMsg) -> OpMsg:
    body = bson.decode(part.body, codec_options=FAITHFUL)
    body.pop("stmtIds", None)
    return OpMsg(part.flags, bson.encode(body, codec_options=FAITHFUL), part.sequences)


def merge_hook(
    kept: list[int], refused: list[dict[str, Any]], ordered: bool, *, bulk: bool = False
) -> ReplyHook:
    """The hook for a write (`bulk`: a bulkWrite command) forwarded in one message
    without the refused statements."""
    merge = merge_bulk_write_replies if bulk else merge_write_replies

    def hook(reply: dict[str, Any]) -> dict[str, Any]:
        return merge([reply], [kept], refused, ordered)

    return hook


def merge_write_replies(
    replies: list[dict[str, Any]],
    parts: Sequence[Sequence[int]],
    refused: list[dict[str, Any]],
    ordered: bool,
) -> dict[str, Any]:
    """The client's reply to an insert or update from the replies of the parts sent
    (`parts[i]`: the client's index of each statement of part i), with the proxy's own
    write errors (`refused`) where the upstream did not stop first.

    If every part failed as a command, nothing was written and the client gets the first
    failure as it came (drivers retry those that say so). A part that failed as a command
    beside parts that ran is reported as mongos does: a write error for each of its
    statements (for an ordered write, its first, where the write stopped)."""
    if not any(reply.get("ok") for reply in replies):
        return replies[0]
    # The latest reply's gossip ($clusterTime, operationTime, electionId) stands.
    merged = dict(next(reply for reply in reversed(replies) if reply.get("ok")))
    written = 0
    modified: int | None = None
    upserted: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    concern_error = None
    for reply, indices in zip(replies, parts, strict=False):
        if not reply.get("ok"):
            errors += [
                {"index": index, **error} for index, error in _failed(reply, indices, ordered)
            ]
            continue
        written += int(reply.get("n", 0))
        if "nModified" in reply:
            modified = (modified or 0) + int(reply["nModified"])
        upserted += [{**u, "index": indices[u["index"]]} for u in reply.get("upserted") or []]
        errors += [{**e, "index": indices[e["index"]]} for e in reply.get("writeErrors") or []]
        concern_error = concern_error or reply.get("writeConcernError")
    # An ordered write that failed upstream stopped before the proxy's refusal was reached.
    if not (ordered and errors):
        errors += refused
    merged["n"] = written
    _set_or_drop(
        merged,
        nModified=modified,
        upserted=upserted,
        writeErrors=sorted(errors, key=lambda e: e["index"]),
        writeConcernError=concern_error,
    )
    return merged


def merge_bulk_write_replies(
    replies: list[dict[str, Any]],
    parts: Sequence[Sequence[int]],
    refused: list[dict[str, Any]],
    ordered: bool,
) -> dict[str, Any]:
    """The client's reply to a bulkWrite command from the replies of the parts sent, as
    merge_write_replies does for an insert or update: counters summed, each part's
    results (every one in its cursor's first batch, see split_bulk_write) at the client's
    indices, the proxy's own refusals (`refused`, cursor entries) where the upstream did
    not stop first, all in the first batch."""
    if not any(reply.get("ok") for reply in replies):
        return replies[0]
    merged = dict(next(reply for reply in reversed(replies) if reply.get("ok")))
    counters = dict.fromkeys(_BULK_COUNTERS, 0)
    results: list[dict[str, Any]] = []
    concern_error = None
    for reply, indices in zip(replies, parts, strict=False):
        if not reply.get("ok"):
            failed = _failed(reply, indices, ordered)
            results += [{"ok": 0.0, "idx": index, **error, "n": 0} for index, error in failed]
            counters["nErrors"] += len(failed)
            continue
        for key in _BULK_COUNTERS:
            counters[key] += int(reply.get(key, 0))
        cursor = reply.get("cursor")
        batch = cursor.get("firstBatch") if isinstance(cursor, dict) else None
        results += [{**result, "idx": indices[result["idx"]]} for result in batch or []]
        concern_error = concern_error or reply.get("writeConcernError")
    # An ordered write that failed upstream stopped before the proxy's refusal was reached.
    if not (ordered and counters["nErrors"]):
        results += refused
        counters["nErrors"] += len(refused)
    # The cursor is exhausted after a split (see split_bulk_write); a single reply's cursor
    # stays as the upstream left it.
    cursor = merged.get("cursor")
    cursor = cursor if isinstance(cursor, dict) else {"id": bson.Int64(0), "ns": _BULK_RESULTS_NS}
    batch = sorted(results, key=lambda r: r["idx"])
    merged["cursor"] = {**cursor, "firstBatch": batch}
    merged.update(counters)
    _set_or_drop(merged, writeConcernError=concern_error)
    return merged


def _failed(
    reply: dict[str, Any], indices: Sequence[int], ordered: bool
) -> list[tuple[int, dict[str, Any]]]:
    """A part that failed as a command, beside parts that ran, as mongos reports it: an
    error for each of its statements (for an ordered write, its first, where it stopped)."""
    error: dict[str, Any] = {k: reply[k] for k in ("code", "codeName", "errmsg") if k in reply}
    return [(index, error) for index in (indices[:1] if ordered else indices)]


def _set_or_drop(reply: dict[str, Any], **fields: Any) -> None:
    for key, value in fields.items():
        if value is None or value == []:
            reply.pop(key, None)
        else:
            reply[key] = value
