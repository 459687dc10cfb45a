"""MongoDB clients on bare sockets, for what drivers never do: hold hundreds of idle
connections cheaply (a pymongo client per connection would add its monitor threads and
sockets), and send a frame a byte at a time, as a slow or hostile peer does."""

from __future__ import annotations

import itertools
import socket
import struct

import bson

from proxy.wire.framing import FrameReader
from proxy.wire.opmsg import OpMsg, decode_op_msg, encode_op_msg

__all__ = ["SlowFrameSender", "open_pinged_connection", "ping", "ping_frame"]

_REQUEST_IDS = itertools.count(1)


def ping_frame() -> bytes:
    """A whole `ping` OP_MSG on the admin database."""
    body = bson.encode({"ping": 1, "$db": "admin"})
    return encode_op_msg(OpMsg(0, body), next(_REQUEST_IDS), 0)


def ping(sock: socket.socket) -> None:
    """One ping round trip; raises ConnectionError unless the reply says ok: 1."""
    sock.sendall(ping_frame())
    reader = FrameReader()
    while (frame := reader.next_frame()) is None:
        data = sock.recv(65_536)
        if not data:
            raise ConnectionError("the server closed the connection instead of answering")
        reader.feed(data)
    reply = bson.decode(decode_op_msg(frame.header, frame.payload).body)
    if reply.get("ok") != 1:
        raise ConnectionError(f"ping failed: {reply}")


def open_pinged_connection(address: tuple[str, int], timeout: float = 30.0) -> socket.socket:
    """A connection that has made one round trip (so the proxy has opened its upstream
    connection for it), left idle."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        ping(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


class SlowFrameSender:
    """A connection that sends a frame one byte per `step`: the frame declares 1 MB, so
    it is never complete however long the server waits. `closed` tells once the server
    has hung up on it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30.0)
        self._frame = struct.pack("<i", 1_000_000) + ping_frame()[4:]
        self._sent = 0
        self.closed = False

    def step(self) -> bool:
        """Send the next byte; False (and `closed`) once the server has closed."""
        if not self.closed:
            try:
                self.sock.send(self._frame[self._sent : self._sent + 1] or b"\0")
                self._sent += 1
                self.closed = _is_closed_by_peer(self.sock)
            except OSError:
                self.closed = True
        return not self.closed

    def close(self) -> None:
        self.sock.close()
