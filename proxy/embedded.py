"""The embedded upstream: SecantusDB started as a child process.

SecantusDB is GPL-2.0, so modelgate never imports it: it runs as its own process
(`secantusd-py`, from the `embedded` extra) and we talk to it over the wire like any
MongoDB. Tests and benchmarks start it through the same class."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["EmbeddedUpstream", "EmbeddedUpstreamError", "free_port"]

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "no upstream MongoDB was given (--upstream / MODELGATE_UPSTREAM) and the embedded "
    "upstream is not installed; install it with: pip install 'modelgate[embedded]'"
)


class EmbeddedUpstreamError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _executable() -> str:
    found = shutil.which("secantusd-py")
    if found is None:
        # The console script sits next to the interpreter in a virtual environment
        # that is used without being activated.
        candidate = Path(sys.executable).with_name("secantusd-py")
        if candidate.exists():
            return str(candidate)
        raise EmbeddedUpstreamError(_INSTALL_HINT)
    return found


class EmbeddedUpstream:
    """A SecantusDB child process on 127.0.0.1.

    `storage_path` is a folder (kept across restarts) or ":memory:"."""

    def __init__(
        self,
        storage_path: str | Path = ":memory:",
        *,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
    ) -> None:
        self.storage_path = str(storage_path)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, timeout: float = 60.0) -> None:
        if self.storage_path != ":memory:":
            Path(self.storage_path).mkdir(parents=True, exist_ok=True)
        command = [
            _executable(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            self.storage_path,
            "--log-level",
            "WARNING",
            *self.extra_args,
        ]
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting embedded upstream on port %d (data: %s)", self.port, self.storage_path)
        self._process = subprocess.Popen(command, stdout=output, stderr=output)
        self._wait_until_answering(timeout)

    def _wait_until_answering(self, timeout: float) -> None:
        # Imported here so that `modelgate --help` stays fast.
        import pymongo
        import pymongo.errors

        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise EmbeddedUpstreamError(
                    f"embedded upstream exited with status {self._process.returncode}"
                )
            try:
                client: pymongo.MongoClient[dict[str, object]]
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500) as client:
                    client.admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedUpstreamError(
                        f"embedded upstream did not answer within {timeout:.0f}s"
                    ) from None
                time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedUpstream:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
