"""The session's routing over memory streams: what goes through byte for byte, what is
rewritten, what is answered here, and that nothing of a request remains once its last
reply has gone through."""

from __future__ import annotations

import logging
import struct
from typing import Any

import bson
import pytest
import trio
import trio.testing

from engine.errors import BadValue
from proxy.session import (
    AnswerLocally,
    CommandContext,
    ForwardRewritten,
    ForwardUnchanged,
    Session,
    WriteDecision,
)
from proxy.wire.compression import Compressor, compress, decode_compressed, decompress
from proxy.wire.framing import Frame
from proxy.wire.header import HEADER_SIZE, MsgHeader, OpCode
from proxy.wire.opmsg import (
    CHECKSUM_PRESENT,
    EXHAUST_ALLOWED,
    MORE_TO_COME,
    OpMsg,
    command_name,
    decode_op_msg,
    encode_op_msg,
)
from proxy.wire.opquery import OpQuery, OpReply, decode_op_reply, encode_op_query, encode_op_reply
from tests.proxy.wired_session import (
    answer_ok,
    body_of,
    op_msg,
    upstream_reply,
    wired_session,
)

PING = {"ping": 1, "$db": "admin"}
FIND = {"find": "coll", "filter": {"x": 1}, "$db": "db"}
INSERT = {"insert": "coll", "documents": [{"_id": 1}], "$db": "db"}
UPSTREAM_HELLO = {
    "ok": 1.0,
    "isWritablePrimary": True,
    "setName": "rs0",
    "hosts": ["a:27017", "b:27017"],
    "primary": "a:27017",
    "me": "a:27017",
    "maxWireVersion": 21,
    "maxMessageSizeBytes": 48_000_000,
    "compression": ["zstd"],
}


async def test_plain_request_and_reply_pass_byte_for_byte() -> None:
    async with wired_session() as wired:
        request = encode_op_msg(OpMsg(CHECKSUM_PRESENT, bson.encode(FIND)), 7, 0)
        reply = await wired.round_trip(request)
        assert [frame.raw for frame in wired.upstream.received] == [request]
        assert reply.raw == wired.upstream.sent[0]
        assert reply.header.response_to == 7
        assert wired.session.requests_in_flight == 0


def _answer_hello(frame: Frame) -> list[bytes]:
    if frame.header.op_code == OpCode.OP_QUERY:
        reply = OpReply(0, 0, 0, (bson.encode(UPSTREAM_HELLO),))
        return [encode_op_reply(reply, 900, frame.header.request_id)]
    return [upstream_reply(UPSTREAM_HELLO, frame.header.request_id)]


def _assert_mongos_hello(reply: dict[str, Any]) -> None:
    assert reply["msg"] == "isdbgrid"
    for field in ("setName", "hosts", "primary", "me"):
        assert field not in reply
    assert reply["maxWireVersion"] == 21
    assert reply["maxMessageSizeBytes"] == 48_000_000
    # What the client offered that the proxy can decompress, not what the upstream takes.
    assert reply["compression"] == ["zlib", "snappy"]


async def test_hello_reply_is_rewritten_to_a_mongos() -> None:
    hello = {"hello": 1, "compression": ["zlib", "lz4", "snappy"], "$db": "admin"}
    async with wired_session(_answer_hello) as wired:
        reply = await wired.round_trip(op_msg(hello, 3))
        assert reply.header.response_to == 3
        _assert_mongos_hello(body_of(reply))
        assert wired.session.requests_in_flight == 0


async def test_legacy_op_query_hello_gets_a_rewritten_op_reply() -> None:
    hello = {"isMaster": 1, "compression": ["zlib", "snappy"]}
    query = OpQuery(0, "admin.$cmd", 0, -1, bson.encode(hello))
    async with wired_session(_answer_hello) as wired:
        reply = await wired.round_trip(encode_op_query(query, 4, 0))
        assert reply.header.op_code == OpCode.OP_REPLY
        assert reply.header.response_to == 4
        (document,) = decode_op_reply(reply.payload).documents
        _assert_mongos_hello(bson.decode(document))
        assert wired.session.requests_in_flight == 0


