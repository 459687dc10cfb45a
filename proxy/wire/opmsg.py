"""OP_MSG (opcode 2013): flag bits, a body section and document sequences.

Layout after the header: flagBits uint32, then sections until the end (or
until the 4-byte CRC-32C when checksumPresent is set). Section kind 0 is one
BSON document (the command); kind 1 is int32 size, cstring identifier and
BSON documents (drivers send ``documents``, ``updates``, ``deletes`` this way).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

from ._bson import check_document, encode_cstring, read_cstring, read_document
from .checksum import crc32c
from .errors import LocalProtocolError, RemoteProtocolError
from .header import HEADER_SIZE, MsgHeader, OpCode

__all__ = [
    "BODY_OFFSET",
    "CHECKSUM_PRESENT",
    "EXHAUST_ALLOWED",
    "MORE_TO_COME",
    "DocumentSequence",
    "OpMsg",
    "command_name",
    "decode_op_msg",
    "encode_op_msg",
    "peek_command",
    "peek_request",
]

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
# Bits 0-15 are "required": a receiver that does not know one must fail.
# Bits 16-31 are optional and may be ignored.
_REQUIRED_BITS = 0xFFFF
_KNOWN_REQUIRED_BITS = CHECKSUM_PRESENT | MORE_TO_COME

_UINT32 = struct.Struct("<I")
_INT32 = struct.Struct("<i")
_KIND_BODY = 0
_KIND_SEQUENCE = 1
# flagBits, the first section's kind and, for a body, its document's length.
_FIRST_SECTION = struct.Struct("<IBi")
#: Where the body document starts in an OP_MSG whose first section is its body.
BODY_OFFSET = _UINT32.size + 1


@dataclass(frozen=True)
class DocumentSequence:
    """A kind-1 section: its identifier and its raw BSON documents."""

    identifier: str
    documents: tuple[bytes, ...]


@dataclass(frozen=True)
class OpMsg:
    flags: int
    body: bytes
    sequences: tuple[DocumentSequence, ...] = ()

    @property
    def checksum_present(self) -> bool:
        return bool(self.flags & CHECKSUM_PRESENT)

    @property
    def more_to_come(self) -> bool:
        return bool(self.flags & MORE_TO_COME)

    @property
    def exhaust_allowed(self) -> bool:
        return bool(self.flags & EXHAUST_ALLOWED)


def _check_flags(flags: int, error: type[Exception]) -> None:
    unknown = flags & _REQUIRED_BITS & ~_KNOWN_REQUIRED_BITS
    if unknown:
        raise error(f"OP_MSG flags {flags:#010x} set unknown required bits {unknown:#06x}")


def decode_op_msg(header: MsgHeader, payload: bytes) -> OpMsg:
    """Decode an OP_MSG from its header and the bytes after the header."""
    if header.message_length != HEADER_SIZE + len(payload):
        raise RemoteProtocolError(
            f"OP_MSG header says {header.message_length} bytes, "
            f"message has {HEADER_SIZE + len(payload)}"
        )
    if len(payload) < _UINT32.size:
        raise RemoteProtocolError(f"OP_MSG of {len(payload)} bytes has no room for flagBits")
    (flags,) = _UINT32.unpack_from(payload, 0)
    _check_flags(flags, RemoteProtocolError)
    end = len(payload)
    if flags & CHECKSUM_PRESENT:
        end -= 4
        if end < _UINT32.size:
            raise RemoteProtocolError("OP_MSG with checksumPresent has no room for the checksum")
        (expected,) = _UINT32.unpack_from(payload, end)
        actual = crc32c(payload[:end], crc32c(header.encode()))
        if actual != expected:
            raise RemoteProtocolError(
                f"OP_MSG checksum mismatch: message says {expected:#010x}, "
                f"bytes give {actual:#010x}"
            )

    body: bytes | None = None
    sequences: list[DocumentSequence] = []
    offset = _UINT32.size
    while offset < end:
        kind = payload[offset]
        offset += 1
        if kind == _KIND_BODY:
            if body is not None:
                raise RemoteProtocolError("OP_MSG has more than one body (kind 0) section")
            body, offset = read_document(payload, offset, end, "OP_MSG body section")
        elif kind == _KIND_SEQUENCE:
            sequence, offset = _read_sequence(payload, offset, end)
            sequences.append(sequence)
        else:
            raise RemoteProtocolError(f"OP_MSG has a section of unknown kind {kind}")
    if body is None:
        raise RemoteProtocolError("OP_MSG has no body (kind 0) section")
    return OpMsg(flags, body, tuple(sequences))


def _read_sequence(payload: bytes, offset: int, end: int) -> tuple[DocumentSequence, int]:
    if end - offset < _INT32.size:
        raise RemoteProtocolError("OP_MSG document sequence section is truncated before its size")
    (size,) = _INT32.unpack_from(payload, offset)
    if size < _INT32.size + 1 or size > end - offset:
        raise RemoteProtocolError(
            f"OP_MSG document sequence size {size} is out of bounds ({end - offset} bytes left)"
        )
    stop = offset + size
    identifier, offset = read_cstring(
        payload, offset + _INT32.size, stop, "OP_MSG document sequence identifier"
    )
    documents = []
    while offset < stop:
        document, offset = read_document(
            payload, offset, stop, f"OP_MSG document sequence {identifier!r}"
        )
        documents.append(document)
    return DocumentSequence(identifier, tuple(documents)), stop


def encode_op_msg(msg: OpMsg, request_id: int, response_to: int, *, framed: bool = False) -> bytes:
    """The whole OP_MSG, header included, with a CRC-32C when ``msg.checksum_present``.

    Each document's framing (length prefix, terminator) is checked unless `framed`: the
    caller says its body and documents are framed already, as those the proxy builds are
    (encoded by bson, read by `decode_op_msg`, or written by engine.raw_documents): a
    check is a call per document, about a tenth of an inline insert's proxy CPU."""
    if not 0 <= msg.flags <= 0xFFFFFFFF:
        raise LocalProtocolError(f"OP_MSG flags {msg.flags} do not fit in a uint32")
    _check_flags(msg.flags, LocalProtocolError)
    if not framed:
        check_document(msg.body, "OP_MSG body")
    parts = [_UINT32.pack(msg.flags), bytes([_KIND_BODY]), msg.body]
    for sequence in msg.sequences:
        identifier = encode_cstring(sequence.identifier, "OP_MSG document sequence identifier")
        if not framed:
            for document in sequence.documents:
                check_document(document, f"OP_MSG document sequence {sequence.identifier!r}")
        size = _INT32.size + len(identifier) + sum(len(d) for d in sequence.documents)
        parts += [bytes([_KIND_SEQUENCE]), _INT32.pack(size), identifier, *sequence.documents]
    payload = b"".join(parts)
    length = HEADER_SIZE + len(payload) + (4 if msg.checksum_present else 0)
    header = MsgHeader(length, request_id, response_to, OpCode.OP_MSG).encode()
    if msg.checksum_present:
        return header + payload + _UINT32.pack(crc32c(payload, crc32c(header)))
    return header + payload


