"""Bad input, vanished upstreams and shutdown: one connection's trouble stays its own."""

from __future__ import annotations

import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import bson
import pymongo
import pymongo.errors
import pytest
from pymongo import monitoring

from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream, free_port
from proxy.wire.checksum import crc32c

OP_MSG = 2013
# What a driver sees when the proxy closes its connection or has no upstream to offer.
NETWORK_ERRORS = (
    pymongo.errors.AutoReconnect,
    pymongo.errors.ConnectionFailure,
    pymongo.errors.ServerSelectionTimeoutError,
)
# A hang check, not a performance assertion.
PROMPT = 15.0


# -- helpers -----------------------------------------------------------------------------


def frame(op_code: int, payload: bytes, request_id: int = 7, length: int | None = None) -> bytes:
    size = 16 + len(payload) if length is None else length
    return struct.pack("<iiii", size, request_id, 0, op_code) + payload


def op_msg_payload(document: dict, flags: int = 0) -> bytes:  # type: ignore[type-arg]
    return struct.pack("<I", flags) + b"\x00" + bson.encode(document)


def raw_connection(proxy: ProxyProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.settimeout(5)
    return sock


def assert_closed_by_proxy(sock: socket.socket) -> None:
    """The proxy closes the connection: recv sees EOF (or a reset) promptly."""
    started = time.monotonic()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            # A reply to something before the bad bytes may come first; EOF must follow.
            assert time.monotonic() - started < 5, "connection stayed open"
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail("the proxy did not close the connection within 5 s")
    finally:
        sock.close()


def log_offset(proxy: ProxyProcess) -> int:
    return len(proxy.log_text())


def wait_for_log(proxy: ProxyProcess, offset: int, pattern: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        new = proxy.log_text()[offset:]
        match = re.search(pattern, new)
        if match:
            return match.group(0)
        if time.monotonic() > deadline:
            pytest.fail(f"no log line matching {pattern!r}; log since test start:\n{new}")
        time.sleep(0.05)


def assert_still_serving(proxy: ProxyProcess, client: pymongo.MongoClient) -> None:  # type: ignore[type-arg]
    assert proxy.process is not None and proxy.process.poll() is None, "the proxy exited"
    assert client.admin.command("ping")["ok"] == 1
    with pymongo.MongoClient(proxy.uri, serverSelectionTimeoutMS=3000) as fresh:
        assert fresh.admin.command("ping")["ok"] == 1


def upstream_connections(direct: pymongo.MongoClient) -> int:  # type: ignore[type-arg]
    return int(direct.admin.command("serverStatus")["connections"]["current"])


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- bad frames ----------------------------------------------------------------------------


def _malformed_op_msg() -> bytes:
    # flagBits, then a section of kind 7, which OP_MSG does not have.
    return frame(OP_MSG, b"\x00\x00\x00\x00\x07" + b"garbage-garbage-garbage")


def _non_bson_body() -> bytes:
    # A body section holding JSON text where a BSON document belongs.
    return frame(OP_MSG, b"\x00\x00\x00\x00\x00" + b'{"ping": 1, "$db": "admin"}')


def _wrong_checksum() -> bytes:
    payload = op_msg_payload({"ping": 1, "$db": "admin"}, flags=1)
    message = frame(OP_MSG, payload + b"\x00\x00\x00\x00")
    right = crc32c(message[:-4])
    return message[:-4] + struct.pack("<I", right ^ 0xDEADBEEF)


def _oversized() -> bytes:
    return frame(OP_MSG, b"", length=100_000_000)


BAD_FRAMES = {
    "malformed-op-msg": (_malformed_op_msg, r"closing connection: .*unknown kind 7"),
    "non-bson-body": (_non_bson_body, r"closing connection: .*BSON document length"),
    "wrong-checksum": (_wrong_checksum, r"closing connection: .*(?i:checksum|crc)"),
    "oversized": (_oversized, r"closing connection: .*100000000.*exceeds"),
}


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
def test_bad_frame_closes_only_that_connection(kind: str, proxy, client) -> None:
    make, why = BAD_FRAMES[kind]
    assert client.admin.command("ping")["ok"] == 1  # the bystander's connection is open
    offset = log_offset(proxy)
    sock = raw_connection(proxy)
    sock.sendall(make())
    assert_closed_by_proxy(sock)
    wait_for_log(proxy, offset, why)
    assert_still_serving(proxy, client)


def test_truncated_frame_then_close(proxy, client) -> None:
    assert client.admin.command("ping")["ok"] == 1
    offset = log_offset(proxy)
    sock = raw_connection(proxy)
    whole = frame(OP_MSG, op_msg_payload({"ping": 1, "$db": "admin"}))
    sock.sendall(whole[: len(whole) // 2])
    sock.shutdown(socket.SHUT_WR)
    assert_closed_by_proxy(sock)
    wait_for_log(proxy, offset, r"closing connection: connection closed in the middle of a frame")
    assert_still_serving(proxy, client)


def test_bson_framed_body_with_bad_contents_gets_the_upstreams_error(proxy, client) -> None:
    """Bytes are forwarded untouched, so a document that is framed like BSON but holds an
    unknown element type is the upstream's to judge: the client gets its error reply."""
    bad_document = struct.pack("<i", 12) + b"\x99a\x00" + b"\x01\x02\x03\x04" + b"\x00"
    with raw_connection(proxy) as sock:
        sock.sendall(frame(OP_MSG, struct.pack("<I", 0) + b"\x00" + bad_document, request_id=5))
        header = sock.recv(16, socket.MSG_WAITALL)
        length, _, response_to, _ = struct.unpack("<iiii", header)
        reply = bson.decode(sock.recv(length - 16, socket.MSG_WAITALL)[5:])
    assert response_to == 5
    assert reply["ok"] == 0
    assert_still_serving(proxy, client)


def test_unknown_opcode_is_forwarded_and_the_proxy_stays_up(proxy, client) -> None:
    sock = raw_connection(proxy)
    sock.sendall(frame(4242, b"\x00" * 32))
    # The upstream decides what an unknown opcode gets (most close the connection);
    # whatever it decides, only this connection is concerned.
    sock.settimeout(3)
    try:
        sock.recv(65536)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert_still_serving(proxy, client)


def test_valid_raw_op_msg_gets_a_reply(proxy) -> None:
    """The raw-socket helpers above speak the protocol correctly: a good frame is answered."""
    with raw_connection(proxy) as sock:
        sock.sendall(frame(OP_MSG, op_msg_payload({"ping": 1, "$db": "admin"}), request_id=99))
        header = sock.recv(16, socket.MSG_WAITALL)
        length, _, response_to, op_code = struct.unpack("<iiii", header)
        body = sock.recv(length - 16, socket.MSG_WAITALL)
    assert (response_to, op_code) == (99, OP_MSG)
    assert bson.decode(body[5:])["ok"] == 1


def test_disconnect_mid_request_leaves_nothing_behind(tmp_path: Path) -> None:
    # An upstream and a proxy of its own: nothing else opens or closes connections
    # to it while the test counts them.
    with (
        EmbeddedUpstream(":memory:") as upstream,
        ProxyProcess(
            upstream.uri, tmp_path / "modelgate.log", args=("--data-dir", str(tmp_path))
        ) as proxy,
        pymongo.MongoClient(upstream.uri) as direct,
        pymongo.MongoClient(proxy.uri) as client,
    ):
        _disconnect_mid_request(proxy, client, direct)


def _disconnect_mid_request(proxy, client, direct) -> None:  # type: ignore[no-untyped-def]
    assert client.admin.command("ping")["ok"] == 1
    # Let the proxy's own registry connections settle before counting.
    time.sleep(1)
    baseline = upstream_connections(direct)
    sockets = [raw_connection(proxy) for _ in range(5)]
    # Each client connection has its own upstream connection while it is open.
    assert wait_until(lambda: upstream_connections(direct) >= baseline + 5), (
        upstream_connections(direct),
        baseline,
    )
    whole = frame(OP_MSG, op_msg_payload({"insert": "x", "documents": [{}], "$db": "t_mid"}))
    for sock in sockets:
        sock.sendall(whole[:20])
        sock.close()
    assert wait_until(lambda: upstream_connections(direct) <= baseline), (
        upstream_connections(direct),
        baseline,
    )
    assert_still_serving(proxy, client)


# -- the upstream --------------------------------------------------------------------------


def test_unreachable_upstream_fails_promptly(tmp_path: Path) -> None:
    dead = f"mongodb://127.0.0.1:{free_port()}/"
    proxy = ProxyProcess(
        dead,
        tmp_path / "modelgate.log",
        args=("--connect-timeout", "1", "--data-dir", str(tmp_path)),
    )
    proxy.start(wait=False)
    try:
        assert wait_until(lambda: port_accepts(proxy.port), timeout=20), proxy.log_text()
        started = time.monotonic()
        with (
            pymongo.MongoClient(proxy.uri, serverSelectionTimeoutMS=2000) as client,
            pytest.raises(NETWORK_ERRORS),
        ):
            client.admin.command("ping")
        assert time.monotonic() - started < PROMPT
        assert proxy.process is not None and proxy.process.poll() is None
        assert "closing client connection" in proxy.log_text()
    finally:
        assert proxy.stop() == 0


def test_vanished_upstream_gives_network_errors_then_recovers(
    own_upstream: EmbeddedUpstream, tmp_path: Path
) -> None:
    args = ("--connect-timeout", "1", "--data-dir", str(tmp_path))
    with (
        ProxyProcess(own_upstream.uri, tmp_path / "modelgate.log", args=args) as proxy,
        pymongo.MongoClient(
            proxy.uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
        ) as client,
    ):
        things = client.t_vanish.things
        things.insert_one({"n": 1})
        assert things.count_documents({}) == 1

        own_upstream.kill()
        started = time.monotonic()
        with pytest.raises(NETWORK_ERRORS):
            things.insert_one({"n": 2})
        with pytest.raises(NETWORK_ERRORS):
            things.find_one({})
        assert time.monotonic() - started < PROMPT
        assert proxy.process is not None and proxy.process.poll() is None

        # Same port, fresh (in-memory) data: new connections through the same proxy work.
        own_upstream.start()

        def works() -> bool:
            try:
                things.insert_one({"n": 3})
                return True
            except NETWORK_ERRORS:
                return False

        assert wait_until(works, timeout=20, interval=0.2)
        assert [doc["n"] for doc in things.find({}, {"_id": 0})] == [3]
        assert "upstream" in proxy.log_text()


# -- shutdown ------------------------------------------------------------------------------


def test_sigterm_with_an_idle_client_exits_promptly(upstream_uri: str, tmp_path: Path) -> None:
    proxy = ProxyProcess(
        upstream_uri,
        tmp_path / "modelgate.log",
        args=("--grace-period", "20", "--data-dir", str(tmp_path)),
    ).start()
    # A short server selection timeout: closing the client after the proxy is gone
    # otherwise spends 30 s trying to send endSessions.
    with pymongo.MongoClient(proxy.uri, serverSelectionTimeoutMS=2000) as client:
        assert client.admin.command("ping")["ok"] == 1
        time.sleep(0.5)  # the driver's monitor now has an awaitable hello waiting
        assert proxy.process is not None
        process = proxy.process
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
        elapsed = time.monotonic() - started
        proxy.process = None
    assert returncode == 0
    # Idle connections have nothing in flight: no waiting out the 20 s grace period.
    assert elapsed < 8, f"took {elapsed:.1f}s"
    assert not port_accepts(proxy.port)
    assert "modelgate stopped" in proxy.log_text()


class _InsertWatcher(monitoring.CommandListener):
    """Knows when the driver has sent the insert and when its reply came."""

    def __init__(self) -> None:
        self.sent = threading.Event()
        self.replied_at: float | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            self.sent.set()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name == "insert":
            self.replied_at = time.monotonic()

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_sigterm_lets_the_request_in_flight_finish(
    upstream_uri: str, direct, db_name: str, tmp_path: Path
) -> None:
    proxy = ProxyProcess(
        upstream_uri,
        tmp_path / "modelgate.log",
        args=("--grace-period", "60", "--data-dir", str(tmp_path)),
    ).start()
    count = 8_000
    watcher = _InsertWatcher()
    outcome: dict[str, object] = {}
    documents = [{"i": i, "pad": "x" * 200} for i in range(count)]

    def insert() -> None:
        try:
            with pymongo.MongoClient(
                proxy.uri, event_listeners=[watcher], serverSelectionTimeoutMS=2000
            ) as client:
                client.admin.command("ping")
                outcome["inserted"] = len(client[db_name].big.insert_many(documents).inserted_ids)
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=insert)
    worker.start()
    try:
        assert watcher.sent.wait(20), "the driver never sent the insert"
        time.sleep(0.2)  # the ~5 MB message is on its way; SecantusDB takes seconds on it
        assert proxy.process is not None
        signalled_at = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        returncode = proxy.process.wait(timeout=60)
    finally:
        worker.join(60)
        proxy.stop()
    assert "error" not in outcome, outcome
    assert outcome["inserted"] == count
    # The reply came after the signal: the request really was in flight during shutdown.
    assert watcher.replied_at is not None and watcher.replied_at > signalled_at
    assert returncode == 0
    assert direct[db_name].big.count_documents({}) == count
    assert not port_accepts(proxy.port)
