"""The trio listener: one task per client connection, and a two-phase shutdown."""

from __future__ import annotations

import itertools
import logging
import ssl
from pathlib import Path

import trio

from proxy.framed import FramedStream
from proxy.logs import ConnectionLog
from proxy.session import Session, SessionServices

__all__ = ["ListenError", "ProxyServer", "listener_tls_context", "open_listeners"]

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


def listener_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class ProxyServer:
    """Accepts clients and runs a Session for each; `shutdown` stops accepting, lets the
    requests in flight finish within a grace period, then cancels what is left."""

    def __init__(
        self,
        services: SessionServices,
        host: str,
        port: int,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.services = services
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.sessions: set[Session] = set()
        services.metrics.requests_in_flight = self.requests_in_flight
        self._connection_ids = itertools.count(1)
        self._accept_scope = trio.CancelScope()

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
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
        metrics.connections_open += 1
        try:
            await self._serve_connection(next(self._connection_ids), stream)
        finally:
            metrics.connections_open -= 1

    async def _serve_connection(self, connection_id: int, stream: trio.abc.Stream) -> None:
        connection_log = ConnectionLog(log, connection_id)
        if isinstance(stream, trio.SSLStream):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                connection_log.warning("TLS handshake failed: %s", exc.__cause__ or exc)
                self.services.metrics.refused_tls_handshake += 1
                await trio.aclose_forcefully(stream)
                return
        session = Session(connection_id, FramedStream(stream), self.services)
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
