"""peek_request, the session's fast path: the same answer as peek_command (request id
added) for every message, whether its command name comes from the table of prefixes or
from a first reading."""

import struct

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import EXHAUST_ALLOWED, MORE_TO_COME, encode_op_msg, peek_command, peek_request
from proxy.wire.opmsg import OpMsg
from tests.wire.wire_strategies import op_msgs


def _expected(raw: bytes) -> tuple[int, int, str] | None:
    if len(raw) < 16 or struct.unpack_from("<i", raw, 12)[0] != 2013:
        return None
    peeked = peek_command(raw, 16)
    return None if peeked is None else (struct.unpack_from("<i", raw, 4)[0], *peeked)


def _message(flags: int, sections: bytes, request_id: int = 9, op_code: int = 2013) -> bytes:
    payload = struct.pack("<I", flags) + sections
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, op_code) + payload


BODY = bson.encode({"pi": 1, "filler": "x" * 20})


@pytest.mark.parametrize("flags", [0, MORE_TO_COME, EXHAUST_ALLOWED, MORE_TO_COME | 1 << 20])
@pytest.mark.parametrize(
    "command",
    [
        {"ping": 1},
        {"find": "a" * 40, "filter": {}},  # the value's bytes vary past the prefix
        {"find": "b", "filter": {}},
        {"abcdefghijklmn": 1},  # a name of 14 bytes: its NUL is the prefix's 15th
        {"abcdefghijklmno": 1},  # 15 bytes: the NUL is the prefix's last, read in full
        {"a_name_longer_than_the_prefix": 1},
        {"": 1},
    ],
)
def test_same_answer_as_peek_command_first_and_again(flags: int, command: dict) -> None:
    raw = encode_op_msg(OpMsg(flags, bson.encode({**command, "$db": "admin"})), 77, 0)
    expected = (77, flags, next(iter(command)))
    assert peek_request(raw) == expected == _expected(raw)
    assert peek_request(raw) == expected  # from the table now


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x10\x00\x00\x00" * 4,
        _message(0, b""),
        _message(0, b"\x00" + BODY, op_code=2004),
        _message(0, b"\x00" + BODY)[:-1],  # the body overruns the message
        _message(1, b"\x00" + BODY),  # checksumPresent
        _message(1 << 4, b"\x00" + BODY),  # an unknown required bit
        _message(0, b"\x01" + BODY),  # a sequence first
        _message(0, b"\x00" + BODY[:-1] + b"\x01"),  # no final NUL
        _message(0, b"\x00" + BODY + b"\x00"),  # something after the body
        _message(0, b"\x00" + BODY[:5] + b"\xff\xfe" + BODY[7:]),  # a name not UTF-8
        _message(0, b"\x00" + b"\x05\x00\x00\x00\x00" + b"\x00" * 20),  # an empty body
    ],
)
def test_other_messages_are_left_to_the_decoder(raw: bytes) -> None:
    assert peek_request(raw) is None
    assert peek_request(raw) is None
    assert _expected(raw) is None


def test_the_messages_above_are_read_once_well_formed() -> None:
    assert peek_request(_message(0, b"\x00" + BODY)) == (9, 0, "pi")


@given(op_msgs)
def test_agrees_with_peek_command_on_any_op_msg(msg: OpMsg) -> None:
    raw = encode_op_msg(msg, 5, 0)
    assert peek_request(raw) == _expected(raw)


@settings(max_examples=500)
@given(st.binary(max_size=60), st.sampled_from([0, MORE_TO_COME, EXHAUST_ALLOWED, 1]))
def test_agrees_with_peek_command_on_any_bytes(tail: bytes, flags: int) -> None:
    payload = struct.pack("<I", flags) + b"\x00" + struct.pack("<i", len(tail) + 4) + tail
    for candidate in (payload, payload[:5] + tail):
        raw = struct.pack("<iiii", 16 + len(candidate), 3, 0, 2013) + candidate
        assert peek_request(raw) == _expected(raw)
        assert peek_request(raw) == _expected(raw)
