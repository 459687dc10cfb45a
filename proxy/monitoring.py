"""The operations listener (--metrics-listen): Prometheus `/metrics`, and the `/healthz`
and `/readyz` probes, over HTTP.

A small HTTP/1.1 responder on a trio listener rather than a server in a thread: it reads
what the event loop owns (the model set, the metrics) without locks, and its only
blocking step, the upstream ping of `/readyz`, runs in a worker thread under a timeout.
One request per connection (`Connection: close`): probes open one per check, and
Prometheus reconnects for each scrape when told to close."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pymongo
import pymongo.errors
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from engine.models import ModelSet
from proxy.server import open_listeners

__all__ = ["MonitoringServer", "Readiness"]

log = logging.getLogger(__name__)

# A readiness check: None when ready, else why not (the body of the 503).
ReadinessCheck = Callable[[], Awaitable[str | None]]

_TEXT = "text/plain; charset=utf-8"
_MAX_REQUEST_HEAD = 8192
# A client that has not sent a whole request head by then is dropped, so that idle
# connections cannot pile up tasks.
_REQUEST_TIMEOUT = 10.0
# Probes give up after a second or a few (Kubernetes' default is 1 s): a ping that takes
# longer than this counts as an upstream that does not answer.
_PING_TIMEOUT = 2.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Readiness:
    """Ready: the upstream answers a ping, and the model registry has been read once
    (before that, writes would go through without the models registered earlier), and
    the process is not shutting down."""

    def __init__(self, client: pymongo.MongoClient[Any], models: ModelSet) -> None:
        self.client = client
        self.models = models
        self.stopping = False
        # One ping at a time, in a thread of its own: probes must not take the worker
        # threads that model runs and registry reads wait for.
        self._ping_limiter = trio.CapacityLimiter(1)

    async def __call__(self) -> str | None:
        if self.stopping:
            return "shutting down"
        try:
            await trio.to_thread.run_sync(
                self._ping, limiter=self._ping_limiter, abandon_on_cancel=True
            )
        except pymongo.errors.PyMongoError as exc:
            return f"upstream unreachable: {_one_line(exc)}"
        if not self.models.registry_loaded:
            return "model registry not loaded yet"
        return None

    def _ping(self) -> None:
        with pymongo.timeout(_PING_TIMEOUT):
            self.client.admin.command("ping")


def _one_line(exc: Exception) -> str:
    # pymongo's server selection errors go on with the whole topology description.
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class MonitoringServer:
    def __init__(
        self, registry: CollectorRegistry, readiness: ReadinessCheck, host: str, port: int
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.port = port

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await open_listeners(self.host, self.port, "monitoring")
        task_status.started([listener.socket.getsockname()[:2] for listener in listeners])
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(_REQUEST_TIMEOUT):
                    head = await _read_request_head(stream)
                if head is None:
                    return
                status, content_type, body = await self._answer(head)
                method = head.split(b" ", 1)[0]
                await stream.send_all(_response(status, content_type, body, method == b"HEAD"))
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the client went away or never asked; nothing to answer
            except Exception:
                # Whatever one request runs into must never take the listener down.
                log.exception("monitoring request failed")

    async def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/"):
            return 400, _TEXT, b"bad request\n"
        method, target, _ = request_line
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"only GET and HEAD\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        reason = await self.readiness()
        if reason is None:
            return 200, _TEXT, b"ready\n"
        return 503, _TEXT, f"not ready: {reason}\n".encode()


async def _read_request_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers (a GET has no body). None if the client closes first
    or sends more than a probe or a scraper ever would (it is dropped unanswered)."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > _MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        head += chunk
    return head


def _response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    headers = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return headers.encode("latin-1") + (b"" if head_only else body)
