"""The MongoDB wire protocol as pure functions over bytes: no I/O, no trio, no clock."""

from .checksum import crc32c
from .compression import (
    SUPPORTED_COMPRESSORS,
    Compressed,
    Compressor,
    compress,
    compressor_by_name,
    decode_compressed,
    decompress,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import Frame, FrameReader
from .header import HEADER_SIZE, MAX_MESSAGE_SIZE, MsgHeader, OpCode, parse_header, unpack_header
from .opmsg import (
    BODY_OFFSET,
    CHECKSUM_PRESENT,
    EXHAUST_ALLOWED,
    MORE_TO_COME,
    DocumentSequence,
    OpMsg,
    command_name,
    decode_op_msg,
    encode_op_msg,
    peek_command,
    peek_request,
)
from .opquery import (
    OpQuery,
    OpReply,
    decode_op_query,
    decode_op_reply,
    encode_op_query,
    encode_op_reply,
)

__all__ = [
    "BODY_OFFSET",
    "CHECKSUM_PRESENT",
    "EXHAUST_ALLOWED",
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MORE_TO_COME",
    "SUPPORTED_COMPRESSORS",
    "Compressed",
    "Compressor",
    "DocumentSequence",
    "Frame",
    "FrameReader",
    "LocalProtocolError",
    "MsgHeader",
    "OpCode",
    "OpMsg",
    "OpQuery",
    "OpReply",
    "ProtocolError",
    "RemoteProtocolError",
    "command_name",
    "compress",
    "compressor_by_name",
    "crc32c",
    "decode_compressed",
    "decode_op_msg",
    "decode_op_query",
    "decode_op_reply",
    "decompress",
    "encode_op_msg",
    "encode_op_query",
    "encode_op_reply",
    "parse_header",
    "peek_command",
    "peek_request",
    "unpack_header",
]
