"""Legacy OP_QUERY (2004) and OP_REPLY (1): drivers still open with a hello this way."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._bson import check_document, encode_cstring, read_cstring, read_document
from .errors import LocalProtocolError, RemoteProtocolError
from .header import HEADER_SIZE, MsgHeader, OpCode

__all__ = [
    "OpQuery",
    "OpReply",
    "decode_op_query",
    "decode_op_reply",
    "encode_op_query",
    "encode_op_reply",
]

_INT32 = struct.Struct("<i")
_SKIP_RETURN = struct.Struct("<ii")
_REPLY_PREFIX = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned


@dataclass(frozen=True)
class OpQuery:
    flags: int
    full_collection_name: str
    number_to_skip: int
    number_to_return: int
    query: bytes
    return_fields_selector: bytes | None = None


@dataclass(frozen=True)
class OpReply:
    response_flags: int
    cursor_id: int
    starting_from: int
    documents: tuple[bytes, ...]


def decode_op_query(payload: bytes) -> OpQuery:
    """Decode the bytes after the header of an OP_QUERY."""
    end = len(payload)
    if end < _INT32.size:
        raise RemoteProtocolError(f"OP_QUERY of {end} bytes has no room for flags")
    (flags,) = _INT32.unpack_from(payload, 0)
    name, offset = read_cstring(payload, _INT32.size, end, "OP_QUERY fullCollectionName")
    if end - offset < _SKIP_RETURN.size:
        raise RemoteProtocolError("OP_QUERY is truncated before numberToSkip/numberToReturn")
    skip, to_return = _SKIP_RETURN.unpack_from(payload, offset)
    offset += _SKIP_RETURN.size
    query, offset = read_document(payload, offset, end, "OP_QUERY query")
    selector = None
    if offset < end:
        selector, offset = read_document(payload, offset, end, "OP_QUERY returnFieldsSelector")
    if offset != end:
        raise RemoteProtocolError(f"OP_QUERY has {end - offset} unexpected trailing bytes")
    return OpQuery(flags, name, skip, to_return, query, selector)


def encode_op_query(q: OpQuery, request_id: int, response_to: int) -> bytes:
    """The whole OP_QUERY message, header included."""
    check_document(q.query, "OP_QUERY query")
    parts = [
        _pack_int32(q.flags, "OP_QUERY flags"),
        encode_cstring(q.full_collection_name, "OP_QUERY fullCollectionName"),
        _pack_int32(q.number_to_skip, "OP_QUERY numberToSkip"),
        _pack_int32(q.number_to_return, "OP_QUERY numberToReturn"),
        q.query,
    ]
    if q.return_fields_selector is not None:
        check_document(q.return_fields_selector, "OP_QUERY returnFieldsSelector")
        parts.append(q.return_fields_selector)
    return _with_header(b"".join(parts), request_id, response_to, OpCode.OP_QUERY)


def decode_op_reply(payload: bytes) -> OpReply:
    """Decode the bytes after the header of an OP_REPLY."""
    end = len(payload)
    if end < _REPLY_PREFIX.size:
        raise RemoteProtocolError(
            f"OP_REPLY of {end} bytes is shorter than its {_REPLY_PREFIX.size}-byte prefix"
        )
    flags, cursor_id, starting_from, number_returned = _REPLY_PREFIX.unpack_from(payload, 0)
    offset = _REPLY_PREFIX.size
    documents = []
    while offset < end:
        document, offset = read_document(payload, offset, end, "OP_REPLY document")
        documents.append(document)
    if number_returned != len(documents):
        raise RemoteProtocolError(
            f"OP_REPLY numberReturned is {number_returned} but it holds {len(documents)} documents"
        )
    return OpReply(flags, cursor_id, starting_from, tuple(documents))


def encode_op_reply(reply: OpReply, request_id: int, response_to: int) -> bytes:
    """The whole OP_REPLY message, header included."""
    for document in reply.documents:
        check_document(document, "OP_REPLY document")
    if not -(2**63) <= reply.cursor_id < 2**63:
        raise LocalProtocolError(f"OP_REPLY cursorID {reply.cursor_id} does not fit in an int64")
    prefix = b"".join(
        (
            _pack_int32(reply.response_flags, "OP_REPLY responseFlags"),
            struct.pack("<q", reply.cursor_id),
            _pack_int32(reply.starting_from, "OP_REPLY startingFrom"),
            _pack_int32(len(reply.documents), "OP_REPLY numberReturned"),
        )
    )
    return _with_header(
        prefix + b"".join(reply.documents), request_id, response_to, OpCode.OP_REPLY
    )


def _pack_int32(value: int, what: str) -> bytes:
    if not -(2**31) <= value < 2**31:
        raise LocalProtocolError(f"{what} {value} does not fit in an int32")
    return _INT32.pack(value)


def _with_header(payload: bytes, request_id: int, response_to: int, op_code: int) -> bytes:
    length = HEADER_SIZE + len(payload)
    return MsgHeader(length, request_id, response_to, op_code).encode() + payload
