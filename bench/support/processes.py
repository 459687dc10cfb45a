"""The processes that benchmarks and tests start: the upstream (an embedded SecantusDB
unless a URI is given) and `modelgate serve` as a child process, the way users run it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors

__all__ = [
    "BENCH_PROXY_ARGS",
    "DIRECT",
    "PROXY",
    "ROOT",
    "BenchError",
    "ProxyProcess",
    "Stack",
    "bench_stack",
    "connect",
    "redact_uri",
    "upstream",
    "wait_for_ping",
]

ROOT = Path(__file__).resolve().parents[2]

#: Target names used by every benchmark's results, so that tools can compare them.
DIRECT = "direct"
PROXY = "proxy"


class BenchError(RuntimeError):
    """A benchmark could not be set up (a process that did not start, a bad argument)."""


def wait_for_ping(
    uri: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until `uri` answers `ping`; fail early if `process` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise BenchError(f"process exited with status {process.returncode}")
        try:
            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return
        except pymongo.errors.PyMongoError as exc:
            if time.monotonic() > deadline:
                message = f"{redact_uri(uri)} did not answer ping within {timeout:.0f}s"
                raise BenchError(message) from exc
            time.sleep(0.1)


#: How the benchmarks run modelgate: quiet, and quick to stop.
BENCH_PROXY_ARGS = ("--log-level", "WARNING", "--grace-period", "2")


class ProxyProcess:
    """`modelgate serve` as a child process on a free port, the way users run it.

    `upstream` None starts the embedded default. The log (stdout and stderr) goes to
    `log_path`, a temporary file unless given; its tail is put in the error when the
    process does not start. `profile` runs it under cProfile (the event loop thread)."""

    def __init__(
        self,
        upstream: str | None,
        log_path: Path | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        profile: Path | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        from proxy.embedded import free_port

        self.upstream = upstream
        self.args = tuple(args)
        self.env = dict(env or {})
        self.port = port or free_port()
        self.profile = profile
        self.ready_timeout = ready_timeout
        self._own_log = log_path is None
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="modelgate-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def command(self) -> list[str]:
        profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        command = [sys.executable, *profiler, "-m", "proxy.cli", "serve"]
        command += ["--listen", f"127.0.0.1:{self.port}"]
        if self.upstream is not None:
            command += ["--upstream", self.upstream]
        return [*command, *self.args]

    def start(self, *, wait: bool = True, ping_uri: str | None = None) -> ProxyProcess:
        """Start it; with `wait`, return once `ping_uri` (default: its own) answers."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=ROOT, env=env,
            )  # fmt: skip
        if wait:
            try:
                wait_for_ping(ping_uri or self.uri, self.ready_timeout, self.process)
            except BenchError as exc:
                self.stop()
                raise BenchError(f"modelgate did not start: {exc}\n{self.log_tail()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send `sig`, wait, SIGKILL after `timeout`; the exit status (None if not running)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.stop()
        if exc_type is None and self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


@contextlib.contextmanager
def upstream(uri: str | None = None, *, embedded_args: Sequence[str] = ()) -> Iterator[str]:
    """Yield the upstream URI: `uri` as given, or an embedded in-memory SecantusDB
    started now (with `embedded_args`) and stopped on exit."""
    if uri:
        wait_for_ping(uri, timeout=10)
        yield uri
        return
    from proxy.embedded import EmbeddedUpstream, EmbeddedUpstreamError

    embedded = EmbeddedUpstream(":memory:", extra_args=tuple(embedded_args))
    try:
        embedded.start()
    except EmbeddedUpstreamError as exc:
        raise BenchError(str(exc)) from None
    try:
        yield embedded.uri
    finally:
        embedded.stop()


@dataclass
class Stack:
    """The two ends a benchmark compares: the upstream itself and modelgate in front."""

    direct_uri: str
    proxy_uri: str
    proxy: ProxyProcess
    embedded: bool

    @property
    def uris(self) -> dict[str, str]:
        return {DIRECT: self.direct_uri, PROXY: self.proxy_uri}


@contextlib.contextmanager
def bench_stack(
    upstream_uri: str | None = None,
    *,
    proxy_args: Sequence[str] = (),
    proxy_env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    profile: Path | None = None,
    embedded_args: Sequence[str] = (),
) -> Iterator[Stack]:
    """Start (or reach) the upstream, start modelgate in front, yield both URIs; stop
    everything on exit, also on error, Ctrl-C and (under `finish`) SIGTERM."""
    with upstream(upstream_uri, embedded_args=embedded_args) as uri:
        args = (*BENCH_PROXY_ARGS, *proxy_args)
        proxy = ProxyProcess(uri, log_path, args=args, env=proxy_env, profile=profile)
        with proxy:
            yield Stack(direct_uri=uri, proxy_uri=proxy.uri, proxy=proxy, embedded=not upstream_uri)


def connect(uri: str, **kwargs: Any) -> pymongo.MongoClient[dict[str, Any]]:
    """A MongoClient for benchmarking: connected now (so connecting is never timed)."""
    options: dict[str, Any] = {"serverSelectionTimeoutMS": 10_000, **kwargs}
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, **options)
    client.admin.command("ping")
    return client


def redact_uri(uri: str) -> str:
    """The URI without a password, for logs and JSON."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
