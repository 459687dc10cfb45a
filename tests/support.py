"""Processes the end-to-end tests start: the upstream and modelgate itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import wait_for_ping
from proxy.embedded import free_port

__all__ = ["ProxyProcess", "run_benchmark", "wait_for_ping"]

ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """`modelgate serve` as a child process, the way users run it."""

    def __init__(
        self,
        upstream: str | None,
        log_path: Path,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self.log_path = log_path
        self.args = args
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self, *, wait: bool = True, ping_uri: str | None = None) -> ProxyProcess:
        command = [sys.executable, "-m", "proxy.cli", "serve", "--listen", f"127.0.0.1:{self.port}"]
        if self.upstream is not None:
            command += ["--upstream", self.upstream]
        command += list(self.args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT, env=env)
        if wait:
            wait_for_ping(ping_uri or self.uri, process=self.process)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return int(process.returncode)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_benchmark(arguments: list[str], report: Path, timeout: float) -> tuple[dict[str, Any], str]:
    """Run `python -m bench ARGUMENTS --json REPORT` (against MODELGATE_TEST_UPSTREAM when
    set) and return its JSON report and printed output; fail the test on error or hang."""
    command = [sys.executable, "-m", "bench", *arguments, "--json", str(report)]
    upstream = os.environ.get("MODELGATE_TEST_UPSTREAM")
    if upstream:
        command += ["--upstream", upstream]
    # A session of its own, so that a hung run is ended with everything it started.
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        text = output.decode(errors="replace")
        raise AssertionError(
            f"bench {arguments[0]} did not finish in {timeout:g} s:\n{text}"
        ) from None
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    return json.loads(report.read_text()), text
