"""The wire front's metrics and slow-operation log, driven through a Session over memory
streams (and a real listener for the connection counts): what each request moves."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
import trio
import trio.testing

from proxy.framed import FramedStream
from proxy.inline import InlineWrites
from proxy.metrics import ProxyMetrics
from proxy.server import ProxyServer
from proxy.session import CommandContext, Session
from proxy.upstream import UpstreamTarget
from proxy.wire.framing import Frame
from proxy.wire.opmsg import EXHAUST_ALLOWED, MORE_TO_COME
from tests.proxy.test_inline import _Served, _server
from tests.proxy.test_session import _exhaust_stream
from tests.proxy.wired_session import (
    answer_ok,
    body_of,
    op_msg,
    services,
    upstream_reply,
    wired_session,
)

PING = {"ping": 1, "$db": "admin"}
FIND = {"find": "coll", "filter": {"x": 1}, "$db": "db"}
INSERT = {"insert": "coll", "documents": [{"_id": 1, "x": [1.0, 0.0, 0.0, 0.0]}], "$db": "db"}
UNREACHABLE = "upstream_unreachable"
# Far above any round trip over memory streams: no request is slow under it.
NEVER_SLOW_MS = 60_000.0


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def command_labels(metrics: ProxyMetrics) -> set[str]:
    (family,) = [f for f in metrics.registry.collect() if f.name == "modelgate_requests"]
    return {s.labels["command"] for s in family.samples if s.name.endswith("_total")}


async def test_requests_are_counted_by_command_with_unknown_names_as_other() -> None:
    metrics = ProxyMetrics()
    requests = [op_msg(PING, 1), op_msg(FIND, 2), op_msg({"frob": 1, "$db": "a"}, 3)]
    requests.append(op_msg({"nitz": 1, "$db": "a"}, 4))
    async with wired_session(metrics=metrics) as wired:
        replies = [await wired.round_trip(request) for request in requests]
    assert sample(metrics, "modelgate_requests_total", command="ping") == 1
    assert sample(metrics, "modelgate_requests_total", command="find") == 1
    assert sample(metrics, "modelgate_requests_total", command="other") == 2
    # Client-chosen names never become labels.
    assert command_labels(metrics) == {"ping", "find", "other"}
    assert sample(metrics, "modelgate_received_bytes_total") == sum(map(len, requests))
    assert sample(metrics, "modelgate_sent_bytes_total") == sum(len(r.raw) for r in replies)
    assert sample(metrics, "modelgate_added_latency_seconds_count") == len(requests)
    # What the proxy adds is part of each round trip, never less than nothing.
    assert sample(metrics, "modelgate_added_latency_seconds_sum") > 0
    assert sample(metrics, "modelgate_slow_requests_total", command="ping") == 0


async def _say_hello(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    return {"ok": 1.0, "greeting": "hello"}


async def test_admin_command_is_labelled_by_its_name_and_its_reply_counted() -> None:
    metrics = ProxyMetrics(admin_commands={"sayHello"})
    async with wired_session(commands={"sayHello": _say_hello}, metrics=metrics) as wired:
        reply = await wired.round_trip(op_msg({"sayHello": 1, "$db": "admin"}, 5))
    assert sample(metrics, "modelgate_requests_total", command="sayHello") == 1
    assert sample(metrics, "modelgate_sent_bytes_total") == len(reply.raw)
    assert sample(metrics, "modelgate_added_latency_seconds_count") == 1


async def test_unacknowledged_write_counts_a_request_and_sends_nothing() -> None:
    metrics = ProxyMetrics()
    w0 = op_msg({**INSERT, "writeConcern": {"w": 0}}, 6, 0, MORE_TO_COME)
    async with wired_session(metrics=metrics) as wired:
        await wired.client.send(w0)
        await trio.testing.wait_all_tasks_blocked()
        assert len(wired.upstream.received) == 1
    assert sample(metrics, "modelgate_requests_total", command="insert") == 1
    assert sample(metrics, "modelgate_received_bytes_total") == len(w0)
    assert sample(metrics, "modelgate_sent_bytes_total") == 0
    assert sample(metrics, "modelgate_added_latency_seconds_count") == 1


async def test_exhaust_stream_is_one_round_trip_and_all_its_bytes() -> None:
    metrics = ProxyMetrics()
    get_more = {"getMore": 42, "collection": "coll", "$db": "db"}
    async with wired_session(_exhaust_stream(True), metrics=metrics) as wired:
        await wired.client.send(op_msg(get_more, 7, 0, EXHAUST_ALLOWED))
        replies = [await wired.next_frame() for _ in range(3)]
    assert sample(metrics, "modelgate_requests_total", command="getMore") == 1
    assert sample(metrics, "modelgate_sent_bytes_total") == sum(len(r.raw) for r in replies)
    assert sample(metrics, "modelgate_added_latency_seconds_count") == 1


def _slow_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "proxy.slow"]


async def test_slow_request_is_logged_with_its_command_namespace_and_durations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ProxyMetrics()
    hello = {"hello": 1, "$db": "admin"}
    with caplog.at_level(logging.WARNING, logger="proxy.slow"):
        async with wired_session(metrics=metrics, slow_ms=0) as wired:
            await wired.round_trip(op_msg(FIND, 8))
            # A hello may wait upstream by design (awaitable hello): never slow.
            await wired.round_trip(op_msg(hello, 9))
    (record,) = _slow_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.connection_id == 1  # type: ignore[attr-defined]
    assert record.command == "find"  # type: ignore[attr-defined]
    assert record.namespace == "db.coll"  # type: ignore[attr-defined]
    assert record.duration_ms > 0  # type: ignore[attr-defined]
    assert record.inference_ms == 0  # type: ignore[attr-defined]
    assert "slow find on db.coll" in record.getMessage()
    # Never the document's contents.
    assert "filter" not in record.getMessage()
    assert sample(metrics, "modelgate_slow_requests_total", command="find") == 1
    assert sample(metrics, "modelgate_slow_requests_total", command="hello") == 0


def _hold_finds(frame: Frame) -> list[bytes]:
    """An upstream that answers everything at once but a find, which the test answers."""
    return [] if "find" in body_of(frame) else answer_ok(frame)


async def test_request_held_upstream_past_the_threshold_is_slow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ProxyMetrics()
    with caplog.at_level(logging.WARNING, logger="proxy.slow"):
        async with wired_session(_hold_finds, metrics=metrics, slow_ms=1.0) as wired:
            await wired.client.send(op_msg(FIND, 10))
            await trio.testing.wait_all_tasks_blocked()
            (held,) = wired.upstream.received
            # Held for at least twice the threshold before the upstream answers.
            await trio.sleep(0.002)
            await wired.upstream.send(upstream_reply({"ok": 1.0}, held.header.request_id))
            assert (await wired.next_frame()).header.response_to == 10
    (record,) = _slow_records(caplog)
    assert record.command == "find"  # type: ignore[attr-defined]
    assert record.duration_ms >= 2.0  # type: ignore[attr-defined]
    assert sample(metrics, "modelgate_slow_requests_total", command="find") == 1


async def test_requests_under_the_threshold_are_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ProxyMetrics()
    with caplog.at_level(logging.WARNING, logger="proxy.slow"):
        async with wired_session(metrics=metrics, slow_ms=NEVER_SLOW_MS) as wired:
            await wired.round_trip(op_msg(FIND, 13))
            await wired.round_trip(op_msg(PING, 14))
    assert _slow_records(caplog) == []
    assert sample(metrics, "modelgate_slow_requests_total", command="find") == 0
    assert sample(metrics, "modelgate_requests_total", command="find") == 1


async def test_inference_time_of_an_inline_write_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ProxyMetrics()
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="proxy.slow"):
        async with wired_session(writes=writes, metrics=metrics, slow_ms=0) as wired:
            await wired.round_trip(op_msg(INSERT, 11))
    (record,) = _slow_records(caplog)
    assert record.command == "insert"  # type: ignore[attr-defined]
    assert 0 < record.inference_ms <= record.duration_ms  # type: ignore[attr-defined]
    assert sample(metrics, "modelgate_requests_total", command="insert") == 1


async def test_upstream_that_hangs_up_mid_session_counts_as_lost() -> None:
    metrics = ProxyMetrics()
    async with wired_session(metrics=metrics) as wired:
        await wired.round_trip(op_msg(PING, 12))
        # The upstream's end of the connection says it will send nothing more.
        upstream_end = wired.upstream.stream.stream
        assert isinstance(upstream_end, trio.StapledStream)
        await upstream_end.send_stream.aclose()
        assert await wired.client.receive_frame() is None
    assert sample(metrics, "modelgate_upstream_errors_total", kind="lost") == 1
    assert sample(metrics, "modelgate_upstream_errors_total", kind="connect") == 0


def _unreachable_target() -> UpstreamTarget:
    """A port nothing listens on (bound, then closed): connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return UpstreamTarget.from_uri(f"mongodb://127.0.0.1:{port}", connect_timeout=5.0)


