"""The 16-byte message header that starts every wire protocol message."""

from __future__ import annotations

import struct
from enum import IntEnum
from functools import partial
from typing import NamedTuple

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MsgHeader",
    "OpCode",
    "parse_header",
    "unpack_header",
]

HEADER_SIZE = 16
# maxMessageSizeBytes of every MongoDB server since 2.6.
MAX_MESSAGE_SIZE = 48_000_000

_HEADER = struct.Struct("<iiii")
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


class OpCode(IntEnum):
    OP_REPLY = 1
    OP_UPDATE = 2001
    OP_INSERT = 2002
    OP_QUERY = 2004
    OP_GET_MORE = 2005
    OP_DELETE = 2006
    OP_KILL_CURSORS = 2007
    OP_COMPRESSED = 2012
    OP_MSG = 2013


class MsgHeader(NamedTuple):
    """messageLength, requestID, responseTo, opCode: four little-endian int32s.

    ``op_code`` stays a plain int: a message with an opcode we do not know is
    still forwarded untouched.

    An immutable record like the codec's dataclasses, but a tuple: every frame in
    either direction has one, and a tuple is built straight from what the struct
    unpacks (about 0.2 µs, where a frozen dataclass's __init__ takes 1.5 µs).
    """

    message_length: int
    request_id: int
    response_to: int
    op_code: int

    def encode(self) -> bytes:
        fields = (self.message_length, self.request_id, self.response_to, self.op_code)
        for name, value in zip(
            ("message_length", "request_id", "response_to", "op_code"), fields, strict=True
        ):
            if not _INT32_MIN <= value <= _INT32_MAX:
                raise LocalProtocolError(f"header {name} {value} does not fit in an int32")
        return _HEADER.pack(*fields)


def check_message_length(length: int, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
    """Raise RemoteProtocolError unless ``length`` is a plausible messageLength."""
    if length < HEADER_SIZE:
        raise RemoteProtocolError(
            f"message length {length} is shorter than the {HEADER_SIZE}-byte header"
        )
    if length > max_message_size:
        raise RemoteProtocolError(
            f"message length {length} exceeds the maximum message size {max_message_size}"
        )


def parse_header(
    data: bytes | bytearray | memoryview, max_message_size: int = MAX_MESSAGE_SIZE
) -> MsgHeader:
    """Read the header from the first 16 bytes of ``data`` and check its length."""
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(f"message header needs {HEADER_SIZE} bytes, got {len(data)}")
    length, request_id, response_to, op_code = _HEADER.unpack_from(data, 0)
    check_message_length(length, max_message_size)
    return MsgHeader(length, request_id, response_to, op_code)


def unpack_header(data: bytes | bytearray, offset: int = 0) -> MsgHeader:
    """The header at ``data[offset:]`` as it is, unchecked: for a frame whose length a
    reader has already checked (`FrameReader`)."""
    # tuple.__new__ straight from the unpacked ints: MsgHeader(...) and _make add a
    # Python-level call each.
    return _new_header(_HEADER.unpack_from(data, offset))


_new_header = partial(tuple.__new__, MsgHeader)
