"""What one connection may cost: the frame timeout (FramedStream, over memory streams and
a real socket pair), the receive buffer after a large frame, and --max-connections on a
real listener. Timeouts run on trio's autojump clock: no test waits in real time."""

from __future__ import annotations

import logging
import struct
import tracemalloc

import pytest
import trio
import trio.testing

from proxy.framed import FramedStream
from proxy.metrics import ProxyMetrics
from proxy.server import ProxyServer, RefusalLog
from proxy.upstream import UpstreamTarget
from proxy.wire.errors import RemoteProtocolError
from proxy.wire.framing import FrameReader
from tests.proxy.test_proxy_metrics import sample
from tests.proxy.wired_session import FakeUpstream, answer_ok, body_of, op_msg, services

PING = op_msg({"ping": 1, "$db": "admin"}, request_id=7)


async def test_a_frame_not_completed_in_time_is_a_protocol_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer, proxy_end = trio.testing.memory_stream_pair()
    framed = FramedStream(proxy_end, frame_timeout=30.0)
    await peer.send_all(PING[:10])
    with pytest.raises(RemoteProtocolError, match=r"within 30 s \(10 bytes .*--frame-timeout"):
        await framed.receive_frame()


async def test_a_frame_trickled_within_the_timeout_and_idle_time_between_frames_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer, proxy_end = trio.testing.memory_stream_pair()
    framed = FramedStream(proxy_end, frame_timeout=30.0)

    async def client() -> None:
        for _ in range(2):
            await trio.sleep(3600)  # idle between frames: far past the timeout
            for offset in range(0, len(PING), 8):  # the frame: within it
                await peer.send_all(PING[offset : offset + 8])
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        for _ in range(2):
            frame = await framed.receive_frame()
            assert frame is not None and frame.raw == PING


async def test_the_timeout_holds_on_a_plain_socket_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # trio.SocketStream takes FramedStream's direct path (raw recv, wait_readable).
    left, right = trio.socket.socketpair()
    peer, framed = trio.SocketStream(left), FramedStream(trio.SocketStream(right), 5.0)
    async with peer, framed.stream:
        await peer.send_all(PING)
        await trio.sleep(60)  # idle before and after a whole frame is fine
        assert (await framed.receive_frame()) is not None
        await peer.send_all(PING[:3])
        with pytest.raises(RemoteProtocolError, match=r"within 5 s \(3 bytes"):
            await framed.receive_frame()


def test_the_receive_buffer_lets_go_of_a_large_frame() -> None:
    """A connection that waits for the rest of a frame after a large one holds the few
    bytes it has, not the large frame's allocation."""
    size = 8_000_000
    large = struct.pack("<iiii", size, 1, 0, 2013) + bytes(size - 16)
    reader = FrameReader()
    tracemalloc.start()
    try:
        for offset in range(0, size, 65_536):
            reader.feed(large[offset : offset + 65_536])
        reader.feed(PING[:2])  # the next frame has begun
        frame = reader.next_frame()
        assert frame is not None and len(frame.raw) == size
        del frame
        assert reader.next_frame() is None
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.buffered == 2
    assert held < 100_000


async def _answering_upstream(stream: trio.SocketStream) -> None:
    await FakeUpstream(FramedStream(stream), answer_ok).run()


async def _ping(stream: trio.SocketStream) -> None:
    framed = FramedStream(stream)
    await framed.send(PING)
    reply = await framed.receive_frame()
    assert reply is not None and body_of(reply) == {"ok": 1.0, "answered": "ping"}


async def test_connections_past_the_limit_are_closed_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.server")
    metrics = ProxyMetrics()
    served = services(metrics=metrics)
    (upstream_listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    upstream_port = upstream_listener.socket.getsockname()[1]
    served.upstream = UpstreamTarget.from_uri(f"mongodb://127.0.0.1:{upstream_port}")
    server = ProxyServer(served, "127.0.0.1", 0, max_connections=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _answering_upstream, [upstream_listener])
        ((host, port),) = await nursery.start(server.run)
        within = [await trio.open_tcp_stream(host, port) for _ in range(2)]
        for stream in within:
            await _ping(stream)
        for _ in range(3):
            refused = await trio.open_tcp_stream(host, port)
            assert await refused.receive_some(1) == b""  # closed at once
            await refused.aclose()
        assert sample(metrics, "modelgate_connections_refused_total", reason="max_connections") == 3
        assert sample(metrics, "modelgate_connections_open") == 2
        for stream in within:  # the connections within the limit are still served
            await _ping(stream)
        await within[0].aclose()
        while sample(metrics, "modelgate_connections_open") > 1:
            await trio.sleep(0.01)
        # The place a closed connection freed is taken by the next one.
        again = await trio.open_tcp_stream(host, port)
        await _ping(again)
        assert sample(metrics, "modelgate_connections_refused_total", reason="max_connections") == 3
        for stream in (within[1], again):
            await stream.aclose()
        nursery.cancel_scope.cancel()
    refusal_lines = [r for r in caplog.records if "--max-connections" in r.getMessage()]
    assert len(refusal_lines) == 1  # three refusals in a burst: one line


async def test_refusals_are_logged_once_per_interval_with_the_count_since(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.server")
    refusals = RefusalLog(interval=10.0)
    for _ in range(500):
        refusals.refused(100)
    await trio.sleep(10)
    refusals.refused(100)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "1 refused since" in messages[0]
    assert "500 refused since" in messages[1]
