"""What the proxy sends back to a client that it did not forward byte for byte: MongoDB's
error replies, replies it makes up, and upstream replies it rewrites (a reply hook, the
client's compressor); what it reads of the requests it acts on; and the record
of a request owed replies (InFlight)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import bson
import bson.errors
import trio

from engine.errors import ModelgateError
from proxy.metrics import CommandCounts
from proxy.wire.compression import compress, decompress
from proxy.wire.errors import RemoteProtocolError
from proxy.wire.framing import Frame
from proxy.wire.header import HEADER_SIZE, MsgHeader, OpCode
from proxy.wire.opmsg import OpMsg, decode_op_msg, encode_op_msg
from proxy.wire.opquery import OpReply, decode_op_reply, encode_op_reply

__all__ = [
    "InFlight",
    "ReplyHook",
    "client_reply",
    "command_namespace",
    "decode_command",
    "decode_document",
    "encode_local_reply",
    "error_reply",
    "is_last_reply",
    "next_request_id",
    "rewrite_reply",
    "uncompressed",
]

# A reply hook turns the upstream's reply document into the one the client gets.
ReplyHook = Callable[[dict[str, Any]], dict[str, Any]]

_REQUEST_IDS = itertools.count(1)


def next_request_id() -> int:
    # Messages the proxy makes up need an id of their own; drivers only look at responseTo.
    return next(_REQUEST_IDS) & 0x7FFFFFFF


def decode_document(data: bytes) -> dict[str, Any]:
    try:
        return bson.decode(data)
    except bson.errors.BSONError as exc:
        raise RemoteProtocolError(f"invalid BSON document: {exc}") from exc


def decode_command(message: OpMsg) -> dict[str, Any]:
    """The whole command: body fields plus each document sequence as an array field."""
    command = decode_document(message.body)
    for sequence in message.sequences:
        command[sequence.identifier] = [decode_document(doc) for doc in sequence.documents]
    return command


def command_namespace(name: str, body: bytes) -> str:
    """`db.collection` (or just `db`) a command is about, for logs; never the contents.
    A body that is not BSON past its command name is forwarded for the upstream to
    refuse: a log line must not end the connection over it."""
    try:
        command = decode_document(body)
    except RemoteProtocolError:
        return "?"
    target = command.get("collection" if name == "getMore" else name)
    database = str(command.get("$db", "?"))
    return f"{database}.{target}" if isinstance(target, str) and target else database


def error_reply(error: ModelgateError) -> dict[str, Any]:
    """MongoDB's shape for a failed command, so that drivers raise their usual exception."""
    return {"ok": 0.0, "errmsg": error.message, "code": error.code, "codeName": error.code_name}


def encode_local_reply(document: dict[str, Any], response_to: int) -> bytes:
    """An OP_MSG reply the proxy answers with itself."""
    return encode_op_msg(OpMsg(flags=0, body=bson.encode(document)), next_request_id(), response_to)


def uncompressed(frame: Frame) -> tuple[MsgHeader, bytes]:
    """The frame's header and payload, decompressed if it came as OP_COMPRESSED."""
    if frame.header.op_code == OpCode.OP_COMPRESSED:
        return decompress(frame.header, frame.payload)
    return frame.header, frame.payload


def is_last_reply(header: MsgHeader, payload: bytes) -> bool:
    """False for a reply of an exhaust stream (a cursor, a streaming hello) that more
    replies to the same request follow: an OP_MSG with moreToCome."""
    return header.op_code != OpCode.OP_MSG or not decode_op_msg(header, payload).more_to_come


