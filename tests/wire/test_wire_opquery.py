import contextlib
import struct

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import (
    LocalProtocolError,
    OpQuery,
    OpReply,
    ProtocolError,
    RemoteProtocolError,
    decode_op_query,
    decode_op_reply,
    encode_op_query,
    encode_op_reply,
    parse_header,
)
from tests.wire.wire_strategies import documents, int32s

HELLO = bson.encode({"isMaster": 1, "helloOk": True, "client": {"driver": {"name": "x"}}})
SELECTOR = bson.encode({"_id": 0})


def test_op_query_matches_spec_bytes() -> None:
    payload = (
        struct.pack("<i", 4) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + HELLO + SELECTOR
    )
    expected = struct.pack("<iiii", 16 + len(payload), 7, 0, 2004) + payload
    query = OpQuery(4, "admin.$cmd", 0, -1, HELLO, SELECTOR)
    assert encode_op_query(query, 7, 0) == expected
    assert decode_op_query(expected[16:]) == query
    assert parse_header(expected).op_code == 2004


def test_op_query_without_selector() -> None:
    query = OpQuery(0, "db.coll", 5, 10, HELLO, None)
    raw = encode_op_query(query, 1, 0)
    assert decode_op_query(raw[16:]) == query


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x00\x00", "no room for flags"),
        (b"\x00\x00\x00\x00admin.$cmd", "missing NUL"),
        (b"\x00\x00\x00\x00a\x00\x00\x00", "numberToSkip"),
        (b"\x00\x00\x00\x00a\x00" + bytes(8) + b"\x05\x00", "query"),
        (b"\x00\x00\x00\x00a\x00" + bytes(8) + HELLO + b"\x01", "returnFieldsSelector"),
        (b"\x00\x00\x00\x00a\x00" + bytes(8) + HELLO + SELECTOR + bytes(5), "trailing"),
        (b"\x00\x00\x00\x00\xff\x00" + bytes(8) + HELLO, "UTF-8"),
    ],
)
def test_op_query_malformed(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_op_query(payload)


def test_op_query_encode_refuses_invalid() -> None:
    with pytest.raises(LocalProtocolError, match="NUL"):
        encode_op_query(OpQuery(0, "a\x00b", 0, 0, HELLO), 1, 0)
    with pytest.raises(LocalProtocolError, match="int32"):
        encode_op_query(OpQuery(2**31, "a.b", 0, 0, HELLO), 1, 0)
    with pytest.raises(LocalProtocolError, match="returnFieldsSelector"):
        encode_op_query(OpQuery(0, "a.b", 0, 0, HELLO, b"bad"), 1, 0)


def test_op_reply_matches_spec_bytes() -> None:
    docs = (bson.encode({"ok": 1.0, "ismaster": True}), bson.encode({"x": 1}))
    payload = struct.pack("<iqii", 8, 12345678901, 3, 2) + b"".join(docs)
    expected = struct.pack("<iiii", 16 + len(payload), 1, 7, 1) + payload
    reply = OpReply(8, 12345678901, 3, docs)
    assert encode_op_reply(reply, 1, 7) == expected
    assert decode_op_reply(expected[16:]) == reply


def test_op_reply_malformed() -> None:
    with pytest.raises(RemoteProtocolError, match="shorter than its 20-byte prefix"):
        decode_op_reply(bytes(19))
    with pytest.raises(RemoteProtocolError, match="numberReturned is 2 but it holds 1"):
        decode_op_reply(struct.pack("<iqii", 0, 0, 0, 2) + HELLO)
    with pytest.raises(RemoteProtocolError, match="OP_REPLY document"):
        decode_op_reply(struct.pack("<iqii", 0, 0, 0, 1) + HELLO[:-1])


def test_op_reply_encode_refuses_invalid() -> None:
    with pytest.raises(LocalProtocolError, match="int64"):
        encode_op_reply(OpReply(0, 2**63, 0, ()), 1, 0)
    with pytest.raises(LocalProtocolError, match="OP_REPLY document"):
        encode_op_reply(OpReply(0, 0, 0, (b"nope",)), 1, 0)


_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=30,
)


@settings(max_examples=200)
@given(int32s, _names, int32s, int32s, documents, st.none() | documents)
def test_op_query_round_trip(
    flags: int, name: str, skip: int, to_return: int, query: bytes, selector: bytes | None
) -> None:
    q = OpQuery(flags, name, skip, to_return, query, selector)
    assert decode_op_query(encode_op_query(q, 1, 2)[16:]) == q


@settings(max_examples=200)
@given(
    int32s,
    st.integers(-(2**63), 2**63 - 1),
    int32s,
    st.lists(documents, max_size=4).map(tuple),
)
def test_op_reply_round_trip(
    flags: int, cursor_id: int, starting_from: int, docs: tuple[bytes, ...]
) -> None:
    reply = OpReply(flags, cursor_id, starting_from, docs)
    raw = encode_op_reply(reply, 1, 2)
    assert parse_header(raw).message_length == len(raw)
    assert decode_op_reply(raw[16:]) == reply


@settings(max_examples=200)
@given(st.binary(max_size=60))
def test_arbitrary_bytes(payload: bytes) -> None:
    for decoder in (decode_op_query, decode_op_reply):
        with contextlib.suppress(ProtocolError):
            decoder(payload)
