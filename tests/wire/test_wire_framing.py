import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import (
    MAX_MESSAGE_SIZE,
    Frame,
    FrameReader,
    MsgHeader,
    ProtocolError,
    RemoteProtocolError,
)


def _message(request_id: int, payload: bytes, op_code: int = 2013) -> bytes:
    return MsgHeader(16 + len(payload), request_id, 0, op_code).encode() + payload


FIRST = _message(1, b"\x00\x00\x00\x00first frame body")
SECOND = _message(2, b"", op_code=9999)  # header-only frame with an unknown opcode
THIRD = _message(3, b"the third frame is never completed")


def _drain(reader: FrameReader) -> list[Frame]:
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_whole_input_with_trailing_partial_frame() -> None:
    reader = FrameReader()
    reader.feed(FIRST + SECOND + THIRD[:20])
    frames = _drain(reader)
    assert [f.to_bytes() for f in frames] == [FIRST, SECOND]
    assert frames[0].header == MsgHeader(len(FIRST), 1, 0, 2013)
    assert frames[0].payload == FIRST[16:]
    assert frames[1].header.op_code == 9999
    assert frames[1].payload == b""
    assert reader.buffered == 20
    reader.feed(THIRD[20:])
    assert reader.next_frame() == Frame(MsgHeader(len(THIRD), 3, 0, 2013), THIRD)
    assert reader.buffered == 0


def test_byte_by_byte() -> None:
    reader = FrameReader()
    stream = FIRST + SECOND + THIRD[:-1]
    frames = []
    for index in range(len(stream)):
        reader.feed(stream[index : index + 1])
        frames += _drain(reader)
    assert [f.to_bytes() for f in frames] == [FIRST, SECOND]
    assert reader.buffered == len(THIRD) - 1


@given(st.lists(st.integers(0, 200), max_size=10))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    stream = FIRST + SECOND + THIRD + FIRST
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = FrameReader()
    frames = []
    for start, stop in itertools.pairwise(bounds):
        reader.feed(stream[start:stop])
        frames += _drain(reader)
    assert b"".join(f.to_bytes() for f in frames) == stream
    assert reader.buffered == 0


def test_oversized_length_raises_before_the_body_arrives() -> None:
    reader = FrameReader()
    reader.feed(struct.pack("<i", MAX_MESSAGE_SIZE + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum message size 48000000"):
        reader.next_frame()


def test_custom_maximum() -> None:
    reader = FrameReader(max_message_size=len(FIRST) - 1)
    reader.feed(FIRST[:4])
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        reader.next_frame()


@pytest.mark.parametrize("length", [-5, 0, 15])
def test_length_below_header_size_raises(length: int) -> None:
    reader = FrameReader()
    reader.feed(struct.pack("<i", length))
    with pytest.raises(RemoteProtocolError, match="shorter than the 16-byte header"):
        reader.next_frame()


def test_waits_for_four_bytes_before_judging_length() -> None:
    reader = FrameReader()
    reader.feed(b"\xff\xff\xff")
    assert reader.next_frame() is None
    assert reader.buffered == 3


def test_many_small_frames_in_one_feed() -> None:
    reader = FrameReader()
    messages = [_message(i, bytes([i % 256]) * (i % 7)) for i in range(2000)]
    reader.feed(b"".join(messages))
    assert [f.to_bytes() for f in _drain(reader)] == messages
    assert reader.buffered == 0


def test_large_frame_fed_in_small_chunks() -> None:
    big = _message(5, bytes(4_000_000))
    reader = FrameReader()
    for start in range(0, len(big), 4096):
        reader.feed(big[start : start + 4096])
        if start + 4096 < len(big):
            assert reader.next_frame() is None
    frame = reader.next_frame()
    assert frame is not None
    assert frame.to_bytes() == big


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_arbitrary_bytes(chunks: list[bytes]) -> None:
    reader = FrameReader(max_message_size=1000)
    try:
        for chunk in chunks:
            reader.feed(chunk)
            _drain(reader)
    except ProtocolError:
        return


def test_a_whole_frame_fed_as_bytes_comes_back_without_a_copy() -> None:
    reader = FrameReader()
    reader.feed(FIRST)
    assert reader.buffered == len(FIRST)
    frame = reader.next_frame()
    assert frame is not None and frame.raw is FIRST
    assert reader.buffered == 0
    assert reader.next_frame() is None


def test_bytes_fed_twice_before_reading_keep_their_order() -> None:
    reader = FrameReader()
    reader.feed(FIRST[:10])
    reader.feed(FIRST[10:] + SECOND[:3])
    assert reader.buffered == len(FIRST) + 3
    assert _drain(reader) == [Frame(MsgHeader(len(FIRST), 1, 0, 2013), FIRST)]
    reader.feed(SECOND[3:])
    assert [f.raw for f in _drain(reader)] == [SECOND]


def test_oversized_length_in_a_whole_feed_is_refused() -> None:
    reader = FrameReader(max_message_size=100)
    reader.feed(struct.pack("<iiii", 101, 1, 0, 2013))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        reader.next_frame()


def test_take_whole_returns_one_whole_frame_as_it_came() -> None:
    reader = FrameReader()
    frame = reader.take_whole(FIRST)
    assert frame == Frame(MsgHeader(len(FIRST), 1, 0, 2013), FIRST) and frame.raw is FIRST
    assert reader.buffered == 0
    assert reader.next_frame() is None


@pytest.mark.parametrize(
    "data",
    [FIRST[:10], FIRST + SECOND, FIRST + SECOND[:3], SECOND[:3]],
    ids=["part", "two", "one-and-a-part", "under-a-header"],
)
def test_take_whole_feeds_anything_else(data: bytes) -> None:
    reader = FrameReader()
    assert reader.take_whole(data) is None
    assert reader.buffered == len(data)
    expected = FrameReader()
    expected.feed(data)
    assert _drain(reader) == _drain(expected)


def test_take_whole_leaves_an_oversized_frame_to_next_frame() -> None:
    reader = FrameReader(max_message_size=100)
    data = _message(1, b"x" * 100)
    assert reader.take_whole(data) is None
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        reader.next_frame()
