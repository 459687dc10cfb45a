"""A trio byte stream that speaks in whole wire-protocol frames."""

from __future__ import annotations

import math
import socket
import struct

import trio

from proxy.wire.errors import RemoteProtocolError
from proxy.wire.framing import Frame, FrameReader, new_frame
from proxy.wire.header import HEADER_SIZE, MAX_MESSAGE_SIZE, unpack_header

__all__ = ["FramedStream"]

_RECEIVE_CHUNK = 64 * 1024
# The fast path below skips trio's checkpoints while data flows; a checkpoint every so
# many frames received keeps one busy connection from starving the others (as the
# forwarder of `bench wire` does: every task of a session receives before it sends).
_CHECKPOINT_EVERY = 16
_LENGTH = struct.Struct("<i")


class FramedStream:
    """Whole frames in, raw bytes out. Sends are serialised with a lock because two
    tasks of a session may answer the same client (the reply pump and a local command).

    With a `frame_timeout` (a client's stream), a frame must be complete within that many
    seconds of the proxy starting to read it: a peer that trickles a frame a byte at a
    time would otherwise hold its connection, buffers and upstream connection forever.
    Waiting between frames is never limited (drivers keep idle pooled connections).

    On plain TCP the socket is read and written directly when it is ready, and trio is
    asked to wait only when it is not: a proxy round trip is then two scheduler passes
    instead of about ten (trio's stream API checkpoints before and after every call)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        frame_timeout: float = math.inf,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self.stream = stream
        self.frame_timeout = frame_timeout
        self._reader = FrameReader(max_message_size)
        self._max = max_message_size
        self._send_lock = trio.Lock()
        # Sends that take the lock, waiting for it or holding it: while there is one, a
        # new send must queue behind it.
        self._locked_sends = 0
        self._raw: socket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            self._raw = stream.socket._sock  # type: ignore[attr-defined]
        self._frames_unchecked = 0
        self._wait_first = False

    async def receive_frame(self) -> Frame | None:
        """The next frame, or None when the peer closed cleanly between frames.

        A peer that closes in the middle of a frame, or does not complete it within
        `frame_timeout`, is a protocol error."""
        raw = await self.receive_message()
        return None if raw is None else new_frame((unpack_header(raw), raw))

    async def receive_message(self) -> bytes | None:
        """`receive_frame`'s frame as its bytes only (header included), its length
        checked: the session's hot path reads from them only what it needs."""
        reader = self._reader
        sock = self._raw
        if sock is not None and not reader.buffered:
            # Between frames with nothing buffered (nearly always): _receive_some's wait
            # with no deadline, inlined, as it is a coroutine call per frame. When the
            # last frame had to be waited for (request and reply take turns), the socket
            # is waited for first: a recv that finds nothing raises, which costs as much
            # as the rest of a frame's work.
            message: bytes | None
            if self._wait_first:
                await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    first: bytes = sock.recv(_RECEIVE_CHUNK)
                    break
                except BlockingIOError:
                    self._wait_first = True
                    await trio.lowlevel.wait_readable(sock)
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
            if not first:
                return None
            # One recv, one whole frame (the common case): the message is these bytes.
            size = len(first)
            message = first
            if size < HEADER_SIZE or _LENGTH.unpack_from(first)[0] != size or size > self._max:
                # Part of a frame, or more than one (then the data comes faster than it
                # is read: a recv first finds more).
                self._wait_first = False
                reader.feed(first)
                message = await self._rest_of_frame(reader)
        else:
            message = await self._rest_of_frame(reader)
        if message is None:
            return None
        self._frames_unchecked += 1
        if self._frames_unchecked >= _CHECKPOINT_EVERY:
            self._frames_unchecked = 0
            await trio.lowlevel.checkpoint()
        return message

    async def _rest_of_frame(self, reader: FrameReader) -> bytes | None:
        deadline = math.inf
        while True:
            if reader.buffered:
                frame = reader.next_frame()
                if frame is not None:
                    return frame.raw
                if deadline == math.inf:
                    deadline = trio.current_time() + self.frame_timeout
            data = await self._receive_some(deadline)
            if not data:
                if reader.buffered:
                    raise RemoteProtocolError(
                        f"connection closed in the middle of a frame "
                        f"({reader.buffered} bytes of it received)"
                    )
                return None
            reader.feed(data)

    async def _receive_some(self, deadline: float) -> bytes | bytearray:
        raw = self._raw
        if raw is None:
            with trio.move_on_at(deadline):
                return await self.stream.receive_some(_RECEIVE_CHUNK)
            raise self._frame_timed_out()
        while True:
            try:
                data: bytes = raw.recv(_RECEIVE_CHUNK)
                return data
            except BlockingIOError:
                # A cancel scope only where a frame has begun: the wait between frames,
                # the common one, stays as cheap as it was.
                if deadline == math.inf:
                    await trio.lowlevel.wait_readable(raw)
                    continue
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(raw)
                    continue
                raise self._frame_timed_out() from None
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    def _frame_timed_out(self) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"frame not completed within {self.frame_timeout:g} s "
            f"({self._reader.buffered} bytes of it received; --frame-timeout)"
        )

    async def send(self, data: bytes) -> None:
        raw = self._raw
        unsent: bytes | memoryview = data
        if raw is not None and not self._locked_sends:
            # Nothing else is sending: the socket takes the whole message at once nearly
            # always, with no lock and no scheduler pass. Only a send that must wait for
            # the socket takes the lock (before it can yield), so messages never interleave.
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if sent == len(data):
                return
            unsent = memoryview(data)[sent:]
        self._locked_sends += 1
        try:
            # Uncontended (nearly always) the lock is taken without a scheduler pass.
            try:
                self._send_lock.acquire_nowait()
            except trio.WouldBlock:
                await self._send_lock.acquire()
            try:
                if raw is None:
                    await self.stream.send_all(unsent)
                else:
                    await self._send_raw(raw, unsent)
            finally:
                self._send_lock.release()
        finally:
            self._locked_sends -= 1

    async def _send_raw(self, raw: socket.socket, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = raw.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(raw)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)