async def _say_hello(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    return {"ok": 1.0, "greeting": f"hello {command['sayHello']}"}


async def _refuse(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    raise BadValue("not today")


async def test_admin_command_is_answered_here_and_never_forwarded() -> None:
    commands = {"sayHello": _say_hello, "refuse": _refuse}
    async with wired_session(commands=commands) as wired:
        reply = await wired.round_trip(op_msg({"sayHello": "you", "$db": "admin"}, 5))
        assert reply.header.response_to == 5
        assert body_of(reply) == {"ok": 1.0, "greeting": "hello you"}
        refused = await wired.round_trip(op_msg({"refuse": 1, "$db": "admin"}, 6))
        assert body_of(refused) == {
            "ok": 0.0,
            "errmsg": "not today",
            "code": 2,
            "codeName": "BadValue",
        }
        await wired.round_trip(op_msg(PING, 7))
        assert [body_of(frame) for frame in wired.upstream.received] == [PING]
        assert wired.session.requests_in_flight == 0


class _TagWrites:
    """A write interceptor that answers as `decide` says."""

    def __init__(self, decide: WriteDecision | BadValue) -> None:
        self.decide = decide

    def wants(self, command: str) -> bool:
        return command == "insert"

    async def intercept(self, context: CommandContext, command: str, message: OpMsg) -> Any:
        if isinstance(self.decide, BadValue):
            raise self.decide
        return self.decide


def _mark_reply(reply: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "hooked": True}


async def test_intercepted_write_forwards_the_rewritten_message_and_hooks_its_reply() -> None:
    rewritten = OpMsg(0, bson.encode({**INSERT, "documents": [{"_id": 1, "tagged": True}]}))
    writes = _TagWrites(ForwardRewritten(rewritten, _mark_reply))
    async with wired_session(writes=writes) as wired:
        reply = await wired.round_trip(op_msg(INSERT, 8))
        (forwarded,) = wired.upstream.received
        assert forwarded.header.request_id == 8
        assert body_of(forwarded)["documents"] == [{"_id": 1, "tagged": True}]
        assert reply.header.response_to == 8
        assert body_of(reply) == {"ok": 1.0, "answered": "insert", "hooked": True}
        assert wired.session.requests_in_flight == 0


async def test_write_forwarded_unchanged_keeps_its_bytes_and_may_still_hook_the_reply() -> None:
    async with wired_session(writes=_TagWrites(ForwardUnchanged(_mark_reply))) as wired:
        request = op_msg(INSERT, 9)
        reply = await wired.round_trip(request)
        assert [frame.raw for frame in wired.upstream.received] == [request]
        assert body_of(reply)["hooked"] is True
        assert wired.session.requests_in_flight == 0


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        (AnswerLocally({"ok": 1.0, "n": 0}), {"ok": 1.0, "n": 0}),
        (
            BadValue("bad write"),
            {"ok": 0.0, "errmsg": "bad write", "code": 2, "codeName": "BadValue"},
        ),
    ],
    ids=["answer-locally", "interceptor-error"],
)
async def test_write_answered_here_is_not_forwarded(
    decision: WriteDecision | BadValue, expected: dict[str, Any]
) -> None:
    async with wired_session(writes=_TagWrites(decision)) as wired:
        reply = await wired.round_trip(op_msg(INSERT, 10))
        assert reply.header.response_to == 10
        assert body_of(reply) == expected
        assert wired.upstream.received == []
        assert wired.session.requests_in_flight == 0


@pytest.mark.parametrize(
    "writes",
    [None, _TagWrites(AnswerLocally({"ok": 1.0})), _TagWrites(ForwardUnchanged(_mark_reply))],
    ids=["forwarded", "answered-here", "intercepted-forwarded"],
)
async def test_unacknowledged_write_gets_no_reply(writes: _TagWrites | None) -> None:
    async with wired_session(writes=writes) as wired:
        await wired.client.send(op_msg({**INSERT, "writeConcern": {"w": 0}}, 11, 0, MORE_TO_COME))
        # The next frame the client gets answers the ping: nothing answered the w:0 insert.
        reply = await wired.round_trip(op_msg(PING, 12))
        assert reply.header.response_to == 12
        assert wired.session.requests_in_flight == 0


