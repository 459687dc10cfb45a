"""`modelgate serve` with no upstream starts SecantusDB itself and keeps its data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pymongo
import pytest

from bench.support.processes import ROOT, ProxyProcess


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`modelgate serve ARGS` run to its end (for --help and refused arguments)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def test_help_mentions_upstream_and_environment_variables() -> None:
    result = _serve("--help")
    assert result.returncode == 0, result.stderr
    assert "--upstream" in result.stdout
    for variable in ("MODELGATE_UPSTREAM", "MODELGATE_LISTEN", "MODELGATE_DATA_DIR"):
        assert variable in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--lease-seconds", "-1"],
            {},
            "argument --lease-seconds: expected more than zero, got '-1'",
        ),
        (["--max-concurrent-runs", "0"], {}, "expected more than zero, got '0'"),
        (
            ["--retry-backoff", "soon"],
            {},
            "argument --retry-backoff: expected a number, got 'soon'",
        ),
        ([], {"MODELGATE_SWEEP_INTERVAL": "0"}, "argument --sweep-interval: expected more than"),
    ],
)
def test_meaningless_numbers_are_refused_before_starting(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = _serve(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("flag", "serving"), [("--listen", "MongoDB clients"), ("--metrics-listen", "monitoring")]
)
def test_an_address_in_use_is_reported_without_a_traceback(
    flag: str, serving: str, upstream_uri: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = "--metrics-listen" if flag == "--listen" else "--listen"
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            free_port = other.getsockname()[1]
        result = _serve(
            flag,
            f"127.0.0.1:{port}",
            free,
            f"127.0.0.1:{free_port}",
            "--upstream",
            upstream_uri,
            "--data-dir",
            str(tmp_path),
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} for {serving}" in result.stderr
    assert "Traceback" not in result.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, from /proc (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_embedded_upstream_persists_and_stops_with_modelgate(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proxy = ProxyProcess(None, tmp_path / "modelgate.log", args=("--data-dir", str(data_dir)))
    proxy.start()
    try:
        assert proxy.process is not None
        children = _children(proxy.process.pid)
        assert children, "no embedded upstream child process"
        upstream_ports = set().union(*(_listening_ports(pid) for pid in children))
        assert upstream_ports, "the embedded upstream listens on no port"
        with pymongo.MongoClient(proxy.uri, serverSelectionTimeoutMS=5000) as client:
            assert client.admin.command("hello")["msg"] == "isdbgrid"
            client.keep.things.insert_many([{"n": n} for n in range(5)])
        assert proxy.stop() == 0
        # SIGTERM stopped the child too.
        deadline = time.monotonic() + 15
        while any(_port_accepts(port) for port in upstream_ports):
            assert time.monotonic() < deadline, "the embedded upstream outlived modelgate"
            time.sleep(0.1)
        assert (data_dir / "db").is_dir()

        proxy.start()
        with pymongo.MongoClient(proxy.uri, serverSelectionTimeoutMS=5000) as client:
            assert sorted(d["n"] for d in client.keep.things.find()) == [0, 1, 2, 3, 4]
    finally:
        assert proxy.stop() == 0
