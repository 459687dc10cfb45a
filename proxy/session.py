"""One client connection: two pumps and the routing decisions between them.

Requests flow client -> upstream and replies upstream -> client in two tasks, so that
moreToCome works both ways with no special case: w:0 writes simply get no reply, and an
exhaust cursor's stream of replies flows as the upstream sends it. Bytes are forwarded
untouched unless the proxy must act on a message: a hello (its reply is rewritten), a
modelgate admin command (answered here), a write to a namespace with inline models (the
predictions are added before it is forwarded).

Each request owed a reply has one record (`InFlight`) from the moment it is read until
its last reply has gone through to the client: what to do to its replies, whether
shutdown waits for it, and when it came, for the latency modelgate adds and the
slow-operation log (logger proxy.slow)."""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any, Protocol

import bson
import trio

from engine.deferred import DeferredWorkers
from engine.errors import ModelgateError, first_exception
from engine.models import ModelSet
from proxy.decisions import AnswerLocally, ForwardRewritten, ForwardUnchanged, WriteDecision
from proxy.framed import FramedStream
from proxy.hello import HELLO_COMMANDS, UpstreamLimits, hello_reply_hook, limits_from_hello
from proxy.logs import ConnectionLog
from proxy.metrics import CommandCounts, ProxyMetrics
from proxy.replies import (
    InFlight,
    client_reply,
    command_namespace,
    decode_command,
    decode_document,
    encode_local_reply,
    error_reply,
    next_request_id,
)
from proxy.settings import ModelSourceSettings, Settings
from proxy.split_writes import ForwardInParts
from proxy.upstream import UpstreamError, UpstreamTarget, open_upstream
from proxy.wire.compression import Compressor, decode_compressed, decompress
from proxy.wire.errors import ProtocolError
from proxy.wire.framing import Frame, new_frame
from proxy.wire.header import HEADER_SIZE, OpCode, unpack_header
from proxy.wire.opmsg import (
    BODY_OFFSET,
    EXHAUST_ALLOWED,
    MORE_TO_COME,
    OpMsg,
    command_name,
    decode_op_msg,
    encode_op_msg,
    peek_request,
)
from proxy.wire.opquery import decode_op_query

__all__ = [
    "AggregateInterceptor",
    "AnswerLocally",
    "CommandContext",
    "CommandHandler",
    "ForwardRewritten",
    "ForwardUnchanged",
    "SearchWriteNotifier",
    "Session",
    "SessionServices",
    "WriteDecision",
    "WriteInterceptor",
]

log = logging.getLogger(__name__)
slow_log = logging.getLogger("proxy.slow")

# Where a plain request's command document starts, and a reply's responseTo.
_BODY_AT = HEADER_SIZE + BODY_OFFSET
_RESPONSE_TO = struct.Struct("<i")
# The command names whose counts a session keeps at hand (more are looked up each time).
_MAX_NAMES = 256

CommandHandler = Callable[["CommandContext", dict[str, Any]], Awaitable[dict[str, Any]]]


class WriteInterceptor(Protocol):
    def wants(self, command: str) -> bool: ...

    async def intercept(
        self, context: CommandContext, command: str, message: OpMsg
    ) -> WriteDecision: ...


class AggregateInterceptor(Protocol):
    """Acts on some aggregates (proxy.vector_search: the search stages); `wants` looks at
    the body's bytes only, so that other aggregates are never decoded."""

    def wants(self, body: bytes) -> bool: ...

    async def intercept(
        self, context: CommandContext, command: str, message: OpMsg
    ) -> WriteDecision: ...


class SearchWriteNotifier(Protocol):
    """Hears of the writes forwarded to namespaces with search indexes
    (proxy.vector_search.SearchWrites)."""

    commands: frozenset[str]

    def after_write(self, command: str, message: OpMsg) -> Callable[[], None] | None: ...


@dataclass
class SessionServices:
    """What every session shares: where the upstream is and what the proxy acts on."""

    upstream: UpstreamTarget
    commands: dict[str, CommandHandler]
    writes: WriteInterceptor | None = None
    models: ModelSet | None = None
    deferred: DeferredWorkers | None = None
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    # A request whose round trip through modelgate takes longer is logged (proxy.slow).
    slow_ms: float = Settings.slow_ms
    # Where registerModel may read a model from, and the largest it takes.
    model_sources: ModelSourceSettings = field(default_factory=ModelSourceSettings)
    # Vector search (--search serve): the catalog of search indexes and the local indexes
    # (engine.search), the aggregates with search stages, the writes they hear of. All
    # None with --search passthrough: the upstream serves search itself.
    search_catalog: Any = None
    search_indexes: Any = None
    search: AggregateInterceptor | None = None
    search_writes: SearchWriteNotifier | None = None


