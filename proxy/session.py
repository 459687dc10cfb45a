"""One client connection: two pumps and the routing decisions between them.

Requests flow client -> upstream and replies upstream -> client in two tasks, so that
moreToCome works both ways with no special case: w:0 writes simply get no reply, and an
exhaust cursor's stream of replies flows as the upstream sends it. Bytes are forwarded
untouched unless the proxy must act on a message: a hello (its reply is rewritten), a
modelgate admin command (answered here), a write to a namespace with inline models (the
predictions are added before it is forwarded)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import bson
import bson.errors
import trio

from engine.deferred import DeferredWorkers
from engine.errors import ModelgateError
from engine.models import ModelSet
from proxy.framed import FramedStream
from proxy.hello import HELLO_COMMANDS, rewrite_hello_reply
from proxy.upstream import UpstreamError, UpstreamTarget, open_upstream
from proxy.wire.compression import (
    SUPPORTED_COMPRESSORS,
    Compressor,
    compress,
    decode_compressed,
    decompress,
)
from proxy.wire.errors import ProtocolError, RemoteProtocolError
from proxy.wire.framing import Frame
from proxy.wire.header import HEADER_SIZE, MsgHeader, OpCode
from proxy.wire.opmsg import OpMsg, command_name, decode_op_msg, encode_op_msg
from proxy.wire.opquery import OpReply, decode_op_query, decode_op_reply, encode_op_reply

__all__ = ["CommandContext", "ReplyHook", "Session", "SessionServices", "WriteInterceptor"]

log = logging.getLogger(__name__)

# A reply hook turns the upstream's reply document into the one the client gets.
ReplyHook = Callable[[dict[str, Any]], dict[str, Any]]
CommandHandler = Callable[["CommandContext", dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class InterceptedWrite:
    """What the proxy does with a write it acted on: answer it here (`local_reply`, and
    nothing is forwarded), or forward `message` (None: the original bytes), with an
    optional hook that turns the upstream's reply into the client's."""

    message: OpMsg | None = None
    reply_hook: ReplyHook | None = None
    local_reply: dict[str, Any] | None = None


class WriteInterceptor(Protocol):
    def wants(self, command: str) -> bool: ...

    async def intercept(
        self, context: CommandContext, command: str, message: OpMsg
    ) -> InterceptedWrite | None: ...


@dataclass
class SessionServices:
    """What every session shares: where the upstream is and what the proxy acts on."""

    upstream: UpstreamTarget
    commands: dict[str, CommandHandler]
    writes: WriteInterceptor | None = None
    models: ModelSet | None = None
    deferred: DeferredWorkers | None = None


class CommandContext:
    """What an admin command or a write interceptor may use of its client's session."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.connection_id = session.connection_id
        self.log = session.log
        self.models = session.services.models
        self.deferred = session.services.deferred

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        """Run a command on this client's own upstream connection (so it sees the
        client's authentication, e.g. `connectionStatus`)."""
        return await self._session.upstream_command(document)


def decode_document(data: bytes) -> dict[str, Any]:
    try:
        return bson.decode(data)
    except bson.errors.BSONError as exc:
        raise RemoteProtocolError(f"invalid BSON document: {exc}") from exc


def _namespace(name: str, body: bytes) -> str:
    """`db.collection` (or just `db`) a command is about, for logs; never the contents."""
    command = decode_document(body)
    target = command.get(name)
    database = str(command.get("$db", "?"))
    return f"{database}.{target}" if isinstance(target, str) and target else database


def decode_command(message: OpMsg) -> dict[str, Any]:
    """The whole command: body fields plus each document sequence as an array field."""
    command = decode_document(message.body)
    for sequence in message.sequences:
        command[sequence.identifier] = [decode_document(doc) for doc in sequence.documents]
    return command


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in a (possibly nested) exception group, for the log line."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


_REQUEST_IDS = itertools.count(1)


def _next_request_id() -> int:
    # Replies the proxy makes up need an id of their own; drivers only look at responseTo.
    return next(_REQUEST_IDS) & 0x7FFFFFFF


class _ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[conn{self.extra['connection_id']}] {msg}", kwargs  # type: ignore[index]


