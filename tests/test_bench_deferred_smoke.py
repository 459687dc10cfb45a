"""Smoke test of `python -m bench deferred`: a tiny run on the digits model (one and two
modelgate processes) ends with a complete JSON report. No timing assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_bench_deferred_tiny_digits(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    report = tmp_path / "deferred.json"
    command = [
        sys.executable,
        "-m",
        "bench",
        "deferred",
        "--quick",
        "--models",
        "digits",
        "--docs",
        "150",
        "--processes",
        "1,2",
        "--steady-seconds",
        "2",
        "--baseline-budget",
        "0.1",
        "--json",
        str(report),
    ]
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
        output, _ = process.communicate(timeout=140)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"bench deferred did not finish:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "catch-up docs/s" in text

    payload = json.loads(report.read_text())
    assert payload["benchmark"] == "deferred"
    [result] = payload["models"]
    assert result["model"]["name"] == "digits"
    assert result["baseline"]["best_e2e"]["images_per_s"] > 0
    assert [cell["processes"] for cell in result["cells"]] == [1, 2]
    for cell in result["cells"]:
        fast = cell["catch_up"]
        assert fast["documents"] == 150 and fast["errors"] == 0, cell
        assert fast["documents_per_s"] > 0 and cell["ratio_to_baseline"] > 0, cell
        slow = cell["steady"]
        assert slow["seen"] == slow["documents"] >= 1, cell
        assert slow["lag_s"]["p99"] >= slow["lag_s"]["p50"] >= 0, cell
