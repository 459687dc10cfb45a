"""engine.raw_documents: a model's output written into a document kept as BSON gives the
very bytes that decoding it, set_path and encoding it again give, and leaves the rest of
the document as the client sent it; reading the input gives what get_path and
array_on_path give."""

from __future__ import annotations

import datetime
import struct
import uuid
from typing import Any

import bson
import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary, UuidRepresentation
from bson.dbref import DBRef

from engine.documents import FAITHFUL, MISSING, array_on_path, get_path, set_path
from engine.raw_documents import read_path, write_path

OUTPUT = {"label": "a", "score": 0.75, "top": [{"label": "a", "score": 0.75}], "version": 2}

# Every BSON type, in an order that is not sorted, with values that a decode/encode round
# trip must not change: dates past Python's range, UUIDs of both subtypes, int64 apart
# from int32, a code with its scope, regex flags.
EVERY_TYPE: dict[str, Any] = {
    "_id": ObjectId("64b7f0c2a1b2c3d4e5f60718"),
    "zeta": "héllo",
    "double": 1.5,
    "int32": 7,
    "int64": Int64(7),
    "decimal": Decimal128("1.10"),
    "timestamp": Timestamp(1, 2),
    "regex": Regex("a.*b", "im"),
    "code": Code("f(x)", {"x": 1}),
    "plain_code": Code("g()"),
    "min": MinKey(),
    "max": MaxKey(),
    "null": None,
    "bool": True,
    "date": datetime.datetime(2020, 1, 2, 3, 4, 5, 6000),
    "far_date": bson.DatetimeMS(2**62),
    "binary": Binary(b"\x00\x01\x02", 0),
    "uuid4": Binary.from_uuid(uuid.UUID(int=1), UuidRepresentation.STANDARD),
    "uuid3": Binary(b"0123456789abcdef", 3),
    "ref": DBRef("coll", 1, "db", extra=1),
    "sub": {"b": 1, "a": [1, {"b": 2}], "x": {"y": 1}},
    "items": [{"x": 1}, {"x": 2}],
    "x": [0.5, 1, Int64(2), 3.25],
}


def _raw(document: dict[str, Any]) -> bytes:
    return bson.encode(document, codec_options=FAITHFUL)


def _set_and_encode(raw: bytes, path: str, value: Any) -> bytes:
    """What the proxy did before: decode the whole document, set, encode it again."""
    document = bson.decode(raw, codec_options=FAITHFUL)
    set_path(document, path, value)
    return bson.encode(document, codec_options=FAITHFUL)


@pytest.mark.parametrize(
    "path",
    [
        "_outputs.m",  # the usual: appended
        "flat",
        "new.a.b",
        "sub.x.z",  # into a sub-document, in its place
        "sub.b",  # a value replaced in place
        "zeta",  # a top-level value replaced in place
        "double.x",  # a non-document in the way: replaced by a document, in place
        "items.x",  # an array in the way: the same
        "ref.note",  # a DBRef is no document to set_path
    ],
)
def test_write_gives_the_bytes_of_decode_set_encode(path: str) -> None:
    raw = _raw(EVERY_TYPE)
    assert write_path(raw, path, OUTPUT) == _set_and_encode(raw, path, OUTPUT)


def test_an_appended_output_leaves_the_clients_bytes_as_they_were() -> None:
    raw = _raw(EVERY_TYPE)
    written = write_path(raw, "_outputs.m", OUTPUT)
    (length,) = struct.unpack_from("<i", written)
    assert length == len(written)
    # Every element the client sent, byte for byte, then the output's, then the NUL.
    assert written[4 : len(raw) - 1] == raw[4:-1]
    assert written[len(raw) - 1 :] == _raw({"_outputs": {"m": OUTPUT}})[4:]
    decoded = bson.decode(written, codec_options=FAITHFUL)
    assert list(decoded) == [*EVERY_TYPE, "_outputs"]
    assert decoded["_outputs"] == {"m": OUTPUT}
    assert decoded["int64"].__class__ is Int64 and decoded["far_date"] == EVERY_TYPE["far_date"]


def test_an_output_beside_another_models_keeps_the_others_place_and_bytes() -> None:
    document = {"_id": 1, "_outputs": {"first": {"label": "x", "version": 1}}, "x": [1.0]}
    raw = _raw(document)
    written = write_path(raw, "_outputs.second", OUTPUT)
    assert written == _set_and_encode(raw, "_outputs.second", OUTPUT)
    decoded = bson.decode(written, codec_options=FAITHFUL)
    assert list(decoded) == ["_id", "_outputs", "x"]
    assert list(decoded["_outputs"]) == ["first", "second"]
    # The elements around the one rewritten are the client's bytes.
    assert written.endswith(_raw({"x": [1.0]})[4:])


def test_a_key_given_twice_is_decoded_whole_as_before() -> None:
    # {"_outputs": 1, "x": 2, "_outputs": 3}: BSON allows it, a decoded dict keeps one.
    elements = b"\x10_outputs\x00" + struct.pack("<i", 1)
    elements += b"\x10x\x00" + struct.pack("<i", 2)
    elements += b"\x10_outputs\x00" + struct.pack("<i", 3)
    raw = struct.pack("<i", len(elements) + 5) + elements + b"\x00"
    assert write_path(raw, "_outputs.m", OUTPUT) == _set_and_encode(raw, "_outputs.m", OUTPUT)


def test_a_document_that_does_not_add_up_fails_as_decoding_it_does() -> None:
    raw = _raw({"_outputs": {"a": 1}, "x": 1})
    broken = raw[:4] + b"\x7a" + raw[5:]  # the first element's type: none that exists
    with pytest.raises(bson.errors.InvalidBSON):
        write_path(broken, "_outputs.m", OUTPUT)


@pytest.mark.parametrize(
    "path",
    ["x", "sub.x.y", "sub.a", "sub.a.b", "items.x", "nope", "nope.x", "zeta", "ref", "double.x"],
)
def test_read_gives_get_path_and_array_on_path(path: str) -> None:
    raw = _raw(EVERY_TYPE)
    decoded = bson.decode(raw, codec_options=FAITHFUL)
    value = get_path(decoded, path)
    expected = (value, array_on_path(decoded, path) if value is MISSING else None)
    assert read_path(raw, path) == expected


def test_read_of_an_input_through_an_array_names_the_array() -> None:
    assert read_path(_raw({"a": {"items": [{"x": 1}]}}), "a.items.x") == (MISSING, "a.items")