def client_reply(
    frame: Frame, hook: ReplyHook | None, compressor_id: int | None, may_stream: bool
) -> tuple[bytes, bool]:
    """What the client gets of this upstream reply: its bytes as they came, or rewritten
    (`hook`, `compressor_id`: see `rewrite_reply`); and whether it is the last reply to
    its request (only a request with exhaustAllowed, `may_stream`, may get several)."""
    if hook is not None or compressor_id is not None:
        header, payload = uncompressed(frame)
        if header.op_code == OpCode.OP_MSG:
            # Decoded once, for its flags and for the hook (a hello's reply, each time).
            message = decode_op_msg(header, payload)
            last = not message.more_to_come
            if hook is not None:
                body = bson.encode(hook(decode_document(message.body)))
                message = OpMsg(flags=message.flags, body=body, sequences=message.sequences)
                data = encode_op_msg(message, header.request_id, header.response_to)
                if compressor_id is None:
                    return data, last
                payload = data[HEADER_SIZE:]
            assert compressor_id is not None  # else there was nothing to rewrite
            return compress(
                header.op_code, payload, compressor_id, header.request_id, header.response_to
            ), last
        return rewrite_reply(header, payload, hook, compressor_id), True
    if may_stream:
        return frame.raw, is_last_reply(*uncompressed(frame))
    return frame.raw, True


def rewrite_reply(
    header: MsgHeader, payload: bytes, hook: ReplyHook | None, compressor_id: int | None
) -> bytes:
    """The whole reply message with `hook` applied to its documents, and compressed with
    `compressor_id` (the client's, where the upstream does not take it) if one is given."""
    if hook is not None:
        payload = _apply_hook(header, payload, hook)
    if compressor_id is not None:
        return compress(
            header.op_code, payload, compressor_id, header.request_id, header.response_to
        )
    length = HEADER_SIZE + len(payload)
    return (
        MsgHeader(length, header.request_id, header.response_to, header.op_code).encode() + payload
    )


def _apply_hook(header: MsgHeader, payload: bytes, hook: ReplyHook) -> bytes:
    """The reply's payload (bytes after the header) with the hook applied: to an OP_MSG's
    body, or to each document of an OP_REPLY (the answer to a legacy OP_QUERY hello)."""
    if header.op_code == OpCode.OP_REPLY:
        reply = decode_op_reply(payload)
        documents = tuple(bson.encode(hook(decode_document(doc))) for doc in reply.documents)
        rewritten_reply = OpReply(
            response_flags=reply.response_flags,
            cursor_id=reply.cursor_id,
            starting_from=reply.starting_from,
            documents=documents,
        )
        return encode_op_reply(rewritten_reply, header.request_id, header.response_to)[HEADER_SIZE:]
    message = decode_op_msg(header, payload)
    body = bson.encode(hook(decode_document(message.body)))
    rewritten = OpMsg(flags=message.flags, body=body, sequences=message.sequences)
    return encode_op_msg(rewritten, header.request_id, header.response_to)[HEADER_SIZE:]


class InFlight:
    """One request owed a reply, kept until its last reply has gone through. Not a
    dataclass, and no __init__: one is made per request, and sets only the fields that
    differ."""

    # What it counts on, and its command document (for the slow log's namespace):
    # message[body_at:], sliced only for a log line (most requests never need it).
    command: CommandCounts | None = None
    name: str = ""
    message: bytes = b""
    body_at: int = 0
    # perf_counter_ns when it was read from the client (0: no round trip to time: one of
    # the proxy's own commands, or a stream past its first reply), when it was sent
    # upstream, and how long it waited for models.
    started_ns: int = 0
    forwarded_ns: int = 0
    inference_ns: int = 0
    reply_hook: ReplyHook | None = None
    # The client's compressor, for replies the proxy compresses itself because the
    # upstream does not take it.
    compressor_id: int | None = None
    # Where the reply to one of the proxy's own upstream commands goes.
    internal: trio.MemorySendChannel[Frame] | None = None
    # exhaustAllowed: the upstream may answer with a stream of replies (moreToCome).
    may_stream: bool = False
    # Its one reply goes to the client as it came, with nothing to do after it: no hook,
    # no compressor, no stream, not internal, nothing to hear of it (most requests).
    plain: bool = False
    # Shutdown waits for work in flight, but not for a hello: drivers' monitors keep an
    # awaitable hello waiting upstream (maxAwaitTimeMS, 10 s).
    is_work: bool = True
    # The responseTo values under which its next reply may come (see Session._reply_passed).
    reply_keys: tuple[int, ...] = ()
    # Called once the upstream has answered (a write the search indexes must hear of).
    after_reply: Callable[[], None] | None = None
    # False for a moreToCome request (w:0): no reply comes, its round trip ends once sent.
    owes_reply: bool = True
