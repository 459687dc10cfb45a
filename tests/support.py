"""What several test modules share: running a benchmark as a child process with a JSON
report, and an upstream that enforces access control."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pymongo

from bench.support.processes import ROOT
from proxy.embedded import EmbeddedUpstream

__all__ = ["MONGOSH", "assert_png", "mongosh", "run_benchmark"]

#: mongosh as `npm ci` installs it (package.json).
MONGOSH = ROOT / "node_modules" / ".bin" / "mongosh"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """`path` is a PNG with a figure in it: the signature, a size no blank or empty image
    has, and dimensions Pillow reads back."""
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert len(data) > 10_000, len(data)
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300, image.size
        colors = image.getcolors(maxcolors=256)  # None: more than 256
        assert colors is None or len(colors) > 16, "a blank image"


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


@contextlib.contextmanager
def upstream_with_users(
    folder: Path, users: Mapping[str, tuple[str, list[Any]]]
) -> Iterator[EmbeddedUpstream]:
    """SecantusDB with --auth and `users` (name -> (password, roles)), its data in
    `folder`: the users are created on a start without --auth, as its --help says, then
    it is started again on the same port with it."""
    storage = folder / "data"
    with EmbeddedUpstream(storage, log_path=folder / "secantus.log") as open_upstream:
        with pymongo.MongoClient(open_upstream.uri) as admin_client:
            for user, (password, roles) in users.items():
                admin_client.admin.command("createUser", user, pwd=password, roles=roles)
        port = open_upstream.port
    with EmbeddedUpstream(
        storage, port=port, extra_args=("--auth",), log_path=folder / "secantus.log"
    ) as upstream:
        yield upstream


def mongosh(uri: str, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `script` in mongosh against `uri` (no rc file), capturing its output."""
    return subprocess.run(
        [str(MONGOSH), uri, "--quiet", "--norc", "--eval", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
