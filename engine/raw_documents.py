"""Reading a model's input from, and writing its output into, a document kept as raw BSON.

An inline insert's documents arrive as BSON and leave as BSON. Writing an output does not
encode the whole document again: only the top-level element on the output's path is
replaced (or appended, where the document has none), and the rest of the document is kept
byte for byte. `write_path` gives exactly the bytes that `set_path` on the decoded
document and encoding it give (the element is decoded and encoded with FAITHFUL, as the
whole document would be), and falls back to that where the document cannot be read
element by element (a key on the path given twice, an element of unknown type, a length
that does not add up), so that a malformed document fails as it did.

A BSON document is int32 length, its elements, 0x00; an element is a type byte, its key
as a cstring, and its value, whose size the type says."""

from __future__ import annotations

import functools
import struct
from typing import Any

import bson

from engine.documents import FAITHFUL, MISSING, array_on_path, get_path, set_path

__all__ = ["read_path", "write_path"]

_INT32 = struct.Struct("<i")
_read_int32 = _INT32.unpack_from
_pack_int32 = _INT32.pack

# Value sizes of the fixed-size types: double, undefined, ObjectId, bool, datetime, null,
# int32, timestamp, int64, decimal128, min key, max key.
_FIXED = {1: 8, 6: 0, 7: 12, 8: 1, 9: 8, 10: 0, 16: 4, 17: 8, 18: 8, 19: 16, 255: 0, 127: 0}
# Types whose value starts with an int32: what to add to it for the value's size.
_STRING = frozenset({2, 13, 14})  # string, JavaScript code, symbol: int32 + bytes
_WHOLE = frozenset({3, 4, 15})  # document, array, code with scope: the int32 is the size
_BINARY, _REGEX, _DB_POINTER = 5, 11, 12


class _Unreadable(Exception):
    """The document cannot be read element by element: it is decoded whole instead."""


def _span(raw: bytes, key: bytes) -> tuple[int, int] | None:
    """Where the top-level element named `key` starts and ends in `raw`, or None."""
    if key + b"\x00" not in raw:  # a key is followed by its NUL wherever it is
        return None
    end = len(raw) - 1
    if end < 4 or _read_int32(raw, 0)[0] != len(raw) or raw[end] != 0:
        raise _Unreadable
    found = None
    position = 4
    size_of_key = len(key)
    try:
        while position < end:
            kind = raw[position]
            name_end = raw.index(0, position + 1)
            value = name_end + 1
            size = _FIXED.get(kind)
            if size is None:
                if kind in _STRING:
                    size = 4 + _read_int32(raw, value)[0]
                elif kind in _WHOLE:
                    size = _read_int32(raw, value)[0]
                elif kind == _BINARY:
                    size = 5 + _read_int32(raw, value)[0]
                elif kind == _REGEX:
                    size = raw.index(0, raw.index(0, value) + 1) + 1 - value
                elif kind == _DB_POINTER:
                    size = 16 + _read_int32(raw, value)[0]
                else:
                    raise _Unreadable
            following = value + size
            if size < 0 or following > end:
                raise _Unreadable
            if name_end - position - 1 == size_of_key and raw.startswith(key, position + 1):
                if found is not None:
                    raise _Unreadable  # decoded, the last one would win: let decoding say
                found = (position, following)
            position = following
    except (ValueError, struct.error):
        raise _Unreadable from None
    if position != end:
        raise _Unreadable
    return found


def _element(raw: bytes, span: tuple[int, int]) -> dict[str, Any]:
    """The element at `span` decoded, as a one-key document."""
    start, stop = span
    return bson.decode(
        _pack_int32(stop - start + 5) + raw[start:stop] + b"\x00", codec_options=FAITHFUL
    )


def read_path(raw: bytes, path: str) -> tuple[Any, str | None]:
    """The value at the dotted `path` of the BSON document `raw` (MISSING if none) and,
    when it is MISSING because the path goes through an array, that array's path:
    `get_path` and `array_on_path` of the decoded document. (bson's C decoder reads a
    whole small document faster than Python finds one element in it.)"""
    document = bson.decode(raw, codec_options=FAITHFUL)
    value = get_path(document, path)
    return value, (array_on_path(document, path) if value is MISSING else None)


def write_path(raw: bytes, path: str, value: Any) -> bytes:
    """The BSON document `raw` with `value` set at the dotted `path` as `set_path` sets it
    (in place where the top-level field is there, appended where it is not); every other
    top-level element is kept byte for byte."""
    parts = _parts(path)
    try:
        span = _span(raw, parts[0].encode())
    except _Unreadable:
        document = bson.decode(raw, codec_options=FAITHFUL)
        set_path(document, path, value)
        return bson.encode(document, codec_options=FAITHFUL)
    if span is None:  # the usual case: appended, as set_path adds a key to a dict
        for part in reversed(parts):
            value = {part: value}
        encoded = bson.encode(value, codec_options=FAITHFUL)
        return _pack_int32(len(raw) + len(encoded) - 5) + raw[4:-1] + encoded[4:]
    element = _element(raw, span)
    set_path(element, path, value)
    encoded = bson.encode(element, codec_options=FAITHFUL)[4:-1]
    start, stop = span
    size = len(raw) - (stop - start) + len(encoded)
    return b"".join((_pack_int32(size), raw[4:start], encoded, raw[stop:]))


@functools.lru_cache(maxsize=256)
def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))
