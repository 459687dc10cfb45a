"""Bounded cost per connection, end to end: idle connections and clients that trickle a
frame a byte at a time do not stop other clients, the frame timeout closes the slow ones,
and --max-connections refuses what is past it while the connections within it work."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest

from bench.support.processes import ProxyProcess
from bench.support.raw_clients import SlowFrameSender, open_pinged_connection, ping

# Guards against a hang, never a measure: the slow clients go after about 1 s.
GIVE_UP_AFTER_S = 60.0


def _address(proxy: ProxyProcess) -> tuple[str, int]:
    return ("127.0.0.1", proxy.port)


@pytest.fixture
def limited_proxy(upstream_uri: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    args = ("--data-dir", str(tmp_path), "--frame-timeout", "1", "--max-connections", "220")
    with ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=args) as process:
        yield process


def test_idle_and_slow_clients_leave_others_served_and_slow_ones_are_closed(
    limited_proxy: ProxyProcess,
) -> None:
    address = _address(limited_proxy)
    idle = [open_pinged_connection(address) for _ in range(200)]
    slow = [SlowFrameSender(address) for _ in range(4)]
    try:
        with pymongo.MongoClient(limited_proxy.uri, maxPoolSize=1) as client:
            pings = 0
            deadline = time.monotonic() + GIVE_UP_AFTER_S
            while any(sender.step() for sender in slow):
                assert client.admin.command("ping")["ok"] == 1
                pings += 1
                assert time.monotonic() < deadline, "the slow clients were never closed"
                time.sleep(0.1)
            assert pings > 0
            assert client.admin.command("ping")["ok"] == 1
        # The idle connections were left alone: idle time between frames is not limited.
        for sock in idle[:20]:
            ping(sock)
    finally:
        for sock in idle:
            sock.close()
        for sender in slow:
            sender.close()
    assert limited_proxy.log_text().count("frame not completed within 1 s") == len(slow)


def test_connections_past_max_connections_are_refused_and_those_within_work(
    upstream_uri: str, tmp_path: Path
) -> None:
    args = ("--data-dir", str(tmp_path), "--max-connections", "3")
    with ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=args) as proxy:
        address = _address(proxy)
        within = _three_connections(address)
        try:
            for _ in range(2):
                with socket.create_connection(address, timeout=30) as refused:
                    assert _closed_by_server(refused)
            for sock in within:
                ping(sock)
        finally:
            for sock in within:
                sock.close()
        assert "refusing new connections: 3 open" in proxy.log_text()


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _three_connections(address: tuple[str, int]) -> list[socket.socket]:
    """Three connections that have each made a round trip. The start-up check's driver
    connections may take a moment to be counted out, so a refused one is retried."""
    within: list[socket.socket] = []
    deadline = time.monotonic() + GIVE_UP_AFTER_S
    while len(within) < 3:
        try:
            within.append(open_pinged_connection(address))
        except ConnectionError:
            assert time.monotonic() < deadline, "connections within the limit were refused"
            time.sleep(0.1)
    return within
