"""FramedStream's direct socket path: sends that never interleave although the free case
takes no lock, and frames received without waiting that still let other tasks run."""

from __future__ import annotations

import trio

from proxy.framed import FramedStream
from proxy.wire.framing import FrameReader
from tests.proxy.wired_session import op_msg


def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_concurrent_sends_that_fill_the_socket_arrive_whole() -> None:
    peer, framed_end = _socket_pair()
    async with peer, framed_end:
        await _send_two_large_messages_at_once(peer, FramedStream(framed_end))


async def _send_two_large_messages_at_once(peer: trio.SocketStream, framed: FramedStream) -> None:
    # Each message is larger than the socket buffers, so the first send must wait for
    # the peer to read, and the second comes while it waits.
    messages = [op_msg({"fill": bytes([n]) * 4_000_000}, request_id=n) for n in (1, 2)]
    reader = FrameReader()
    received = []
    async with trio.open_nursery() as nursery:
        for message in messages:
            nursery.start_soon(framed.send, message)
        while len(received) < len(messages):
            reader.feed(await peer.receive_some(1 << 20))
            while (frame := reader.next_frame()) is not None:
                received.append(frame.raw)
    assert sorted(received) == sorted(messages)


async def test_frames_received_in_one_read_let_other_tasks_run() -> None:
    peer, framed_end = _socket_pair()
    async with peer, framed_end:
        await _read_frames_beside_another_task(peer, FramedStream(framed_end))


async def _read_frames_beside_another_task(peer: trio.SocketStream, framed: FramedStream) -> None:
    frames = 200
    await peer.send_all(b"".join(op_msg({"ping": 1}, request_id=n) for n in range(frames)))
    read_when_other_ran: list[int] = []
    read = 0

    async def other_task() -> None:
        while read < frames:
            read_when_other_ran.append(read)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()  # the other task starts
        while read < frames:
            assert await framed.receive_frame() is not None
            read += 1
    # It ran between frames, not only once the connection had nothing left to read.
    assert any(0 < count < frames for count in read_when_other_ran)
