import contextlib
import struct
import sys
import zlib
from collections.abc import Callable

import bson
import pytest
import snappy
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo import compression_support
from pymongo import message as pymongo_message

from proxy.wire import (
    MAX_MESSAGE_SIZE,
    SUPPORTED_COMPRESSORS,
    Compressed,
    Compressor,
    LocalProtocolError,
    MsgHeader,
    OpMsg,
    ProtocolError,
    RemoteProtocolError,
    compress,
    compressor_by_name,
    decode_compressed,
    decode_op_msg,
    decompress,
    encode_op_msg,
    parse_header,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

IDS = [Compressor.NOOP, Compressor.SNAPPY, Compressor.ZLIB, Compressor.ZSTD]
INNER = encode_op_msg(OpMsg(0, bson.encode({"find": "coll", "filter": {"a": "b" * 50}})), 7, 3)


def _decompress(raw: bytes, max_message_size: int = MAX_MESSAGE_SIZE) -> tuple[MsgHeader, bytes]:
    return decompress(parse_header(raw), raw[16:], max_message_size)


def _wrap(compressor: int, size: int, data: bytes, op_code: int = 2013) -> bytes:
    payload = struct.pack("<iiB", op_code, size, compressor) + data
    return MsgHeader(16 + len(payload), 11, 12, 2012).encode() + payload


def test_names() -> None:
    assert SUPPORTED_COMPRESSORS == ("snappy", "zlib", "zstd")
    assert [compressor_by_name(n) for n in ("noop", *SUPPORTED_COMPRESSORS)] == IDS
    with pytest.raises(LocalProtocolError, match="unknown compressor name 'lz4'"):
        compressor_by_name("lz4")


@pytest.mark.parametrize("compressor", IDS)
def test_round_trip_restores_the_inner_message(compressor: int) -> None:
    raw = compress(2013, INNER[16:], compressor, 7, 3)
    header = parse_header(raw)
    assert (header.op_code, header.request_id, header.response_to) == (2012, 7, 3)
    assert header.message_length == len(raw)
    fields = decode_compressed(raw[16:])
    assert fields == Compressed(2013, len(INNER) - 16, compressor, raw[25:])
    inner_header, inner_payload = decompress(header, raw[16:])
    assert inner_header.encode() + inner_payload == INNER
    assert decode_op_msg(inner_header, inner_payload).body == bson.encode(
        {"find": "coll", "filter": {"a": "b" * 50}}
    )


@pytest.mark.parametrize("compressor", [Compressor.ZLIB, Compressor.ZSTD])
def test_level(compressor: int) -> None:
    raw = compress(2013, INNER[16:], compressor, 1, 0, level=1)
    assert _decompress(raw)[1] == INNER[16:]


def test_bad_level_is_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="level 42"):
        compress(2013, b"x", Compressor.ZLIB, 1, 0, level=42)


@pytest.mark.parametrize(
    "ctx",
    [
        compression_support.SnappyContext(),
        compression_support.ZlibContext(-1),
        compression_support.ZstdContext(),
    ],
)
def test_pymongo_compressed_messages_decompress(ctx: object) -> None:
    request_id, raw, _, _ = pymongo_message._op_msg(
        0,
        {"ping": 1},
        "admin",
        None,
        DEFAULT_CODEC_OPTIONS,
        ctx,  # type: ignore[arg-type]
    )
    inner_header, payload = _decompress(raw)
    assert inner_header.request_id == request_id
    msg = decode_op_msg(inner_header, payload)
    assert bson.decode(msg.body) == {"ping": 1, "$db": "admin"}


@pytest.mark.parametrize("compressor", [Compressor.SNAPPY, Compressor.ZLIB, Compressor.ZSTD])
def test_pymongo_decompresses_ours(compressor: int) -> None:
    raw = compress(2013, INNER[16:], compressor, 1, 0)
    data = raw[16 + 9 :]
    assert compression_support.decompress(data, compressor, MAX_MESSAGE_SIZE) == INNER[16:]


def test_unknown_compressor() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown compressorId 4"):
        _decompress(_wrap(4, 3, b"abc"))
    with pytest.raises(LocalProtocolError, match="unknown compressorId 9"):
        compress(2013, b"abc", 9, 1, 0)


def test_nested_compression_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="wraps another OP_COMPRESSED"):
        _decompress(_wrap(0, 3, b"abc", op_code=2012))
    with pytest.raises(LocalProtocolError, match="again"):
        compress(2012, b"abc", 0, 1, 0)


