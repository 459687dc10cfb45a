import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    LocalProtocolError,
    MsgHeader,
    OpCode,
    ProtocolError,
    RemoteProtocolError,
    parse_header,
)
from tests.wire.wire_strategies import int32s


def test_round_trip_known_opcode() -> None:
    header = MsgHeader(100, 7, 3, OpCode.OP_MSG)
    raw = header.encode()
    assert raw == struct.pack("<iiii", 100, 7, 3, 2013)
    assert parse_header(raw) == header


def test_unknown_opcode_stays_a_plain_int() -> None:
    header = parse_header(struct.pack("<iiii", 16, 1, 0, 4242))
    assert header.op_code == 4242
    assert header.encode() == struct.pack("<iiii", 16, 1, 0, 4242)


def test_extra_bytes_after_header_are_ignored() -> None:
    assert parse_header(MsgHeader(20, 1, 2, 1).encode() + b"abcd").message_length == 20


@pytest.mark.parametrize("length", [-1, 0, 15])
def test_length_shorter_than_header(length: int) -> None:
    with pytest.raises(RemoteProtocolError, match="shorter than the 16-byte header"):
        parse_header(struct.pack("<iiii", length, 1, 0, 2013))


def test_length_over_maximum() -> None:
    parse_header(struct.pack("<iiii", MAX_MESSAGE_SIZE, 1, 0, 2013))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum message size"):
        parse_header(struct.pack("<iiii", MAX_MESSAGE_SIZE + 1, 1, 0, 2013))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        parse_header(struct.pack("<iiii", 1000, 1, 0, 2013), max_message_size=999)


def test_truncated_header() -> None:
    with pytest.raises(RemoteProtocolError, match="needs 16 bytes, got 15"):
        parse_header(b"\x10" + b"\x00" * 14)


def test_encode_out_of_range_is_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="request_id"):
        MsgHeader(16, 2**31, 0, 1).encode()


@given(st.integers(HEADER_SIZE, MAX_MESSAGE_SIZE), int32s, int32s, int32s)
def test_round_trip(length: int, request_id: int, response_to: int, op_code: int) -> None:
    header = MsgHeader(length, request_id, response_to, op_code)
    assert parse_header(header.encode()) == header


@given(st.binary(max_size=40))
def test_arbitrary_bytes(data: bytes) -> None:
    try:
        header = parse_header(data)
    except ProtocolError:
        return
    assert header.encode() == data[:HEADER_SIZE]
