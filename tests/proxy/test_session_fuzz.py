"""Sequences of valid and invalid frames through a live Session (memory streams, a fake
upstream), beyond the codec's own fuzzing: a bad frame ends its own connection and no
other; every valid request before it is forwarded exactly once and, if it is owed a
reply, answered exactly once; nothing is left in the session's per-request table; and
the log level (DEBUG decodes more, for its lines) changes none of it."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import bson
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.framed import FramedStream
from proxy.session import Session
from proxy.wire.compression import compress
from proxy.wire.framing import Frame
from proxy.wire.header import HEADER_SIZE, MAX_MESSAGE_SIZE, MsgHeader, OpCode
from proxy.wire.opmsg import (
    CHECKSUM_PRESENT,
    MORE_TO_COME,
    DocumentSequence,
    OpMsg,
    decode_op_msg,
    encode_op_msg,
)
from proxy.wire.opquery import OpQuery, OpReply, encode_op_query, encode_op_reply
from tests.proxy.wired_session import services, upstream_reply

PING = {"ping": 1, "$db": "admin"}
FIND = {"find": "coll", "filter": {"x": "y"}, "$db": "db"}
HELLO_REPLY = {"ok": 1.0, "isWritablePrimary": True, "maxWireVersion": 21}
KNOWN_OP_CODES = {OpCode.OP_MSG, OpCode.OP_QUERY, OpCode.OP_COMPRESSED}


@dataclass(frozen=True)
class Step:
    """One frame a client sends. `ends_connection`: the session must close the client's
    connection over it; otherwise it is forwarded (`owes_reply`: and answered)."""

    kind: str
    data: bytes
    owes_reply: bool = False
    ends_connection: bool = False


def _op_msg(document: dict[str, object], request_id: int, flags: int = 0) -> bytes:
    return encode_op_msg(OpMsg(flags, bson.encode(document)), request_id, 0)


def _ping_payload(request_id: int) -> bytes:
    return _op_msg(PING, request_id)[HEADER_SIZE:]


# -- valid requests -----------------------------------------------------------------


def _ping(request_id: int, _: st.DataObject) -> Step:
    return Step("ping", _op_msg(PING, request_id), owes_reply=True)


def _find(request_id: int, data: st.DataObject) -> Step:
    flags = data.draw(st.sampled_from([0, CHECKSUM_PRESENT]))
    return Step("find", _op_msg(FIND, request_id, flags), owes_reply=True)


def _insert(request_id: int, data: st.DataObject) -> Step:
    count = data.draw(st.integers(1, 3))
    documents = tuple(bson.encode({"_id": i, "v": "x" * i}) for i in range(count))
    message = OpMsg(
        0,
        bson.encode({"insert": "coll", "$db": "db"}),
        (DocumentSequence("documents", documents),),
    )
    return Step("insert", encode_op_msg(message, request_id, 0), owes_reply=True)


def _unacknowledged_insert(request_id: int, _: st.DataObject) -> Step:
    command = {"insert": "coll", "documents": [{"_id": 1}], "writeConcern": {"w": 0}, "$db": "db"}
    return Step("insert w:0", _op_msg(command, request_id, MORE_TO_COME))


def _legacy_hello(request_id: int, _: st.DataObject) -> Step:
    query = OpQuery(0, "admin.$cmd", 0, -1, bson.encode({"isMaster": 1}))
    return Step("OP_QUERY hello", encode_op_query(query, request_id, 0), owes_reply=True)


def _compressed_ping(request_id: int, data: st.DataObject) -> Step:
    compressor = data.draw(st.sampled_from([0, 1, 2, 3]))  # noop, snappy, zlib, zstd
    frame = compress(OpCode.OP_MSG, _ping_payload(request_id), compressor, request_id, 0)
    return Step("compressed ping", frame, owes_reply=True)


def _ping_with_opaque_bson(request_id: int, data: st.DataObject) -> Step:
    """A ping whose framing is sound but whose later elements are not BSON: the proxy
    reads only the command name, so it forwards the bytes and the upstream judges them."""
    body = bytearray(bson.encode({"ping": 1, "$db": "admin", "pad": "abcdefgh"}))
    # The string's length prefix (4 bytes before its text) made impossible.
    at = body.index(b"abcdefgh") - 4
    body[at : at + 4] = struct.pack("<i", data.draw(st.sampled_from([-1, 0, 10_000])))
    return Step("ping, opaque BSON", encode_op_msg(OpMsg(0, bytes(body)), request_id, 0), True)


# -- frames that end the connection ----------------------------------------------------


def _bad_length(request_id: int, data: st.DataObject) -> Step:
    length = data.draw(
        st.one_of(
            st.integers(-(2**31), HEADER_SIZE - 1), st.integers(MAX_MESSAGE_SIZE + 1, 2**31 - 1)
        )
    )
    frame = struct.pack("<iiii", length, request_id, 0, OpCode.OP_MSG) + _ping_payload(request_id)
    return Step("bad length", frame, ends_connection=True)


def _bad_op_code(request_id: int, data: st.DataObject) -> Step:
    """An opcode the proxy does not read: forwarded as bytes; the upstream (as mongod
    does) closes the connection over it, and the session closes the client's."""
    op_code = data.draw(st.integers(0, 2**31 - 1).filter(lambda code: code not in KNOWN_OP_CODES))
    payload = _ping_payload(request_id)
    frame = MsgHeader(HEADER_SIZE + len(payload), request_id, 0, op_code).encode() + payload
    return Step("bad opcode", frame, ends_connection=True)