def _exhaust_stream(reply_ids_chain: bool) -> Any:
    """An upstream that answers an exhaustAllowed getMore with three batches. mongod sets
    each reply's responseTo to the previous reply's id; some servers keep the request's."""

    def respond(frame: Frame) -> list[bytes]:
        message = decode_op_msg(frame.header, frame.payload)
        if not message.exhaust_allowed:
            return answer_ok(frame)
        replies = []
        response_to = frame.header.request_id
        for batch in range(3):
            flags = MORE_TO_COME if batch < 2 else 0
            reply_id = 500 + batch
            document = {"ok": 1.0, "batch": batch}
            if command_name(message.body) == "hello":
                document = {**UPSTREAM_HELLO, "batch": batch}
            replies.append(op_msg(document, reply_id, response_to, flags))
            if reply_ids_chain:
                response_to = reply_id
        return replies

    return respond


@pytest.mark.parametrize("reply_ids_chain", [True, False], ids=["mongod", "request-id-kept"])
async def test_exhaust_cursor_streams_through_and_leaves_nothing_behind(
    reply_ids_chain: bool,
) -> None:
    get_more = {"getMore": 42, "collection": "coll", "$db": "db"}
    async with wired_session(_exhaust_stream(reply_ids_chain)) as wired:
        await wired.client.send(op_msg(get_more, 13, 0, EXHAUST_ALLOWED))
        received = [await wired.next_frame() for _ in range(3)]
        assert [frame.raw for frame in received] == wired.upstream.sent
        assert wired.session.requests_in_flight == 0
        # The connection goes on as before once the stream is over.
        reply = await wired.round_trip(op_msg(PING, 14))
        assert body_of(reply)["answered"] == "ping"
        assert wired.session.requests_in_flight == 0


@pytest.mark.parametrize("reply_ids_chain", [True, False], ids=["mongod", "request-id-kept"])
async def test_streaming_hello_is_rewritten_reply_by_reply_and_leaves_nothing_behind(
    reply_ids_chain: bool,
) -> None:
    hello = {"hello": 1, "maxAwaitTimeMS": 10_000, "$db": "admin"}
    async with wired_session(_exhaust_stream(reply_ids_chain)) as wired:
        await wired.client.send(op_msg(hello, 15, 0, EXHAUST_ALLOWED))
        replies = [body_of(await wired.next_frame()) for _ in range(3)]
        assert [reply["batch"] for reply in replies] == [0, 1, 2]
        assert all(reply["msg"] == "isdbgrid" and "hosts" not in reply for reply in replies)
        assert wired.session.requests_in_flight == 0


def _zlib(message: bytes) -> bytes:
    header = MsgHeader(*struct.unpack("<iiii", message[:HEADER_SIZE]))
    payload = message[HEADER_SIZE:]
    return compress(header.op_code, payload, Compressor.ZLIB, header.request_id, header.response_to)


async def test_proxy_compresses_the_reply_when_the_upstream_lacks_the_clients_compressor() -> None:
    plain = op_msg(FIND, 17)
    async with wired_session() as wired:
        reply = await wired.round_trip(_zlib(plain))
        # The upstream, which negotiated no compression, gets the plain message...
        assert [frame.raw for frame in wired.upstream.received] == [plain]
        # ...and the client its reply compressed with its own compressor, as mongod would.
        assert reply.header.op_code == OpCode.OP_COMPRESSED
        assert decode_compressed(reply.payload).compressor_id == Compressor.ZLIB
        header, payload = decompress(reply.header, reply.payload)
        assert header.encode() + payload == wired.upstream.sent[0]
        assert wired.session.requests_in_flight == 0


async def test_compressed_request_goes_through_untouched_when_the_upstream_takes_it() -> None:
    def respond(frame: Frame) -> list[bytes]:
        if frame.header.op_code != OpCode.OP_COMPRESSED:  # the hello
            hello = {**UPSTREAM_HELLO, "compression": ["zlib"]}
            return [upstream_reply(hello, frame.header.request_id)]
        return [_zlib(upstream_reply({"ok": 1.0}, frame.header.request_id))]

    hello = {"hello": 1, "compression": ["zlib"], "$db": "admin"}
    async with wired_session(respond) as wired:
        await wired.round_trip(op_msg(hello, 18))
        request = _zlib(op_msg(FIND, 19))
        reply = await wired.round_trip(request)
        assert wired.upstream.received[-1].raw == request
        assert reply.raw == wired.upstream.sent[-1]
        assert wired.session.requests_in_flight == 0