class CommandContext:
    """What an admin command or a write interceptor may use of its client's session."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.connection_id = session.connection_id
        self.log = session.log
        self.models = session.services.models
        self.deferred = session.services.deferred
        self.model_sources = session.services.model_sources
        self.search_catalog = session.services.search_catalog
        self.search_indexes = session.services.search_indexes
        # Time spent waiting for model predictions for this request (a write interceptor
        # adds to it), reported by the slow-operation log.
        self.inference_ns = 0

    @property
    def limits(self) -> UpstreamLimits:
        """What the upstream accepts (its hello reply), which a rewritten write must fit."""
        return self._session.upstream_limits

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        """Run a command on this client's own upstream connection (so it sees the
        client's authentication, e.g. `connectionStatus`)."""
        return await self._session.upstream_command(document)


class Session:
    def __init__(self, connection_id: int, client: FramedStream, services: SessionServices) -> None:
        self.connection_id = connection_id
        self.client = client
        self.services = services
        self._metrics = services.metrics
        self.log = ConnectionLog(log, connection_id)
        self._slow_log = ConnectionLog(slow_log, connection_id)
        self._slow_ns = int(services.slow_ms * 1_000_000)
        self.upstream: FramedStream | None = None
        # responseTo -> the request a reply answers; a stream's request is under two keys.
        self._in_flight: dict[int, InFlight] = {}
        self._request_finished = trio.lowlevel.ParkingLot()
        self._upstream_compressors: frozenset[str] = frozenset()
        self.upstream_limits = UpstreamLimits()
        self._draining = False
        self._cancel_scope = trio.CancelScope()
        self._counts_by_name: dict[str, CommandCounts] = {}
        # The commands the proxy may act on whatever its models (see _acts_on), one set
        # lookup per request; the write interceptor's depend on the models of the moment.
        search_writes = services.search_writes
        self._acted_on = frozenset(
            (*HELLO_COMMANDS, *services.commands)
            + (("aggregate",) if services.search is not None else ())
            + (tuple(search_writes.commands) if search_writes is not None else ())
        )

    @property
    def requests_in_flight(self) -> int:
        """Requests still owed a reply (an exhaust stream counts once)."""
        return len({id(request) for request in self._in_flight.values()})

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Connect to the upstream and serve the client until either side closes."""
        metrics = self._metrics
        try:
            upstream = await open_upstream(self.services.upstream)
        except UpstreamError as exc:
            # Closing the client's connection is the network error drivers retry.
            self.log.warning("closing client connection: %s", exc)
            metrics.upstream_connect_errors += 1
            metrics.refused_upstream_unreachable += 1
            await self.client.aclose()
            return
        metrics.upstream_connects += 1
        await self.serve(upstream)

    async def serve(self, upstream: FramedStream) -> None:
        """Serve the client over `upstream`, its own connection, until either side closes
        (or `drain`/`cancel`); both connections are closed on the way out."""
        self.upstream = upstream
        with self._cancel_scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_replies, nursery.cancel_scope)
                    await self._pump_requests()
                    nursery.cancel_scope.cancel()
            # The nursery wraps what its tasks raise (strict exception groups), so the
            # errors that end only this connection are caught with except*.
            except* ProtocolError as group:
                self.log.warning("closing connection: %s", first_exception(group))
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
                self.log.info("connection lost: %s", first_exception(group))
            finally:
                await self.client.aclose()
                await upstream.aclose()
                # Requests still owed a reply never get one now: a drain waiting for
                # them (shutdown) must not wait out its grace period.
                self._in_flight.clear()
                self._request_finished.unpark_all()
        self.log.debug("closed")

    async def drain(self) -> None:
        """Stop taking requests; return once every request in flight has its reply."""
        self._draining = True
        while any(request.is_work for request in self._in_flight.values()):
            await self._request_finished.park()
        self._cancel_scope.cancel()

    def cancel(self) -> None:
        self._cancel_scope.cancel()

    def _await_replies(self, request: InFlight, *response_tos: int) -> None:
        """Route the replies that answer any of `response_tos` to `request`; with none,
        the request is finished and nothing of it remains."""
        for key in request.reply_keys:
            if self._in_flight.get(key) is request:
                del self._in_flight[key]
        request.reply_keys = response_tos
        for key in response_tos:
            self._in_flight[key] = request
        if not response_tos and self._draining:
            # Only a drain waits for requests to finish.
            self._request_finished.unpark_all()

    # -- client -> upstream ----------------------------------------------------------

    async def _pump_requests(self) -> None:
        # Locals: this loop runs once per request, and attribute lookups add up.
        receive = self.client.receive_message
        send = self.upstream.send  # type: ignore[union-attr]
        metrics = self._metrics
        in_flight = self._in_flight
        acted_on = self._acted_on
        writes = self.services.writes
        counts_by_name = self._counts_by_name
        while True:
            raw = await receive()
            received_ns = perf_counter_ns()
            if raw is None:
                return
            if self._draining:
                self.log.info("shutting down: closing the connection instead of a new request")
                return
            request = InFlight()
            request.started_ns = received_ns
            metrics.received_bytes += len(raw)
            forward = raw
            # A plain OP_MSG the proxy only forwards (ping, find, getMore: nearly all),
            # routed by its command name as read from the bytes, is taken here: no
            # coroutine or method call between receive and send, as one costs about as
            # much as its routing.
            peeked = peek_request(raw)
            if (
                peeked is None
                or (name := peeked[2]) in acted_on
                or (writes is not None and writes.wants(name))
            ):
                rewritten = await self._handle_in_full(request, raw)
                if rewritten is None:
                    continue  # answered here
                forward = rewritten
            else:
                # _note_command, inlined.
                if log.isEnabledFor(logging.DEBUG):
                    self._log_command(name, raw, _BODY_AT)
                counts = counts_by_name.get(name) or self._counts_for(name)
                counts.requests += 1
                request.command = counts
                request.name = name
                request.message = raw
                request.body_at = _BODY_AT
                request_id, flags = peeked[0], peeked[1]
                if flags & MORE_TO_COME:
                    request.owes_reply = False
                elif flags & EXHAUST_ALLOWED:
                    request.may_stream = True
                    self._await_replies(request, request_id)
                else:
                    # Registered here rather than by _await_replies: a new request has no
                    # keys yet, and this is every plain request.
                    request.plain = True
                    request.reply_keys = (request_id,)
                    in_flight[request_id] = request
            request.forwarded_ns = perf_counter_ns()
            try:
                await send(forward)
            except (trio.BrokenResourceError, OSError):
                metrics.upstream_lost += 1
                raise
            if not request.owes_reply:
                _replied(request)
                self._finish_round_trip(request, 0)

    def _counts_for(self, name: str) -> CommandCounts:
        """What a request of command `name` counts on; kept for this session's next one."""
        counts = self._metrics.for_command(name)
        if len(self._counts_by_name) < _MAX_NAMES:
            self._counts_by_name[name] = counts
        return counts

    async def _handle_in_full(self, request: InFlight, raw: bytes) -> bytes | None:
        """A request the proxy may act on, or one that is not a plain OP_MSG: compressed,
        with a checksum or document sequences, legacy OP_QUERY, another opcode. Returns
        what to forward upstream, or None when it was answered here."""
        header, payload = unpack_header(raw), raw[HEADER_SIZE:]
        request_id = header.request_id
        forward = raw
        if header.op_code == OpCode.OP_COMPRESSED:
            compressor_id = decode_compressed(payload).compressor_id
            header, payload = decompress(header, payload)
            if Compressor(compressor_id).name.lower() not in self._upstream_compressors:
                # The client compressed for us, the upstream does not take that compressor:
                # forward the plain message and compress the reply as mongod would.
                forward = header.encode() + payload
                request.compressor_id = compressor_id
        if header.op_code == OpCode.OP_MSG:
            message = decode_op_msg(header, payload)
            name = command_name(message.body)
            self._note_command(request, name, message.body, 0)
            request.may_stream = message.exhaust_allowed
            if name in HELLO_COMMANDS:
                request.reply_hook = hello_reply_hook(message.body, self._learn_from_hello)
                request.is_work = False
            request.owes_reply = not message.more_to_come
            if request.owes_reply:
                self._await_replies(request, request_id)
            services = self.services
            if name in services.commands:
                reply = await self._run_local_command(name, message)
                await self._answer(request, request_id, message, reply)
                return None
            decision: WriteDecision | None = None
            if name == "aggregate":
                if services.search is not None and services.search.wants(message.body):
                    decision = await self._intercept(request, services.search, name, message)
            elif services.writes is not None and services.writes.wants(name):
                decision = await self._intercept(request, services.writes, name, message)
            if services.search_writes is not None and name in services.search_writes.commands:
                request.after_reply = services.search_writes.after_write(name, message)
            if decision is not None:
                match decision:
                    case AnswerLocally(reply):
                        await self._answer(request, request_id, message, reply)
                        return None
                    case ForwardRewritten(rewritten, hook):
                        # Built by an interceptor (bson, the client's framed documents):
                        # framed already, each document's framing is not checked again.
                        forward = encode_op_msg(rewritten, request_id, 0, framed=True)
                        request.reply_hook = hook
                    case ForwardUnchanged(hook):
                        request.reply_hook = hook
                    case ForwardInParts() as in_parts:
                        request.forwarded_ns = perf_counter_ns()
                        reply = await in_parts.run(self.upstream_message)
                        _replied(request)
                        await self._answer(request, request_id, message, reply)
                        return None
        elif header.op_code == OpCode.OP_QUERY:
            query = decode_op_query(payload)
            is_command = query.full_collection_name.endswith(".$cmd")
            name = command_name(query.query) if is_command else ""
            self._note_command(request, name, query.query, 0)
            if name in HELLO_COMMANDS:
                request.reply_hook = hello_reply_hook(query.query, self._learn_from_hello)
                request.is_work = False
            self._await_replies(request, request_id)
        else:
            self._note_command(request, "", b"", 0)
        return forward

    def _note_command(self, request: InFlight, name: str, message: bytes, body_at: int) -> None:
        """Count the request under its command, and keep where its command document is
        (`message[body_at:]`), for the log lines that name its namespace."""
        if log.isEnabledFor(logging.DEBUG):
            self._log_command(name, message, body_at)
        request.command = counts = self._metrics.for_command(name)
        counts.requests += 1
        request.name = name
        request.message = message
        request.body_at = body_at

    def _log_command(self, name: str, message: bytes, body_at: int) -> None:
        if name:
            self.log.debug("command %s on %s", name, command_namespace(name, message[body_at:]))

    def _finish_round_trip(self, request: InFlight, upstream_ns: int) -> None:
        """The request's round trip is over (its first reply has gone to the client, or
        it owed none): the time modelgate added, and the slow-operation log."""
        total_ns = perf_counter_ns() - request.started_ns
        request.started_ns = 0  # later replies of a stream are not round trips
        self._metrics.added_latency.observe_ns(total_ns - upstream_ns)
        # Awaitable hellos wait upstream by design (maxAwaitTimeMS): never slow.
        if total_ns > self._slow_ns and request.is_work:
            self._log_slow(request, total_ns)

    def _log_slow(self, request: InFlight, total_ns: int) -> None:
        assert request.command is not None
        request.command.slow += 1
        body = request.message[request.body_at :]
        namespace = command_namespace(request.name, body) if body else "?"
        duration_ms = round(total_ns / 1e6, 3)
        inference_ms = round(request.inference_ns / 1e6, 3)
        self._slow_log.warning(
            "slow %s on %s: %.1f ms, %.1f ms of it inference",
            request.name or "request",
            namespace,
            duration_ms,
            inference_ms,
            extra={
                "command": request.name,
                "namespace": namespace,
                "duration_ms": duration_ms,
                "inference_ms": inference_ms,
            },
        )

    def _learn_from_hello(self, reply: dict[str, Any]) -> None:
        # Which compressors the upstream takes: the proxy compresses replies only where
        # it does not.
        self._upstream_compressors = frozenset(reply.get("compression") or ())
        self.upstream_limits = limits_from_hello(reply, self.upstream_limits)

    async def _run_local_command(self, name: str, message: OpMsg) -> dict[str, Any]:
        command = decode_command(message)
        self.log.info("command %s on %s", name, command.get("$db"))
        try:
            return await self.services.commands[name](CommandContext(self), command)
        except ModelgateError as exc:
            self.log.info("command %s failed: %s", name, exc.message)
            return error_reply(exc)

    async def _intercept(
        self,
        request: InFlight,
        interceptor: WriteInterceptor | AggregateInterceptor,
        name: str,
        message: OpMsg,
    ) -> WriteDecision:
        context = CommandContext(self)
        try:
            return await interceptor.intercept(context, name, message)
        except ModelgateError as exc:
            return AnswerLocally(error_reply(exc))
        finally:
            request.inference_ns = context.inference_ns

    async def _answer(
        self, request: InFlight, request_id: int, message: OpMsg, reply: dict[str, Any]
    ) -> None:
        """Answer a request here; a moreToCome request (w:0) gets no reply."""
        if not message.more_to_come:
            data = encode_local_reply(reply, request_id)
            await self.client.send(data)
            self._metrics.sent_bytes += len(data)
            self._await_replies(request)
        self._finish_round_trip(request, 0)

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        return await self.upstream_message(OpMsg(0, bson.encode(document)))

    async def upstream_message(self, message: OpMsg) -> dict[str, Any]:
        """Send `message` on the client's upstream connection and return its reply's body
        (the proxy's own request: the reply never reaches the client)."""
        assert self.upstream is not None
        request_id = next_request_id()
        while request_id in self._in_flight:
            request_id = next_request_id()
        send_channel, receive_channel = trio.open_memory_channel[Frame](1)
        request = InFlight()
        request.internal = send_channel
        self._await_replies(request, request_id)
        try:
            await self.upstream.send(encode_op_msg(message, request_id, 0, framed=True))
            frame = await receive_channel.receive()
        finally:
            # Also when cancelled before the reply came: nothing of it stays behind.
            self._await_replies(request)
        return decode_document(decode_op_msg(frame.header, frame.payload).body)

    # -- upstream -> client ----------------------------------------------------------

    async def _pump_replies(self, cancel_scope: trio.CancelScope) -> None:
        assert self.upstream is not None
        # Locals: this loop runs once per reply, and attribute lookups add up.
        metrics = self._metrics
        observe = metrics.added_latency.observe_ns
        receive, send = self.upstream.receive_message, self.client.send
        in_flight = self._in_flight
        slow_ns = self._slow_ns
        while True:
            try:
                raw = await receive()
            except (trio.BrokenResourceError, OSError, ProtocolError):
                metrics.upstream_lost += 1
                raise
            arrived_ns = perf_counter_ns()
            if raw is None:
                self.log.warning("upstream closed the connection; closing the client's")
                metrics.upstream_lost += 1
                cancel_scope.cancel()
                return
            (response_to,) = _RESPONSE_TO.unpack_from(raw, 8)
            request = in_flight.get(response_to)
            if request is None or request.plain:
                # Sent here, not in a coroutine of its own: that costs as much as the rest.
                # (No request: it answers a request the client gave up on.)
                await send(raw)
                metrics.sent_bytes += len(raw)
                if request is None:
                    continue
                # The one reply of a plain request has gone to the client: its round
                # trip ends (_finish_round_trip, inlined), nothing of it remains.
                total_ns = perf_counter_ns() - request.started_ns
                observe(total_ns - arrived_ns + request.forwarded_ns)
                if total_ns > slow_ns and request.is_work:
                    self._log_slow(request, total_ns)
                if in_flight.get(response_to) is request:
                    del in_flight[response_to]
                request.reply_keys = ()
                if self._draining:
                    self._request_finished.unpark_all()
                continue
            frame = new_frame((unpack_header(raw), raw))
            if request.internal is not None:
                request.internal.send_nowait(frame)
                self._await_replies(request)
                continue
            data, last = client_reply(
                frame, request.reply_hook, request.compressor_id, request.may_stream
            )
            await send(data)
            metrics.sent_bytes += len(data)
            self._reply_passed(request, frame, arrived_ns, last)

    def _reply_passed(self, request: InFlight, frame: Frame, arrived_ns: int, last: bool) -> None:
        """A reply of `request` has gone to the client; after its last, nothing of the
        request remains."""
        if request.after_reply is not None:
            _replied(request)
        if request.started_ns:
            self._finish_round_trip(request, arrived_ns - request.forwarded_ns)
        if last:
            self._await_replies(request)
        else:
            # More replies follow. mongod answers each with responseTo set to the previous
            # reply's id; some servers keep the request's id. Accept both, and only those,
            # so that the stream's last reply leaves nothing behind.
            self._await_replies(request, frame.header.response_to, frame.header.request_id)


def _replied(request: InFlight) -> None:
    """The upstream has answered `request` (or owes no answer): run what waited for it."""
    after_reply, request.after_reply = request.after_reply, None
    if after_reply is not None:
        after_reply()