class Session:
    def __init__(self, connection_id: int, client: FramedStream, services: SessionServices) -> None:
        self.connection_id = connection_id
        self.client = client
        self.services = services
        self.log = _ConnectionLog(log, {"connection_id": connection_id})
        self.upstream: FramedStream | None = None
        self._reply_hooks: dict[int, tuple[ReplyHook, bool]] = {}
        self._internal: dict[int, trio.MemorySendChannel[Frame]] = {}
        # request id -> compressor the client used, for replies the proxy compresses itself
        self._compress_replies: dict[int, int] = {}
        self._upstream_compressors: frozenset[str] = frozenset()
        self._awaiting_reply: set[int] = set()
        self._draining = False
        self._idle = trio.Event()
        self._idle.set()
        self._cancel_scope = trio.CancelScope()

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        with self._cancel_scope:
            try:
                self.upstream = await open_upstream(self.services.upstream)
            except UpstreamError as exc:
                # Closing the client's connection is the network error drivers retry.
                self.log.warning("closing client connection: %s", exc)
                await self.client.aclose()
                return
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_replies, nursery.cancel_scope)
                    await self._pump_requests()
                    nursery.cancel_scope.cancel()
            # The nursery wraps what its tasks raise (strict exception groups), so the
            # errors that end only this connection are caught with except*.
            except* ProtocolError as group:
                self.log.warning("closing connection: %s", _first_leaf(group))
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
                self.log.info("connection lost: %s", _first_leaf(group))
            finally:
                await self.client.aclose()
                await self.upstream.aclose()
        self.log.debug("closed")

    async def drain(self) -> None:
        """Stop taking requests; return once every request in flight has its reply."""
        self._draining = True
        await self._idle.wait()
        self._cancel_scope.cancel()

    def cancel(self) -> None:
        self._cancel_scope.cancel()

    # -- client -> upstream ----------------------------------------------------------

    async def _pump_requests(self) -> None:
        while True:
            frame = await self.client.receive_frame()
            if frame is None:
                return
            if self._draining:
                self.log.info("shutting down: closing the connection instead of a new request")
                return
            await self._handle_request(frame)

    async def _handle_request(self, frame: Frame) -> None:
        assert self.upstream is not None
        header, payload = frame.header, frame.payload
        request_id = header.request_id
        forward = frame.to_bytes()
        if header.op_code == OpCode.OP_COMPRESSED:
            compressor_id = decode_compressed(payload).compressor_id
            header, payload = decompress(header, payload)
            if Compressor(compressor_id).name.lower() not in self._upstream_compressors:
                # The client compressed for us, the upstream does not take that compressor:
                # forward the plain message and compress the reply as mongod would.
                forward = header.encode() + payload
                self._compress_replies[request_id] = compressor_id
        if header.op_code == OpCode.OP_MSG:
            message = decode_op_msg(header, payload)
            name = command_name(message.body)
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("command %s on %s", name, _namespace(name, message.body))
            # A hello is not work in flight: drivers' monitors keep an awaitable hello
            # waiting upstream (maxAwaitTimeMS, 10 s), and shutdown must not wait for it.
            if not message.more_to_come and name not in HELLO_COMMANDS:
                self._expect_reply(request_id)
            if name in HELLO_COMMANDS:
                self._reply_hooks[request_id] = (self._hello_hook(message.body), True)
            elif name in self.services.commands:
                await self._run_local_command(request_id, name, message)
                return
            elif self.services.writes is not None and self.services.writes.wants(name):
                rewritten = await self._intercept_write(request_id, name, message)
                if rewritten is None:
                    return
                forward = rewritten or forward
        elif header.op_code == OpCode.OP_QUERY:
            query = decode_op_query(payload)
            self._expect_reply(request_id)
            if query.full_collection_name.endswith(".$cmd") and (
                command_name(query.query) in HELLO_COMMANDS
            ):
                self._reply_hooks[request_id] = (self._hello_hook(query.query), False)
        await self.upstream.send(forward)

    def _hello_hook(self, request_body: bytes) -> ReplyHook:
        """Rewrites the hello reply, and negotiates compression with the client on the
        proxy's own account: whatever the client offers that the proxy can decompress."""
        offered = decode_document(request_body).get("compression") or []

        def hook(reply: dict[str, Any]) -> dict[str, Any]:
            self._upstream_compressors = frozenset(reply.get("compression") or ())
            rewritten = rewrite_hello_reply(reply)
            agreed = [name for name in offered if name in SUPPORTED_COMPRESSORS]
            if agreed:
                rewritten["compression"] = agreed
            else:
                rewritten.pop("compression", None)
            return rewritten

        return hook

    def _expect_reply(self, request_id: int) -> None:
        self._awaiting_reply.add(request_id)
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    def _replied(self, response_to: int) -> None:
        self._awaiting_reply.discard(response_to)
        if not self._awaiting_reply:
            self._idle.set()

    async def _run_local_command(self, request_id: int, name: str, message: OpMsg) -> None:
        command = decode_command(message)
        self.log.info("command %s on %s", name, command.get("$db"))
        try:
            reply = await self.services.commands[name](CommandContext(self), command)
        except ModelgateError as exc:
            self.log.info("command %s failed: %s", name, exc.message)
            reply = exc.to_reply()
        if not message.more_to_come:
            await self._send_to_client(request_id, reply)

    async def _intercept_write(self, request_id: int, name: str, message: OpMsg) -> bytes | None:
        """What to forward for a write: None when nothing is, b"" for the original bytes."""
        assert self.services.writes is not None
        try:
            intercepted = await self.services.writes.intercept(CommandContext(self), name, message)
        except ModelgateError as exc:
            intercepted = InterceptedWrite(local_reply=exc.to_reply())
        if intercepted is None:
            return b""
        if intercepted.local_reply is not None:
            if not message.more_to_come:
                await self._send_to_client(request_id, intercepted.local_reply)
            return None
        if intercepted.reply_hook is not None and not message.more_to_come:
            self._reply_hooks[request_id] = (intercepted.reply_hook, True)
        if intercepted.message is None:
            return b""
        return encode_op_msg(intercepted.message, request_id, 0)

    async def _send_to_client(self, response_to: int, document: dict[str, Any]) -> None:
        reply = OpMsg(flags=0, body=bson.encode(document))
        await self.client.send(encode_op_msg(reply, _next_request_id(), response_to))
        self._replied(response_to)

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        assert self.upstream is not None
        request_id = _next_request_id()
        while request_id in self._awaiting_reply:
            request_id = _next_request_id()
        send_channel, receive_channel = trio.open_memory_channel[Frame](1)
        self._internal[request_id] = send_channel
        try:
            await self.upstream.send(encode_op_msg(OpMsg(0, bson.encode(document)), request_id, 0))
            frame = await receive_channel.receive()
        finally:
            del self._internal[request_id]
        return decode_document(decode_op_msg(frame.header, frame.payload).body)

    # -- upstream -> client ----------------------------------------------------------

    async def _pump_replies(self, cancel_scope: trio.CancelScope) -> None:
        assert self.upstream is not None
        while True:
            frame = await self.upstream.receive_frame()
            if frame is None:
                self.log.warning("upstream closed the connection; closing the client's")
                cancel_scope.cancel()
                return
            response_to = frame.header.response_to
            internal = self._internal.get(response_to)
            if internal is not None:
                internal.send_nowait(frame)
                continue
            hook = self._reply_hooks.pop(response_to, None)
            compressor_id = self._compress_replies.pop(response_to, None)
            if hook is None and compressor_id is None:
                data = frame.to_bytes()
            else:
                data = self._transform_reply(frame, hook, compressor_id)
            await self.client.send(data)
            self._replied(response_to)

    def _transform_reply(
        self, frame: Frame, hook: tuple[ReplyHook, bool] | None, compressor_id: int | None
    ) -> bytes:
        header, payload = frame.header, frame.payload
        if header.op_code == OpCode.OP_COMPRESSED:
            header, payload = decompress(header, payload)
        if header.op_code == OpCode.OP_MSG and decode_op_msg(header, payload).more_to_come:
            # An exhaust stream (a cursor, or streaming hello): more replies follow and
            # are transformed the same way. mongod answers each with responseTo set to
            # the previous reply's id; some servers keep the request's id: accept both.
            for key in (header.request_id, header.response_to):
                if hook is not None:
                    self._reply_hooks[key] = hook
                if compressor_id is not None:
                    self._compress_replies[key] = compressor_id
        if hook is not None:
            payload = self._apply_hook(header, payload, *hook)
        if compressor_id is not None:
            return compress(
                header.op_code, payload, compressor_id, header.request_id, header.response_to
            )
        return (
            MsgHeader(
                HEADER_SIZE + len(payload), header.request_id, header.response_to, header.op_code
            ).encode()
            + payload
        )

    def _apply_hook(
        self, header: MsgHeader, payload: bytes, hook: ReplyHook, is_op_msg: bool
    ) -> bytes:
        """The reply's payload (bytes after the header) with the hook applied."""
        if is_op_msg:
            message = decode_op_msg(header, payload)
            body = bson.encode(hook(decode_document(message.body)))
            rewritten = OpMsg(flags=message.flags, body=body, sequences=message.sequences)
            return encode_op_msg(rewritten, header.request_id, header.response_to)[HEADER_SIZE:]
        reply = decode_op_reply(payload)
        documents = tuple(bson.encode(hook(decode_document(doc))) for doc in reply.documents)
        rewritten_reply = OpReply(
            response_flags=reply.response_flags,
            cursor_id=reply.cursor_id,
            starting_from=reply.starting_from,
            documents=documents,
        )
        return encode_op_reply(rewritten_reply, header.request_id, header.response_to)[HEADER_SIZE:]
