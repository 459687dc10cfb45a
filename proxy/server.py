"""The trio listener: one task per client connection, the limits on what connections
may cost (--max-connections, --frame-timeout), and a two-phase shutdown."""

from __future__ import annotations

import itertools
import logging
import math
import resource
import ssl
from pathlib import Path

import trio

from proxy.framed import FramedStream
from proxy.logs import ConnectionLog
from proxy.session import Session, SessionServices
from proxy.settings import Settings

__all__ = [
    "ListenError",
    "ProxyServer",
    "RefusalLog",
    "allow_file_descriptors",
    "listener_tls_context",
    "open_listeners",
]

log = logging.getLogger(__name__)


class ListenError(Exception):
    """An address modelgate was told to listen on cannot be taken."""


async def open_listeners(host: str, port: int, serving: str) -> list[trio.SocketListener]:
    """TCP listeners on host:port, or a ListenError that says which address and what for."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {host}:{port} for {serving}: {exc.strerror or exc}"
        ) from None


# Descriptors beside the two per client connection (client and upstream sockets): the
# listeners, the proxy's own MongoDB client, the image cache, model files, logs.
_SPARE_FILE_DESCRIPTORS = 256


def allow_file_descriptors(max_connections: int) -> None:
    """Raise the soft limit on open files to what `max_connections` needs (within the
    hard limit; many systems start processes at 1,024), or warn that it cannot be had:
    past the limit, accepting fails instead of the clean refusal."""
    needed = 2 * max_connections + _SPARE_FILE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if soft < needed:
            log.warning(
                "--max-connections %d needs about %d open files, but the limit is %d: "
                "connections past about %d will fail to be accepted",
                max_connections,
                needed,
                soft,
                (soft - _SPARE_FILE_DESCRIPTORS) // 2,
            )


class RefusalLog:
    """Logs refused connections at most once per `interval` seconds, with how many were
    refused since the last line: a flood of connections past the limit must not become a
    flood of log lines."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._unlogged = 0
        self._next_line_at = -math.inf

    def refused(self, open_connections: int) -> None:
        self._unlogged += 1
        now = trio.current_time()
        if now < self._next_line_at:
            return
        log.warning(
            "refusing new connections: %d open, the limit (--max-connections); "
            "%d refused since the last such line",
            open_connections,
            self._unlogged,
        )
        self._unlogged = 0
        self._next_line_at = now + self.interval


def listener_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class ProxyServer:
    """Accepts clients and runs a Session for each; `shutdown` stops accepting, lets the
    requests in flight finish within a grace period, then cancels what is left.

    Past `max_connections` open connections, a new one is closed as soon as it is
    accepted, before any upstream connection is opened for it (as mongod does past
    maxIncomingConnections). A client's frames, and its TLS handshake, must complete
    within `frame_timeout` seconds of their start."""

    def __init__(
        self,
        services: SessionServices,
        host: str,
        port: int,
        tls_context: ssl.SSLContext | None = None,
        *,
        max_connections: int = Settings.max_connections,
        frame_timeout: float = Settings.frame_timeout,
    ) -> None:
        self.services = services
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.frame_timeout = frame_timeout
        self.sessions: set[Session] = set()
        services.metrics.requests_in_flight = self.requests_in_flight
        self._connection_ids = itertools.count(1)
        self._accept_scope = trio.CancelScope()
        self._refusals = RefusalLog()

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        allow_file_descriptors(self.max_connections)
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
            await open_listeners(self.host, self.port, "MongoDB clients")
        )
        addresses = [listener.socket.getsockname()[:2] for listener in listeners]  # type: ignore[attr-defined]
        if self.tls_context is not None:
            listeners = [
                trio.SSLListener(listener, self.tls_context, https_compatible=False)
                for listener in listeners
            ]
        async with trio.open_nursery() as nursery:
            with self._accept_scope:
                task_status.started(addresses)
                await trio.serve_listeners(self._serve_client, listeners, handler_nursery=nursery)

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        metrics = self.services.metrics
        metrics.connections_accepted += 1
        if metrics.connections_open >= self.max_connections:
            metrics.refused_max_connections += 1
            self._refusals.refused(metrics.connections_open)
            await trio.aclose_forcefully(stream)
            return
        metrics.connections_open += 1
        try:
            await self._serve_connection(next(self._connection_ids), stream)
        finally:
            metrics.connections_open -= 1

    async def _serve_connection(self, connection_id: int, stream: trio.abc.Stream) -> None:
        connection_log = ConnectionLog(log, connection_id)
        if isinstance(stream, trio.SSLStream):
            failure: object = None
            with trio.move_on_after(self.frame_timeout) as handshake:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    failure = exc.__cause__ or exc
            if handshake.cancelled_caught:
                failure = f"not completed within {self.frame_timeout:g} s (--frame-timeout)"
            if failure is not None:
                connection_log.warning("TLS handshake failed: %s", failure)
                self.services.metrics.refused_tls_handshake += 1
                await trio.aclose_forcefully(stream)
                return
        session = Session(connection_id, FramedStream(stream, self.frame_timeout), self.services)
        self.sessions.add(session)
        connection_log.debug("accepted")
        try:
            await session.run()
        except Exception:
            # Whatever one connection runs into must never take the listener down.
            connection_log.exception("closing connection after an unexpected error")
        finally:
            self.sessions.discard(session)

    def requests_in_flight(self) -> int:
        """Requests owed a reply, over every session."""
        return sum(session.requests_in_flight for session in self.sessions)

    async def shutdown(self, grace_period: float) -> None:
        self._accept_scope.cancel()
        log.info(
            "shutting down: %d connections, %d requests in flight; waiting up to %gs for them",
            len(self.sessions),
            self.requests_in_flight(),
            grace_period,
        )
        with trio.move_on_after(grace_period):
            async with trio.open_nursery() as nursery:
                for session in list(self.sessions):
                    nursery.start_soon(session.drain)
        for session in list(self.sessions):
            session.cancel()
