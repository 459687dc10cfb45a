"""A Session between two memory streams: the test plays the driver on one end and a fake
upstream answers frames on the other. No processes, no sockets."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import bson
import trio
import trio.testing

from proxy.framed import FramedStream
from proxy.metrics import ProxyMetrics
from proxy.session import CommandHandler, Session, SessionServices, WriteInterceptor
from proxy.upstream import UpstreamTarget
from proxy.wire.compression import decompress
from proxy.wire.framing import Frame
from proxy.wire.header import OpCode
from proxy.wire.opmsg import OpMsg, command_name, decode_op_msg, encode_op_msg

__all__ = [
    "FakeUpstream",
    "Responder",
    "Wired",
    "answer_ok",
    "body_of",
    "op_msg",
    "services",
    "upstream_reply",
    "wired_session",
]

# A fake upstream's answer to one request: the whole reply messages to send back.
Responder = Callable[[Frame], list[bytes]]

_UPSTREAM_IDS = itertools.count(10_000)


def op_msg(
    document: dict[str, Any], request_id: int, response_to: int = 0, flags: int = 0
) -> bytes:
    return encode_op_msg(OpMsg(flags, bson.encode(document)), request_id, response_to)


def upstream_reply(document: dict[str, Any], response_to: int, flags: int = 0) -> bytes:
    """A reply as the upstream sends it, with an id of the upstream's own."""
    return op_msg(document, next(_UPSTREAM_IDS), response_to, flags)


def body_of(frame: Frame) -> dict[str, Any]:
    """The body document of an OP_MSG frame (decompressed first if need be)."""
    header, payload = frame.header, frame.payload
    if header.op_code == OpCode.OP_COMPRESSED:
        header, payload = decompress(header, payload)
    return bson.decode(decode_op_msg(header, payload).body)


def answer_ok(frame: Frame) -> list[bytes]:
    """The default upstream: `{ok: 1, answered: <command>}` to each request owed a reply."""
    message = decode_op_msg(frame.header, frame.payload)
    if message.more_to_come:
        return []
    reply = {"ok": 1.0, "answered": command_name(message.body)}
    return [upstream_reply(reply, frame.header.request_id)]


@dataclass
class FakeUpstream:
    stream: FramedStream
    respond: Responder
    received: list[Frame] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    async def run(self) -> None:
        while (frame := await self.stream.receive_frame()) is not None:
            self.received.append(frame)
            for data in self.respond(frame):
                await self.send(data)
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        self.sent.append(data)
        await self.stream.send(data)


@dataclass
class Wired:
    session: Session
    client: FramedStream  # the driver's end
    upstream: FakeUpstream

    async def round_trip(self, data: bytes) -> Frame:
        await self.client.send(data)
        return await self.next_frame()

    async def next_frame(self) -> Frame:
        frame = await self.client.receive_frame()
        assert frame is not None, "the session closed the connection"
        return frame


def services(
    commands: dict[str, CommandHandler] | None = None,
    writes: WriteInterceptor | None = None,
    metrics: ProxyMetrics | None = None,
    slow_ms: float = 100.0,
) -> SessionServices:
    # The target is never dialled: the session is served over the fake upstream's stream.
    target = UpstreamTarget.from_uri("mongodb://upstream.invalid:27017")
    return SessionServices(
        upstream=target,
        commands=commands or {},
        writes=writes,
        metrics=metrics or ProxyMetrics(),
        slow_ms=slow_ms,
    )


@asynccontextmanager
async def wired_session(
    respond: Responder = answer_ok,
    *,
    commands: dict[str, CommandHandler] | None = None,
    writes: WriteInterceptor | None = None,
    metrics: ProxyMetrics | None = None,
    slow_ms: float = 100.0,
) -> AsyncIterator[Wired]:
    """A served session; on the way out the driver hangs up and the session must end."""
    driver_end, proxy_client_end = trio.testing.memory_stream_pair()
    proxy_upstream_end, upstream_end = trio.testing.memory_stream_pair()
    served = services(commands, writes, metrics, slow_ms)
    session = Session(1, FramedStream(proxy_client_end), served)
    upstream = FakeUpstream(FramedStream(upstream_end), respond)
    wired = Wired(session, FramedStream(driver_end), upstream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve, FramedStream(proxy_upstream_end))
        nursery.start_soon(upstream.run)
        yield wired
        await wired.client.aclose()
