"""Bounds checks on raw BSON: length prefixes and terminators, never the contents."""

from __future__ import annotations

import struct

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["check_document", "encode_cstring", "read_cstring", "read_document"]

_INT32 = struct.Struct("<i")
_MIN_DOCUMENT_SIZE = 5  # int32 length + terminating NUL


def read_document(data: bytes, offset: int, end: int, what: str) -> tuple[bytes, int]:
    """Return the BSON document at ``data[offset:]`` (within ``end``) and the offset after it."""
    if end - offset < _MIN_DOCUMENT_SIZE:
        raise RemoteProtocolError(
            f"{what}: {end - offset} bytes left, a BSON document needs at least 5"
        )
    (length,) = _INT32.unpack_from(data, offset)
    if length < _MIN_DOCUMENT_SIZE:
        raise RemoteProtocolError(f"{what}: BSON document length {length} is below 5")
    if length > end - offset:
        raise RemoteProtocolError(
            f"{what}: BSON document length {length} overruns the {end - offset} bytes left"
        )
    stop = offset + length
    if data[stop - 1] != 0:
        raise RemoteProtocolError(f"{what}: BSON document does not end with a NUL byte")
    return data[offset:stop], stop


def read_cstring(data: bytes, offset: int, end: int, what: str) -> tuple[str, int]:
    """Return the NUL-terminated UTF-8 string at ``data[offset:]`` and the offset after it."""
    nul = data.find(b"\x00", offset, end)
    if nul < 0:
        raise RemoteProtocolError(f"{what}: missing NUL terminator")
    try:
        text = data[offset:nul].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what}: not valid UTF-8 ({exc.reason})") from None
    return text, nul + 1


def check_document(doc: bytes, what: str) -> None:
    """Raise LocalProtocolError unless ``doc`` is exactly one framed BSON document."""
    try:
        _, stop = read_document(doc, 0, len(doc), what)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(str(exc)) from None
    if stop != len(doc):
        raise LocalProtocolError(
            f"{what}: {len(doc) - stop} bytes after the BSON document's declared length"
        )


def encode_cstring(text: str, what: str) -> bytes:
    """UTF-8 bytes of ``text`` plus NUL; LocalProtocolError if it holds a NUL itself."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} {text!r} is not encodable as UTF-8") from exc
    if b"\x00" in raw:
        raise LocalProtocolError(f"{what} {text!r} contains a NUL byte")
    return raw + b"\x00"