def _answer_connection_status(frame: Frame) -> list[bytes]:
    if body_of(frame).get("connectionStatus"):
        status = {"ok": 1.0, "authInfo": {"authenticatedUsers": [{"user": "ada"}]}}
        return [upstream_reply(status, frame.header.request_id)]
    return answer_ok(frame)


async def _who_am_i(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    status = await context.upstream_command({"connectionStatus": 1, "$db": "admin"})
    return {"ok": 1.0, "users": status["authInfo"]["authenticatedUsers"]}


async def test_command_runs_its_own_command_on_the_clients_upstream_connection() -> None:
    async with wired_session(_answer_connection_status, commands={"whoAmI": _who_am_i}) as wired:
        reply = await wired.round_trip(op_msg({"whoAmI": 1, "$db": "admin"}, 20))
        assert reply.header.response_to == 20
        assert body_of(reply) == {"ok": 1.0, "users": [{"user": "ada"}]}
        (own,) = wired.upstream.received
        assert body_of(own) == {"connectionStatus": 1, "$db": "admin"}
        assert wired.session.requests_in_flight == 0


def _answer_only(command: str) -> Any:
    """An upstream that answers `command` at once and keeps every other request waiting."""

    def respond(frame: Frame) -> list[bytes]:
        return answer_ok(frame) if command in body_of(frame) else []

    return respond


def _start_drain(nursery: trio.Nursery, session: Session) -> trio.Event:
    drained = trio.Event()

    async def drain() -> None:
        await session.drain()
        drained.set()

    nursery.start_soon(drain)
    return drained


async def test_drain_waits_for_the_request_in_flight_then_ends_the_session() -> None:
    async with wired_session(_answer_only("ping")) as wired, trio.open_nursery() as nursery:
        await wired.client.send(op_msg(FIND, 21))
        await trio.testing.wait_all_tasks_blocked()
        drained = _start_drain(nursery, wired.session)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set()
        (waiting,) = wired.upstream.received
        await wired.upstream.send(upstream_reply({"ok": 1.0}, waiting.header.request_id))
        reply = await wired.next_frame()
        assert reply.header.response_to == 21
        await drained.wait()
        assert await wired.client.receive_frame() is None  # the session closed the connection


async def test_drain_does_not_wait_for_an_awaitable_hello() -> None:
    hello = {"hello": 1, "maxAwaitTimeMS": 10_000, "topologyVersion": {}, "$db": "admin"}
    async with wired_session(_answer_only("ping")) as wired, trio.open_nursery() as nursery:
        await wired.client.send(op_msg(hello, 22, 0, EXHAUST_ALLOWED))
        await trio.testing.wait_all_tasks_blocked()
        assert wired.session.requests_in_flight == 1
        drained = _start_drain(nursery, wired.session)
        await trio.testing.wait_all_tasks_blocked()
        assert drained.is_set()
        assert await wired.client.receive_frame() is None


async def test_malformed_frame_ends_only_its_own_session(caplog: pytest.LogCaptureFixture) -> None:
    # An OP_MSG whose body says it is 1,000 bytes long in a 30-byte message.
    body = struct.pack("<i", 1000) + b"\x10ping\x00" + struct.pack("<i", 1) + b"\x00"
    payload = struct.pack("<I", 0) + b"\x00" + body
    malformed = MsgHeader(HEADER_SIZE + len(payload), 23, 0, OpCode.OP_MSG).encode() + payload
    async with wired_session() as broken, wired_session() as other:
        with caplog.at_level(logging.WARNING, logger="proxy.session"):
            await broken.client.send(malformed)
            assert await broken.client.receive_frame() is None
        assert "closing connection" in caplog.text
        reply = await other.round_trip(op_msg(PING, 24))
        assert body_of(reply)["answered"] == "ping"
        assert broken.upstream.received == []
