"""Writes that predictions make larger than the upstream takes.

An upstream closes the connection over a message larger than its maxMessageSizeBytes, so
a write that fitted as the client sent it may not fit once every document carries its
prediction. Such a write (insert, update) goes upstream in several commands, as mongos
splits a batch across shards: in order, on the client's own upstream connection, each
with the client's lsid and txnNumber and with `stmtIds` naming its statements by their
place in the client's write, so that a retryable write stays one write to the upstream.
Their replies are merged into the one the client expects, with the client's indices. A
single statement over maxBsonObjectSize gets a BSONObjectTooLarge write error instead."""

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
    "merge_hook",
    "merge_write_replies",
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
Merge = Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class ForwardInParts:
    """Forward `parts` one after the other in place of the client's message (an ordered
    write stops after the first part with an error), and answer the client with `merge`
    of their replies, then the hook, if any."""

    parts: tuple[OpMsg, ...]
    merge: Merge
    ordered: bool
    reply_hook: ReplyHook | None = None

    async def run(self, send: Send) -> dict[str, Any]:
        replies = []
        for part in self.parts:
            reply = await send(part)
            replies.append(reply)
            if self.ordered and (not reply.get("ok") or reply.get("writeErrors")):
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


def split_write(
    body: dict[str, Any],
    message: OpMsg,
    field: str,
    statements: Sequence[tuple[int, bytes]],
    count: int,
    refused: list[dict[str, Any]],
    limits: UpstreamLimits,
) -> ForwardInParts:
    """The write of `statements` ((client index, encoded statement) of the client's
    `count`, in order) as parts that each fit the upstream's limits; `refused` are the
    write errors of statements the proxy refused itself."""
    ordered = body.get("ordered", True) is not False
    in_transaction = body.get("autocommit") is False
    retryable = "txnNumber" in body and not in_transaction
    ids = _statement_ids(body, count)
    base = {k: v for k, v in body.items() if k not in (field, "stmtId", "stmtIds")}
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
    indices = [[index for index, _ in group] for group in groups]

    def merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_write_replies(replies, indices, refused, ordered)

    return ForwardInParts(tuple(parts), merge, ordered)


def merge_hook(kept: list[int], refused: list[dict[str, Any]], ordered: bool) -> ReplyHook:
    """The hook for a write forwarded in one message without the refused statements."""

    def hook(reply: dict[str, Any]) -> dict[str, Any]:
        return merge_write_replies([reply], [kept], refused, ordered)

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
            failed = indices[:1] if ordered else indices
            error: dict[str, Any] = {
                key: reply[key] for key in ("code", "codeName", "errmsg") if key in reply
            }
            errors += [{"index": index, **error} for index in failed]
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
    for key, value in (
        ("nModified", modified),
        ("upserted", upserted),
        ("writeErrors", sorted(errors, key=lambda e: e["index"])),
        ("writeConcernError", concern_error),
    ):
        if value is None or value == []:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged
