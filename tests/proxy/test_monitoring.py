"""The operations listener over real HTTP (httpx) on loopback: what each endpoint answers,
and that bad requests and failing collectors never take it down. Readiness against a real
upstream is in tests/e2e/test_monitoring.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.monitoring import MonitoringServer


class Readiness:
    """A readiness check the test sets: None is ready."""

    def __init__(self) -> None:
        self.reason: str | None = None

    async def __call__(self) -> str | None:
        return self.reason


class Listener:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness, port: int) -> None:
        self.registry = registry
        self.readiness = readiness
        self.base_url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def listener(nursery: trio.Nursery) -> AsyncIterator[Listener]:
    registry = CollectorRegistry()
    readiness = Readiness()
    server = MonitoringServer(registry, readiness, "127.0.0.1", 0)
    [(_, port)] = await nursery.start(server.run)
    yield Listener(registry, readiness, port)
    nursery.cancel_scope.cancel()


async def get(listener: Listener, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(base_url=listener.base_url) as http:
        return await http.request(method, path)


async def raw_exchange(listener: Listener, request: bytes) -> bytes:
    port = int(listener.base_url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        await stream.send_eof()
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


async def test_metrics_is_the_registry_in_prometheus_text(listener: Listener) -> None:
    requests = Counter("demo_requests", "requests", ["command"], registry=listener.registry)
    requests.labels("ping").inc(3)
    response = await get(listener, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    [total] = [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "demo_requests_total"
    ]
    assert total.labels == {"command": "ping"} and total.value == 3


async def test_healthz_and_readyz(listener: Listener) -> None:
    health = await get(listener, "/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    assert (await get(listener, "/readyz")).status_code == 200
    listener.readiness.reason = "model registry not loaded yet"
    not_ready = await get(listener, "/readyz")
    assert not_ready.status_code == 503
    assert not_ready.text == "not ready: model registry not loaded yet\n"
    # Liveness does not follow readiness: the process still serves.
    assert (await get(listener, "/healthz")).status_code == 200


async def test_head_has_the_headers_and_no_body(listener: Listener) -> None:
    answer = await raw_exchange(listener, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 3" in head and body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (b"GET /nothing HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 405 "),
        (b"\x16\x03\x01 not http\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    ],
    ids=["unknown-path", "post", "not-http"],
)
async def test_bad_requests_get_an_answer(
    listener: Listener, request_bytes: bytes, status_line: bytes
) -> None:
    assert (await raw_exchange(listener, request_bytes)).startswith(status_line)


async def test_clients_that_leave_or_overflow_and_failing_collectors_leave_it_serving(
    listener: Listener,
) -> None:
    assert await raw_exchange(listener, b"GET /hea") == b""  # closes before the request ends
    try:  # dropped unanswered: closed, or reset since the rest was never read
        overflow = await raw_exchange(listener, b"GET /healthz HTTP/1.1\r\nX: " + b"y" * 100_000)
    except trio.BrokenResourceError:
        overflow = b""
    assert overflow == b""

    class Broken(Collector):
        def collect(self) -> Iterable[object]:  # type: ignore[override]
            raise RuntimeError("collector bug")

    listener.registry.register(Broken())
    assert await raw_exchange(listener, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    assert (await get(listener, "/healthz")).status_code == 200