def peek_command(data: bytes, offset: int = 0) -> tuple[int, str] | None:
    """flagBits and command name of the OP_MSG whose payload (the bytes after the
    header) is `data[offset:]`, read without copying or decoding its body, when that
    message is the shape of nearly every command drivers send: one body section and
    nothing else, no checksum, no unknown required flag, a body that is framed as BSON
    and starts with a UTF-8 key. None for any other message: `decode_op_msg` reads it
    (and raises the protocol error, if there is one)."""
    end = len(data)
    body_at = offset + BODY_OFFSET
    if end - body_at < 7:  # the smallest body with a key: length, type, 1-byte key, NULs
        return None
    flags, kind, length = _FIRST_SECTION.unpack_from(data, offset)
    if (
        flags & _REQUIRED_BITS & ~MORE_TO_COME
        or kind != _KIND_BODY
        or length != end - body_at
        or data[end - 1] != 0
        or data[body_at + 4] == 0  # an empty document
    ):
        return None
    # The first element: its type byte, then its key as a cstring.
    key_at = body_at + 5
    nul = data.find(b"\x00", key_at, end - 1)
    if nul < 0:
        return None
    try:
        return flags, data[key_at:nul].decode("utf-8")
    except UnicodeDecodeError:
        return None


# A whole OP_MSG's header, flagBits, first section's kind, body length and the type of the
# body's first element: all that peek_request checks, in one unpack. The command name
# starts right after them.
_REQUEST_HEAD = struct.Struct("<iiiiIBiB")
_NAME_AT = _REQUEST_HEAD.size
_BODY_AT = HEADER_SIZE + BODY_OFFSET
# Names are looked up by the bytes where they start: a name of up to 14 bytes and its
# NUL are within them, followed by the start of its value (e.g. a collection name), so
# that a client may send many prefixes: the table stops growing at _MAX_PREFIXES.
_NAME_PREFIX = 16
_MAX_PREFIXES = 4096
# prefix -> command name, or None: not read from the prefix alone (peek_command reads it).
_names_by_prefix: dict[bytes, str | None] = {}


