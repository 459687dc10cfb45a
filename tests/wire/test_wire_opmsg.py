import contextlib
import struct

import bson
import pytest
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo import message as pymongo_message

from proxy.wire import (
    CHECKSUM_PRESENT,
    EXHAUST_ALLOWED,
    MORE_TO_COME,
    DocumentSequence,
    LocalProtocolError,
    MsgHeader,
    OpMsg,
    ProtocolError,
    RemoteProtocolError,
    command_name,
    crc32c,
    decode_op_msg,
    encode_op_msg,
    parse_header,
    peek_command,
)
from tests.wire.wire_strategies import command_documents, op_msgs

BODY = bson.encode({"insert": "coll", "$db": "db"})
DOCS = (bson.encode({"_id": 1}), bson.encode({"_id": 2, "x": "y"}))


def _decode(message: bytes) -> OpMsg:
    return decode_op_msg(parse_header(message), message[16:])


def _by_hand(flags: int, body: bytes, sections: bytes = b"", request_id: int = 9) -> bytes:
    payload = struct.pack("<I", flags) + b"\x00" + body + sections
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, 2013) + payload


def _sequence_section(identifier: bytes, docs: tuple[bytes, ...]) -> bytes:
    size = 4 + len(identifier) + 1 + sum(map(len, docs))
    return b"\x01" + struct.pack("<i", size) + identifier + b"\x00" + b"".join(docs)


def test_matches_spec_bytes_built_by_hand() -> None:
    msg = OpMsg(0, BODY, (DocumentSequence("documents", DOCS),))
    expected = _by_hand(0, BODY, _sequence_section(b"documents", DOCS))
    assert encode_op_msg(msg, request_id=9, response_to=0) == expected
    assert _decode(expected) == msg


def test_pymongo_built_op_msg_decodes_and_re_encodes_identically() -> None:
    command = {"insert": "coll", "ordered": True, "documents": [{"_id": 1}, {"_id": 2}]}
    request_id, raw, _, _ = pymongo_message._op_msg(0, command, "db", None, DEFAULT_CODEC_OPTIONS)
    msg = _decode(raw)
    assert command_name(msg.body) == "insert"
    assert bson.decode(msg.body) == {"insert": "coll", "ordered": True, "$db": "db"}
    assert msg.sequences[0].identifier == "documents"
    assert [bson.decode(d) for d in msg.sequences[0].documents] == [{"_id": 1}, {"_id": 2}]
    assert encode_op_msg(msg, request_id, 0) == raw


def test_pymongo_reads_our_reply() -> None:
    raw = encode_op_msg(OpMsg(0, bson.encode({"ok": 1.0})), 1, 9)
    reply = pymongo_message._OpMsg.unpack(raw[16:])
    assert reply.unpack_response()[0] == {"ok": 1.0}


def test_flag_properties() -> None:
    msg = OpMsg(CHECKSUM_PRESENT | MORE_TO_COME | EXHAUST_ALLOWED, BODY)
    assert msg.checksum_present and msg.more_to_come and msg.exhaust_allowed
    plain = OpMsg(0, BODY)
    assert not (plain.checksum_present or plain.more_to_come or plain.exhaust_allowed)


def test_optional_bits_are_ignored_but_kept() -> None:
    flags = EXHAUST_ALLOWED | (1 << 31)
    assert _decode(_by_hand(flags, BODY)).flags == flags


