"""Split a byte stream into wire protocol messages, without doing any I/O.

The server feeds whatever the socket returned; ``next_frame`` hands back each
complete message. A frame's length is checked as soon as its first four bytes
arrive, so an oversized or impossible length is refused before its body is
buffered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .header import HEADER_SIZE, MAX_MESSAGE_SIZE, MsgHeader, check_message_length, parse_header

__all__ = ["Frame", "FrameReader"]

_LENGTH = struct.Struct("<i")


@dataclass(frozen=True)
class Frame:
    """One whole message, exactly as received, and its parsed header.

    Most frames are forwarded untouched, so the bytes after the header (`payload`) are
    only copied out of `raw` for frames that are looked into (once each: a property,
    as functools.cached_property takes a lock on every first access)."""

    header: MsgHeader
    raw: bytes

    @property
    def payload(self) -> bytes:
        return self.raw[HEADER_SIZE:]

    def to_bytes(self) -> bytes:
        return self.raw


class FrameReader:
    """Incremental buffer: ``feed`` bytes in, take whole frames out with ``next_frame``."""

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        # Bytes before _start are consumed; compacting lazily keeps many small
        # frames in one feed from costing a memmove each.
        self._start = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (non-zero at EOF: truncated)."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start >= len(self._buffer) // 2:
            self._compact()
        self._buffer += data

    def _compact(self) -> None:
        # Deleting the consumed bytes also gives back the buffer's memory once they were
        # most of it (CPython shrinks a bytearray under half its allocation).
        del self._buffer[: self._start]
        self._start = 0

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None until more bytes are fed.

        Raises RemoteProtocolError as soon as a length prefix is out of bounds;
        the stream cannot be resynchronised after that.
        """
        start = self._start
        available = len(self._buffer) - start
        if available >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, start)
            check_message_length(length, self._max_message_size)
            if available >= length:
                return self._take_frame(start, length)
        # Waiting for the rest of a frame: keep only its bytes, not the large frame that
        # may have preceded it (a connection may wait here a while).
        if start:
            self._compact()
        return None

    def _take_frame(self, start: int, length: int) -> Frame:
        header = parse_header(self._buffer[start : start + HEADER_SIZE], self._max_message_size)
        if start == 0 and length == len(self._buffer):
            # The common case, one whole frame per read: no views to set up.
            raw = bytes(self._buffer)
        else:
            with memoryview(self._buffer) as view, view[start : start + length] as message:
                raw = bytes(message)  # the one copy of a possibly 48 MB message
        self._start = start + length
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        return Frame(header, raw)
