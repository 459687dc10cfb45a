"""OP_COMPRESSED (2012): one wire message compressed with noop, snappy, zlib or zstd.

Layout after the header: originalOpcode int32, uncompressedSize int32,
compressorId uint8, compressedMessage. The declared size is checked against
the message size limit before anything is decompressed, and decompression
stops one byte past it, so a small message cannot expand into a huge one.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import snappy

from .errors import LocalProtocolError, RemoteProtocolError
from .header import HEADER_SIZE, MAX_MESSAGE_SIZE, MsgHeader, OpCode

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

__all__ = [
    "SUPPORTED_COMPRESSORS",
    "Compressed",
    "Compressor",
    "compress",
    "compressor_by_name",
    "decode_compressed",
    "decompress",
]


class Compressor(IntEnum):
    NOOP = 0
    SNAPPY = 1
    ZLIB = 2
    ZSTD = 3


# The names negotiated in hello's ``compression`` field. noop (id 0) is never
# negotiated, but messages that use it are always accepted.
SUPPORTED_COMPRESSORS: tuple[str, ...] = ("snappy", "zlib", "zstd")

_PREFIX = struct.Struct("<iiB")


def compressor_by_name(name: str) -> Compressor:
    """The compressor for a name ("noop", "snappy", "zlib", "zstd"), as hello negotiates them."""
    try:
        return Compressor[name.upper()]
    except KeyError:
        raise LocalProtocolError(f"unknown compressor name {name!r}") from None


@dataclass(frozen=True)
class Compressed:
    original_op_code: int
    uncompressed_size: int
    compressor_id: int
    data: bytes


def decode_compressed(payload: bytes) -> Compressed:
    """Split the bytes after an OP_COMPRESSED header into its fields (no decompression)."""
    if len(payload) < _PREFIX.size:
        raise RemoteProtocolError(
            f"OP_COMPRESSED of {len(payload)} bytes is shorter than its {_PREFIX.size}-byte prefix"
        )
    op_code, size, compressor = _PREFIX.unpack_from(payload, 0)
    return Compressed(op_code, size, compressor, payload[_PREFIX.size :])


def decompress(
    header: MsgHeader, payload: bytes, max_message_size: int = MAX_MESSAGE_SIZE
) -> tuple[MsgHeader, bytes]:
    """Return the inner message's header and payload from an OP_COMPRESSED message."""
    if header.op_code != OpCode.OP_COMPRESSED:
        raise LocalProtocolError(f"decompress() given opcode {header.op_code}, not OP_COMPRESSED")
    compressed = decode_compressed(payload)
    size = compressed.uncompressed_size
    if compressed.original_op_code == OpCode.OP_COMPRESSED:
        raise RemoteProtocolError("OP_COMPRESSED wraps another OP_COMPRESSED")
    if size < 0 or HEADER_SIZE + size > max_message_size:
        raise RemoteProtocolError(
            f"OP_COMPRESSED uncompressedSize {size} is out of bounds "
            f"(maximum message size {max_message_size})"
        )
    inner = _DECOMPRESSORS.get(compressed.compressor_id)
    if inner is None:
        raise RemoteProtocolError(
            f"OP_COMPRESSED has unknown compressorId {compressed.compressor_id}"
        )
    name = Compressor(compressed.compressor_id).name.lower()
    result = inner(compressed.data, size, name)
    if len(result) != size:
        raise RemoteProtocolError(
            f"OP_COMPRESSED ({name}) declares {size} bytes uncompressed, got {len(result)}"
        )
    inner_header = MsgHeader(
        HEADER_SIZE + size, header.request_id, header.response_to, compressed.original_op_code
    )
    return inner_header, result


def _too_big(name: str, size: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"OP_COMPRESSED ({name}) decompresses to more than the declared {size} bytes"
    )


def _corrupt(name: str, exc: Exception) -> RemoteProtocolError:
    return RemoteProtocolError(f"OP_COMPRESSED ({name}) data is corrupt: {exc}")


