"""Split a byte stream into wire protocol messages, without doing any I/O.

The server feeds whatever the socket returned; ``next_frame`` hands back each
complete message. A frame's length is checked as soon as its first four bytes
arrive, so an oversized or impossible length is refused before its body is
buffered.
"""

from __future__ import annotations

import struct
from functools import partial
from typing import NamedTuple

from .header import HEADER_SIZE, MAX_MESSAGE_SIZE, MsgHeader, check_message_length, unpack_header

__all__ = ["Frame", "FrameReader", "new_frame"]

_LENGTH = struct.Struct("<i")


class Frame(NamedTuple):
    """One whole message, exactly as received, and its parsed header.

    Most frames are forwarded untouched, so the bytes after the header (`payload`) are
    only copied out of `raw` for frames that are looked into. A tuple, as MsgHeader is:
    one is built for every message in either direction."""

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
        # What was fed while nothing was buffered, kept as it came: when it is one
        # whole frame (one recv, one request: the common case) that frame is these very
        # bytes, with no copy into the buffer and out again.
        self._whole: bytes | None = None
        #: Bytes received but not yet returned as a frame (non-zero at EOF: truncated).
        #: A plain attribute, kept up to date: a stream reads it for every frame.
        self.buffered = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffered += len(data)
        if self._whole is not None:
            self._buffer += self._whole
            self._whole = None
        elif not self._buffer and type(data) is bytes:
            self._whole = data
            return
        if self._start and self._start >= len(self._buffer) // 2:
            self._compact()
        self._buffer += data

    def take_whole(self, data: bytes) -> Frame | None:
        """With nothing buffered: `data` itself as its frame when it is exactly one whole
        frame (one recv, one request: the common case), in one call where `feed` and
        `next_frame` are two; otherwise `data` is fed, and None."""
        if len(data) >= HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(data)
            if length == len(data) and length <= self._max_message_size:
                return _new_frame((unpack_header(data), data))
        self.feed(data)
        return None

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
        whole = self._whole
        if whole is not None:
            self._whole = None
            if len(whole) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(whole)
                if not HEADER_SIZE <= length <= self._max_message_size:
                    check_message_length(length, self._max_message_size)  # raises
                if length == len(whole):
                    self.buffered = 0
                    return _new_frame((unpack_header(whole), whole))
            self._buffer += whole  # part of a frame, or more than one: the general case
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
        header = unpack_header(self._buffer, start)  # its length was checked by next_frame
        if start == 0 and length == len(self._buffer):
            # The common case, one whole frame per read: no views to set up.
            raw = bytes(self._buffer)
        else:
            with memoryview(self._buffer) as view, view[start : start + length] as message:
                raw = bytes(message)  # the one copy of a possibly 48 MB message
        self._start = start + length
        self.buffered -= length
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        return _new_frame((header, raw))


# tuple.__new__ builds a Frame from its two fields with no Python-level call (which
# `Frame(header, raw)`, a NamedTuple's generated __new__, costs).
_new_frame = new_frame = partial(tuple.__new__, Frame)
