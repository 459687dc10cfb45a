"""A trio byte stream that speaks in whole wire-protocol frames."""

from __future__ import annotations

import trio

from proxy.wire.errors import RemoteProtocolError
from proxy.wire.framing import Frame, FrameReader

__all__ = ["FramedStream"]

_RECEIVE_CHUNK = 256 * 1024


class FramedStream:
    """Whole frames in, raw bytes out. Sends are serialised with a lock because two
    tasks of a session may answer the same client (the reply pump and a local command)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._reader = FrameReader()
        self._send_lock = trio.Lock()

    async def receive_frame(self) -> Frame | None:
        """The next frame, or None when the peer closed cleanly between frames.

        A peer that closes in the middle of a frame is a protocol error."""
        while True:
            frame = self._reader.next_frame()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(_RECEIVE_CHUNK)
            if not data:
                if self._reader.buffered:
                    raise RemoteProtocolError(
                        f"connection closed in the middle of a frame "
                        f"({self._reader.buffered} bytes of it received)"
                    )
                return None
            self._reader.feed(data)

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)