@pytest.mark.parametrize("bit", [2, 3, 15])
def test_unknown_required_bit_is_refused(bit: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown required bits"):
        _decode(_by_hand(1 << bit, BODY))
    with pytest.raises(LocalProtocolError, match="unknown required bits"):
        encode_op_msg(OpMsg(1 << bit, BODY), 1, 0)


def test_checksum_round_trip_and_tamper() -> None:
    msg = OpMsg(CHECKSUM_PRESENT, BODY, (DocumentSequence("documents", DOCS),))
    raw = encode_op_msg(msg, 3, 4)
    assert struct.unpack("<I", raw[-4:])[0] == crc32c(raw[:-4])
    assert parse_header(raw).message_length == len(raw)
    assert _decode(raw) == msg
    # A flipped bit in the request id (header), the flags' upper bytes, a
    # section or the checksum itself is caught.
    for index in (5, 19, 30, len(raw) - 1):
        tampered = bytearray(raw)
        tampered[index] ^= 0x40
        with pytest.raises(RemoteProtocolError, match="checksum mismatch"):
            _decode(bytes(tampered))


def test_checksum_by_hand() -> None:
    unsigned = _by_hand(CHECKSUM_PRESENT, BODY)
    length = len(unsigned) + 4
    unsigned = struct.pack("<i", length) + unsigned[4:]
    raw = unsigned + struct.pack("<I", crc32c(unsigned))
    assert encode_op_msg(OpMsg(CHECKSUM_PRESENT, BODY), 9, 0) == raw


def test_checksum_flag_without_room() -> None:
    with pytest.raises(RemoteProtocolError, match="no room for the checksum"):
        decode_op_msg(MsgHeader(22, 1, 0, 2013), b"\x01\x00\x00\x00\x00\x00")


def test_missing_body_section() -> None:
    with pytest.raises(RemoteProtocolError, match="no body"):
        decode_op_msg(MsgHeader(20, 1, 0, 2013), bytes(4))
    only_sequence = struct.pack("<I", 0) + _sequence_section(b"documents", DOCS)
    with pytest.raises(RemoteProtocolError, match="no body"):
        decode_op_msg(MsgHeader(16 + len(only_sequence), 1, 0, 2013), only_sequence)


def test_two_body_sections() -> None:
    with pytest.raises(RemoteProtocolError, match="more than one body"):
        _decode(_by_hand(0, BODY, b"\x00" + BODY))


def test_body_after_sequence_is_accepted() -> None:
    payload = struct.pack("<I", 0) + _sequence_section(b"updates", DOCS) + b"\x00" + BODY
    msg = decode_op_msg(MsgHeader(16 + len(payload), 1, 0, 2013), payload)
    assert msg.body == BODY
    assert msg.sequences == (DocumentSequence("updates", DOCS),)


def test_unknown_section_kind() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown kind 2"):
        _decode(_by_hand(0, BODY, b"\x02" + BODY))


def test_header_length_mismatch() -> None:
    raw = _by_hand(0, BODY)
    with pytest.raises(RemoteProtocolError, match="header says"):
        decode_op_msg(MsgHeader(len(raw) + 1, 1, 0, 2013), raw[16:])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x05\x00\x00", "at least 5"),
        (b"\x04\x00\x00\x00\x00", "below 5"),
        (b"\x06\x00\x00\x00\x00", "overruns"),
        (b"\x05\x00\x00\x00\x01", "NUL"),
    ],
)
def test_bad_body_framing(body: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        _decode(_by_hand(0, body))


def test_bad_sequence_framing() -> None:
    good = _sequence_section(b"documents", DOCS)
    too_long = good[:1] + struct.pack("<i", len(good)) + good[5:]
    with pytest.raises(RemoteProtocolError, match="out of bounds"):
        _decode(_by_hand(0, BODY, too_long))
    shorter = good[:1] + struct.pack("<i", len(good) - 2) + good[5:-1]  # cuts the last doc
    with pytest.raises(RemoteProtocolError, match="'documents'"):
        _decode(_by_hand(0, BODY, shorter))
    no_nul = b"\x01" + struct.pack("<i", 7) + b"abc"
    with pytest.raises(RemoteProtocolError, match="identifier: missing NUL"):
        _decode(_by_hand(0, BODY, no_nul))


def test_empty_sequence_round_trips() -> None:
    msg = OpMsg(0, BODY, (DocumentSequence("documents", ()),))
    assert _decode(encode_op_msg(msg, 1, 0)) == msg


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (OpMsg(0, BODY + b"x"), "1 bytes after"),
        (OpMsg(0, b"\x00"), "at least 5"),
        (OpMsg(0, BODY, (DocumentSequence("a\x00b", ()),)), "NUL byte"),
        (OpMsg(0, BODY, (DocumentSequence("d", (b"junk",)),)), "'d'"),
        (OpMsg(-1, BODY), "uint32"),
    ],
)
def test_encode_refuses_invalid_messages(msg: OpMsg, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_op_msg(msg, 1, 0)


def test_command_name() -> None:
    assert command_name(BODY) == "insert"
    assert command_name(bson.encode({"hello": 1, "x": {"deep": [1, 2]}})) == "hello"
    assert command_name(bson.encode({"ünïcode": 1})) == "ünïcode"
    assert command_name(memoryview(BODY).tobytes()) == "insert"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "too short"),
        (bson.encode({}), "empty"),
        (b"\x20\x00\x00\x00\x10abc", "out of bounds"),
        (b"\x08\x00\x00\x00\x10abc", "missing NUL"),
        (b"\x09\x00\x00\x00\x10\xff\xfe\x00\x00", "UTF-8"),
    ],
)
def test_command_name_garbage(body: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        command_name(body)


@settings(max_examples=200)
@given(op_msgs, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_round_trip(msg: OpMsg, request_id: int, response_to: int) -> None:
    raw = encode_op_msg(msg, request_id, response_to)
    header = parse_header(raw)
    assert (header.request_id, header.response_to, header.op_code) == (
        request_id,
        response_to,
        2013,
    )
    assert header.message_length == len(raw)
    assert decode_op_msg(header, raw[16:]) == msg


@given(command_documents)
def test_command_name_is_the_first_key(body: bytes) -> None:
    assert command_name(body) == next(iter(bson.decode(body)))


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_arbitrary_payload(payload: bytes) -> None:
    try:
        msg = decode_op_msg(MsgHeader(16 + len(payload), 1, 0, 2013), payload)
    except ProtocolError:
        return
    assert isinstance(msg.body, bytes)


@given(st.binary(max_size=40))
def test_command_name_arbitrary_bytes(body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        command_name(body)


# -- peek_command: the session's fast path ------------------------------------------


@pytest.mark.parametrize("flags", [0, MORE_TO_COME, EXHAUST_ALLOWED, MORE_TO_COME | 1 << 20])
def test_peek_reads_flags_and_name_of_a_body_only_message(flags: int) -> None:
    raw = _by_hand(flags, bson.encode({"ping": 1, "$db": "admin"}))
    assert peek_command(raw, 16) == (flags, "ping")
    assert peek_command(raw[16:]) == (flags, "ping")


@pytest.mark.parametrize(
    ("why", "raw"),
    [
        ("checksum", encode_op_msg(OpMsg(CHECKSUM_PRESENT, BODY), 1, 0)),
        ("sequence", _by_hand(0, BODY, _sequence_section(b"documents", DOCS))),
        ("unknown required bit", _by_hand(1 << 4, BODY)),
        ("empty body", _by_hand(0, b"\x05\x00\x00\x00\x00")),
        ("body overruns", _by_hand(0, struct.pack("<i", len(BODY) + 1) + BODY[4:])),
        ("no final NUL", _by_hand(0, BODY[:-1] + b"\x01")),
        ("key not UTF-8", _by_hand(0, BODY[:5] + b"\xff\xfe" + BODY[7:])),
        (
            "sequence first",
            _by_hand(0, b"")[:20] + _sequence_section(b"documents", DOCS) + b"\x00" + BODY,
        ),
        ("too short", _by_hand(0, b"")),
    ],
)
def test_peek_leaves_every_other_message_to_the_decoder(why: str, raw: bytes) -> None:
    assert peek_command(raw, 16) is None, why


@given(op_msgs)
def test_peek_agrees_with_the_decoder(msg: OpMsg) -> None:
    raw = encode_op_msg(msg, 1, 0)
    peeked = peek_command(raw, 16)
    if msg.sequences or msg.checksum_present:
        assert peeked is None
    else:
        assert peeked == (msg.flags, command_name(msg.body))


@settings(max_examples=300)
@given(st.binary(max_size=60), st.sampled_from([0, MORE_TO_COME, EXHAUST_ALLOWED, 1]))
def test_peek_accepts_only_what_the_decoder_accepts(tail: bytes, flags: int) -> None:
    """Whatever the fast path forwards unread, the full path would have forwarded too:
    same flags, same command name; it never raises."""
    payload = struct.pack("<I", flags) + b"\x00" + struct.pack("<i", len(tail) + 4) + tail
    for candidate in (payload, payload[:5] + tail):
        peeked = peek_command(candidate)
        if peeked is None:
            continue
        msg = decode_op_msg(MsgHeader(16 + len(candidate), 1, 0, 2013), candidate)
        assert peeked == (msg.flags, command_name(msg.body))