def _bad_bson(request_id: int, data: st.DataObject) -> Step:
    body = bytearray(bson.encode(PING))
    damage = data.draw(st.sampled_from(["overrun", "no NUL", "empty", "name not UTF-8"]))
    if damage == "overrun":
        body[:4] = struct.pack("<i", len(body) + data.draw(st.integers(1, 1000)))
    elif damage == "no NUL":
        body[-1] = 1
    elif damage == "empty":
        body = bytearray(b"\x05\x00\x00\x00\x00")
    else:
        body[5:9] = b"\xff\xfe\xfd\xfc"  # the first key, "ping"
    payload = struct.pack("<I", 0) + b"\x00" + bytes(body)
    frame = MsgHeader(HEADER_SIZE + len(payload), request_id, 0, OpCode.OP_MSG).encode() + payload
    return Step(f"bad BSON ({damage})", frame, ends_connection=True)


def _bad_checksum(request_id: int, data: st.DataObject) -> Step:
    frame = bytearray(_op_msg(PING, request_id, CHECKSUM_PRESENT))
    frame[-1] ^= data.draw(st.integers(1, 255))
    return Step("bad checksum", bytes(frame), ends_connection=True)


def _bad_compressed(request_id: int, data: st.DataObject) -> Step:
    compressor = data.draw(st.sampled_from([1, 2, 3]))
    damage = data.draw(st.sampled_from(["junk", "size lie", "inner garbage", "unknown compressor"]))
    payload = _ping_payload(request_id)
    if damage == "junk":
        junk = b"\xff" * data.draw(st.integers(1, 40))
        inner = struct.pack("<iiB", OpCode.OP_MSG, len(payload), compressor) + junk
        frame = MsgHeader(HEADER_SIZE + len(inner), request_id, 0, OpCode.OP_COMPRESSED).encode()
        return Step("compressed junk", frame + inner, ends_connection=True)
    if damage == "inner garbage":
        payload = payload[:4] + b"\x07" + payload[5:]  # a section of unknown kind
    frame = bytearray(compress(OpCode.OP_MSG, payload, compressor, request_id, 0))
    if damage == "size lie":
        size_at = HEADER_SIZE + 4
        (size,) = struct.unpack_from("<i", frame, size_at)
        struct.pack_into("<i", frame, size_at, size + data.draw(st.integers(1, 100)))
    elif damage == "unknown compressor":
        frame[HEADER_SIZE + 8] = data.draw(st.integers(4, 255))
    return Step(f"compressed, {damage}", bytes(frame), ends_connection=True)


def _truncated(request_id: int, data: st.DataObject) -> Step:
    """A frame the client hangs up in the middle of (so it is always the last)."""
    frame = _op_msg(FIND, request_id)
    return Step(
        "truncated", frame[: data.draw(st.integers(1, len(frame) - 1))], ends_connection=True
    )


VALID = [
    _ping, _find, _insert, _unacknowledged_insert, _legacy_hello, _compressed_ping,
    _ping_with_opaque_bson,
]  # fmt: skip
INVALID = [_bad_length, _bad_op_code, _bad_bson, _bad_checksum, _bad_compressed, _truncated]


# -- the fake upstream ------------------------------------------------------------------


@dataclass
class Upstream:
    """Answers each request owed a reply and closes over an opcode it does not know."""

    stream: FramedStream
    received: list[int]

    async def run(self) -> None:
        while (frame := await self.stream.receive_frame()) is not None:
            self.received.append(frame.header.request_id)
            reply = self._reply(frame)
            if reply is None:
                break
            if reply:
                try:
                    await self.stream.send(reply)
                except trio.BrokenResourceError:
                    break  # the session has ended (and closed this connection) first
        await self.stream.aclose()

    @staticmethod
    def _reply(frame: Frame) -> bytes | None:
        """The reply to send, b"" for none, None to close the connection."""
        request_id = frame.header.request_id
        if frame.header.op_code == OpCode.OP_QUERY:
            return encode_op_reply(OpReply(0, 0, 0, (bson.encode(HELLO_REPLY),)), 900, request_id)
        if frame.header.op_code != OpCode.OP_MSG:
            return None
        if decode_op_msg(frame.header, frame.payload).more_to_come:
            return b""
        return upstream_reply({"ok": 1.0}, request_id)


@dataclass
class Served:
    session: Session
    client: FramedStream
    upstream: Upstream
    ended: trio.Event


