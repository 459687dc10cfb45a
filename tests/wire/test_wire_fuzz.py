"""Arbitrary bytes through the whole decoding path: parse, or ProtocolError, nothing else."""

import contextlib
import struct

import bson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import (
    FrameReader,
    MsgHeader,
    OpCode,
    OpMsg,
    ProtocolError,
    command_name,
    compress,
    decode_op_msg,
    decode_op_query,
    decode_op_reply,
    decompress,
    encode_op_msg,
)


def _decode_frame(header: MsgHeader, payload: bytes) -> None:
    if header.op_code == OpCode.OP_COMPRESSED:
        header, payload = decompress(header, payload, max_message_size=2000)
    if header.op_code == OpCode.OP_MSG:
        command_name(decode_op_msg(header, payload).body)
    elif header.op_code == OpCode.OP_QUERY:
        command_name(decode_op_query(payload).query)
    elif header.op_code == OpCode.OP_REPLY:
        decode_op_reply(payload)


_opcodes = st.sampled_from([1, 2004, 2012, 2013, 7])
_frames = st.builds(
    lambda op_code, request_id, payload: (
        MsgHeader(16 + len(payload), request_id, 0, op_code).encode() + payload
    ),
    _opcodes,
    st.integers(0, 100),
    st.binary(max_size=60),
)
_valid = st.builds(
    lambda compressor: compress(
        2013,
        encode_op_msg(OpMsg(0, bson.encode({"ping": 1})), 1, 0)[16:],
        compressor,
        1,
        0,
    ),
    st.sampled_from([0, 1, 2, 3]),
)


@settings(max_examples=200)
@given(st.lists(st.one_of(_frames, _valid, st.binary(max_size=30)), max_size=5), st.data())
def test_stream_of_arbitrary_frames(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    reader = FrameReader(max_message_size=2000)
    try:
        start = 0
        while start < len(stream):
            stop = start + data.draw(st.integers(1, 64))
            reader.feed(stream[start:stop])
            start = stop
            while (frame := reader.next_frame()) is not None:
                with contextlib.suppress(ProtocolError):
                    _decode_frame(frame.header, frame.payload)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.binary(min_size=16, max_size=80))
def test_arbitrary_header_and_payload(raw: bytes) -> None:
    header = MsgHeader(*struct.unpack_from("<iiii", raw))
    with contextlib.suppress(ProtocolError):
        _decode_frame(header, raw[16:])