def _check_stream_end(name: str, size: int, produced: int, ended: bool) -> None:
    """A streaming decompressor's output: within the declared size, and complete."""
    if produced > size:
        raise _too_big(name, size)
    if not ended:
        raise RemoteProtocolError(f"OP_COMPRESSED ({name}) stream is truncated")


def _noop(data: bytes, size: int, name: str) -> bytes:
    return data


def _snappy(data: bytes, size: int, name: str) -> bytes:
    # Raw snappy starts with the uncompressed length as a varint: check it
    # before letting the library allocate anything.
    declared = 0
    for shift, byte in zip(range(0, 35, 7), data, strict=False):
        declared |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise RemoteProtocolError(f"OP_COMPRESSED ({name}) has a malformed length preamble")
    if declared > size:
        raise _too_big(name, size)
    try:
        return bytes(snappy.decompress(data))
    except snappy.UncompressError as exc:
        raise _corrupt(name, exc) from None


def _zlib(data: bytes, size: int, name: str) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        # max_length=0 would mean "no limit", hence size + 1 (which also detects a lie).
        result = decompressor.decompress(data, size + 1)
    except zlib.error as exc:
        raise _corrupt(name, exc) from None
    _check_stream_end(name, size, len(result), decompressor.eof)
    if decompressor.unused_data:
        raise RemoteProtocolError(f"OP_COMPRESSED ({name}) has bytes after the end of the stream")
    return result


def _zstd(data: bytes, size: int, name: str) -> bytes:
    result = bytearray()
    rest = data
    # The message may hold several concatenated frames; the budget spans them all.
    while True:
        decompressor = zstd.ZstdDecompressor()
        try:
            result += decompressor.decompress(rest, size + 1 - len(result))
        except zstd.ZstdError as exc:
            raise _corrupt(name, exc) from None
        _check_stream_end(name, size, len(result), decompressor.eof)
        rest = decompressor.unused_data
        if not rest:
            return bytes(result)


_DECOMPRESSORS: dict[int, Callable[[bytes, int, str], bytes]] = {
    Compressor.NOOP: _noop,
    Compressor.SNAPPY: _snappy,
    Compressor.ZLIB: _zlib,
    Compressor.ZSTD: _zstd,
}


def compress(
    op_code: int,
    payload: bytes,
    compressor_id: int,
    request_id: int,
    response_to: int,
    level: int | None = None,
) -> bytes:
    """The whole OP_COMPRESSED message wrapping ``payload`` (the bytes after its header).

    ``level`` applies to zlib (-1 to 9) and zstd; snappy and noop ignore it.
    """
    if op_code == OpCode.OP_COMPRESSED:
        raise LocalProtocolError("cannot compress an OP_COMPRESSED message again")
    if not -(2**31) <= op_code < 2**31:
        raise LocalProtocolError(f"opcode {op_code} does not fit in an int32")
    if compressor_id == Compressor.NOOP:
        data = payload
    elif compressor_id == Compressor.SNAPPY:
        data = bytes(snappy.compress(payload))
    elif compressor_id == Compressor.ZLIB:
        try:
            data = zlib.compress(payload, -1 if level is None else level)
        except zlib.error as exc:
            raise LocalProtocolError(f"zlib cannot compress at level {level}: {exc}") from None
    elif compressor_id == Compressor.ZSTD:
        try:
            data = zstd.compress(payload, level)
        except (zstd.ZstdError, ValueError) as exc:
            raise LocalProtocolError(f"zstd cannot compress at level {level}: {exc}") from None
    else:
        raise LocalProtocolError(f"unknown compressorId {compressor_id}")
    prefix = _PREFIX.pack(op_code, len(payload), compressor_id)
    length = HEADER_SIZE + len(prefix) + len(data)
    header = MsgHeader(length, request_id, response_to, OpCode.OP_COMPRESSED).encode()
    return header + prefix + data