def test_not_compressed_header() -> None:
    with pytest.raises(LocalProtocolError, match="not OP_COMPRESSED"):
        decompress(MsgHeader(30, 1, 0, 2013), bytes(14))


def test_short_prefix() -> None:
    with pytest.raises(RemoteProtocolError, match="9-byte prefix"):
        decompress(MsgHeader(24, 1, 0, 2012), bytes(8))


@pytest.mark.parametrize("size", [-1, MAX_MESSAGE_SIZE - 15, 2**31 - 1])
def test_declared_size_out_of_bounds(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match="out of bounds"):
        _decompress(_wrap(Compressor.ZLIB, size, zlib.compress(b"x")))


@pytest.mark.parametrize(
    ("compressor", "data"),
    [
        (Compressor.NOOP, bytes(1000)),
        (Compressor.SNAPPY, snappy.compress(bytes(1000))),
        (Compressor.ZLIB, zlib.compress(bytes(1000))),
        (Compressor.ZSTD, zstd.compress(bytes(1000))),
    ],
)
def test_size_lies_are_refused(compressor: int, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"declares|more than the declared"):
        _decompress(_wrap(compressor, 999, data))
    with pytest.raises(RemoteProtocolError, match="declares 1001 bytes uncompressed, got 1000"):
        _decompress(_wrap(compressor, 1001, data))


@pytest.mark.parametrize(
    ("compressor", "compress_fn"),
    [
        (Compressor.ZLIB, zlib.compress),
        (Compressor.ZSTD, zstd.compress),
        (Compressor.SNAPPY, snappy.compress),
    ],
)
def test_decompression_bomb(compressor: int, compress_fn: Callable[[bytes], bytes]) -> None:
    # 60 MB of zeros in a small message: claiming to expand to 100 bytes is a
    # lie caught after 101 bytes; claiming the real size is over the limit.
    bomb = compress_fn(bytes(60_000_000))
    assert len(bomb) < 3_000_000
    with pytest.raises(RemoteProtocolError, match="more than the declared 100 bytes"):
        _decompress(_wrap(compressor, 100, bomb))
    with pytest.raises(RemoteProtocolError, match="out of bounds"):
        _decompress(_wrap(compressor, 60_000_000, bomb))


@pytest.mark.parametrize("compressor", [Compressor.SNAPPY, Compressor.ZLIB, Compressor.ZSTD])
def test_corrupt_and_truncated_data(compressor: int) -> None:
    raw = compress(2013, INNER[16:], compressor, 1, 0)
    size = len(INNER) - 16
    data = raw[25:]
    with pytest.raises(RemoteProtocolError, match=r"corrupt|truncated|declare|preamble"):
        _decompress(_wrap(compressor, size, data[: len(data) // 2]))
    with pytest.raises(RemoteProtocolError):
        _decompress(_wrap(compressor, size, b"\xff" * 20))


def test_trailing_garbage_after_zlib_stream() -> None:
    with pytest.raises(RemoteProtocolError, match="after the end"):
        _decompress(_wrap(Compressor.ZLIB, 3, zlib.compress(b"abc") + b"xx"))


def test_concatenated_zstd_frames() -> None:
    data = zstd.compress(b"abc") + zstd.compress(b"def")
    assert _decompress(_wrap(Compressor.ZSTD, 6, data))[1] == b"abcdef"
    with pytest.raises(RemoteProtocolError, match="more than the declared 5"):
        _decompress(_wrap(Compressor.ZSTD, 5, data))


def test_empty_payload() -> None:
    for compressor in IDS:
        assert _decompress(compress(2004, b"", compressor, 1, 0))[1] == b""


@settings(max_examples=50)
@given(st.sampled_from(IDS), st.integers(-(2**31), 2**31 - 1), st.binary(max_size=300))
def test_round_trip_any_payload(compressor: int, op_code: int, payload: bytes) -> None:
    if op_code == 2012:
        op_code = 2013
    raw = compress(op_code, payload, compressor, 5, 6)
    header, inner = _decompress(raw)
    assert header == MsgHeader(16 + len(payload), 5, 6, op_code)
    assert inner == payload


@settings(max_examples=200)
@given(st.sampled_from([*IDS, 4, 255]), st.integers(-5, 200), st.binary(max_size=60))
def test_arbitrary_compressed_data(compressor: int, size: int, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _decompress(_wrap(compressor, size, data), max_message_size=1000)