def peek_request(raw: bytes) -> tuple[int, int, str] | None:
    """requestID, flagBits and command name of the whole message `raw` (header included)
    when it is an OP_MSG that `peek_command` reads, else None: the same answer, at a
    fraction of its cost for the messages drivers send over and over, as the bytes where a
    command name starts are read once, then looked up."""
    size = len(raw)
    if size < _NAME_AT + _NAME_PREFIX:
        if size < HEADER_SIZE or _INT32.unpack_from(raw, 12)[0] != OpCode.OP_MSG:
            return None
        peeked = peek_command(raw, HEADER_SIZE)
        return None if peeked is None else (_INT32.unpack_from(raw, 4)[0], *peeked)
    _, request_id, _, op_code, flags, kind, body_length, first_type = _REQUEST_HEAD.unpack_from(raw)
    if (
        op_code != _OP_MSG
        or flags & _NOT_PEEKED_BITS
        or kind
        or body_length != size - _BODY_AT
        or not first_type  # an empty document
        or raw[-1]
    ):
        return None
    prefix = raw[_NAME_AT : _NAME_AT + _NAME_PREFIX]
    try:
        name = _names_by_prefix[prefix]
    except KeyError:
        name = _name_in_prefix(prefix)
    if name is None:
        peeked = peek_command(raw, HEADER_SIZE)
        return None if peeked is None else (request_id, flags, peeked[1])
    return request_id, flags, name


_OP_MSG = int(OpCode.OP_MSG)
_NOT_PEEKED_BITS = _REQUIRED_BITS & ~MORE_TO_COME


def _name_in_prefix(prefix: bytes) -> str | None:
    """The command name that `prefix` starts with, when it ends there (its NUL within the
    prefix, not its last byte: then the body goes on past it); kept for the next time."""
    name = None
    nul = prefix.find(b"\x00", 0, _NAME_PREFIX - 1)
    if nul >= 0:
        with contextlib.suppress(UnicodeDecodeError):
            name = prefix[:nul].decode("utf-8")
    if len(_names_by_prefix) < _MAX_PREFIXES:
        _names_by_prefix[prefix] = name
    return name


def command_name(body: bytes) -> str:
    """The first key of a raw BSON command document, without decoding the rest."""
    if len(body) < 5:
        raise RemoteProtocolError(f"command document of {len(body)} bytes is too short")
    (length,) = _INT32.unpack_from(body, 0)
    if not 5 <= length <= len(body):
        raise RemoteProtocolError(
            f"command document length {length} is out of bounds ({len(body)} bytes)"
        )
    if length == 5 or body[4] == 0:
        raise RemoteProtocolError("command document is empty")
    # Element: type byte at 4, then the key as a cstring; the document ends with NUL.
    name, _ = read_cstring(body, 5, length - 1, "command name")
    return name