async def test_client_of_an_unreachable_upstream_is_refused() -> None:
    metrics = ProxyMetrics()
    served = services(metrics=metrics)
    served.upstream = _unreachable_target()
    driver_end, proxy_end = trio.testing.memory_stream_pair()
    await Session(1, FramedStream(proxy_end), served).run()
    assert await FramedStream(driver_end).receive_frame() is None
    assert sample(metrics, "modelgate_connections_refused_total", reason=UNREACHABLE) == 1
    assert sample(metrics, "modelgate_upstream_errors_total", kind="connect") == 1
    assert sample(metrics, "modelgate_upstream_connects_total") == 0


async def test_listener_counts_connections_accepted_and_open() -> None:
    metrics = ProxyMetrics()
    served = services(metrics=metrics)
    served.upstream = _unreachable_target()
    server = ProxyServer(served, "127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        ((host, port),) = await nursery.start(server.run)
        for _ in range(2):
            client = await trio.open_tcp_stream(host, port)
            assert await client.receive_some(1) == b""  # closed: no upstream
            await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert sample(metrics, "modelgate_connections_accepted_total") == 2
        assert sample(metrics, "modelgate_connections_open") == 0
        assert sample(metrics, "modelgate_connections_refused_total", reason=UNREACHABLE) == 2
        nursery.cancel_scope.cancel()


def test_latency_buckets_count_a_duration_at_or_under_each_bound() -> None:
    metrics = ProxyMetrics()
    for duration_ns in (100_000, 100_001, 20_000_000_000):  # 0.1 ms, just past, 20 s
        metrics.added_latency.observe_ns(duration_ns)

    def bucket(bound: str) -> float:
        return sample(metrics, "modelgate_added_latency_seconds_bucket", le=bound)

    assert (bucket("5e-05"), bucket("0.0001"), bucket("0.00025")) == (0, 1, 2)
    assert (bucket("10.0"), bucket("+Inf")) == (2, 3)
    assert sample(metrics, "modelgate_added_latency_seconds_sum") == pytest.approx(20.000200001)