async def _serve(nursery: trio.Nursery, connection_id: int, slow_ms: float) -> Served:
    driver_end, proxy_client_end = trio.testing.memory_stream_pair()
    proxy_upstream_end, upstream_end = trio.testing.memory_stream_pair()
    session = Session(connection_id, FramedStream(proxy_client_end), services(slow_ms=slow_ms))
    upstream = Upstream(FramedStream(upstream_end), [])
    served = Served(session, FramedStream(driver_end), upstream, trio.Event())

    async def serve() -> None:
        await session.serve(FramedStream(proxy_upstream_end))
        served.ended.set()

    nursery.start_soon(serve)
    nursery.start_soon(upstream.run)
    return served


@contextmanager
def _session_log_level(level: int) -> Iterator[None]:
    logger = logging.getLogger("proxy.session")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@st.composite
def _sequences(draw: st.DrawFn) -> list[Step]:
    data = draw(st.data())
    kinds = draw(st.lists(st.sampled_from(VALID + INVALID), max_size=8))
    return [kind(request_id, data) for request_id, kind in enumerate(kinds, start=100)]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    steps=_sequences(),
    level=st.sampled_from([logging.INFO, logging.DEBUG]),
    slow_ms=st.sampled_from([0.0, 100.0]),  # 0: every request goes through the slow log
)
async def test_frame_sequences_end_only_their_own_connection(
    steps: list[Step], level: int, slow_ms: float
) -> None:
    first_bad = next((i for i, step in enumerate(steps) if step.ends_connection), len(steps))
    valid, bad = steps[:first_bad], steps[first_bad:]
    with _session_log_level(level), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fuzzed = await _serve(nursery, 1, slow_ms)
            beside = await _serve(nursery, 2, slow_ms)
            answered: list[int] = []
            for step in valid:
                await fuzzed.client.send(step.data)
                if step.owes_reply:
                    reply = await fuzzed.client.receive_frame()
                    assert reply is not None, step.kind
                    answered.append(reply.header.response_to)
            if bad and bad[0].kind != "truncated":
                # A bad opcode is forwarded: nothing may follow it that the session would
                # forward as well. After any other bad frame, the rest must go nowhere.
                rest = bad[:1] if bad[0].kind == "bad opcode" else bad
                await fuzzed.client.send(b"".join(step.data for step in rest))
                assert await fuzzed.client.receive_frame() is None
            elif bad:
                await fuzzed.client.send(bad[0].data)
            await fuzzed.client.aclose()  # the driver hangs up (if the session did not)
            await fuzzed.ended.wait()

            forwarded = [100 + i for i, step in enumerate(valid)]
            if bad and bad[0].kind == "bad opcode":
                forwarded.append(100 + first_bad)
            assert fuzzed.upstream.received == forwarded
            assert answered == [100 + i for i, step in enumerate(valid) if step.owes_reply]
            assert fuzzed.session.requests_in_flight == 0

            # The session beside it never noticed.
            await beside.client.send(_op_msg(PING, 7))
            reply = await beside.client.receive_frame()
            assert reply is not None and reply.header.response_to == 7
            assert beside.session.requests_in_flight == 0
            assert not beside.ended.is_set()
            await beside.client.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=_sequences(), level=st.sampled_from([logging.INFO, logging.DEBUG]))
async def test_pipelined_frames_then_a_bad_one_leave_nothing_behind(
    steps: list[Step], level: int
) -> None:
    """Everything sent at once, as a driver pipelining w:0 writes or exhaust reads might:
    the bad frame may arrive before the replies to the requests before it. Each is still
    forwarded once, in order, answered at most once, and the session's table is empty
    once it has ended (a shutdown's drain would otherwise wait for those replies)."""
    first_bad = next((i for i, step in enumerate(steps) if step.ends_connection), None)
    if first_bad is None or steps[first_bad].kind in ("truncated", "bad opcode"):
        sent = steps[: first_bad if first_bad is None else first_bad + 1]
    else:
        sent = steps
    with _session_log_level(level), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fuzzed = await _serve(nursery, 1, 100.0)
            beside = await _serve(nursery, 2, 100.0)
            await fuzzed.client.send(b"".join(step.data for step in sent))
            if first_bad is None or steps[first_bad].kind == "truncated":
                await fuzzed.client.stream.send_eof()  # the driver hangs up its side
            answered = []
            while (frame := await fuzzed.client.receive_frame()) is not None:
                answered.append(frame.header.response_to)
            await fuzzed.client.aclose()
            await fuzzed.ended.wait()

            valid = steps[:first_bad] if first_bad is not None else steps
            forwardable = [100 + i for i in range(len(valid))]
            if first_bad is not None and steps[first_bad].kind == "bad opcode":
                forwardable.append(100 + first_bad)
            received = fuzzed.upstream.received
            assert received == forwardable[: len(received)]
            owed = [100 + i for i, step in enumerate(valid) if step.owes_reply]
            assert answered == [request_id for request_id in owed if request_id in answered]
            assert fuzzed.session.requests_in_flight == 0

            await beside.client.send(_op_msg(PING, 7))
            reply = await beside.client.receive_frame()
            assert reply is not None and reply.header.response_to == 7
            await beside.client.aclose()
