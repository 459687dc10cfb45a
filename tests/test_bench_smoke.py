"""Smoke test of `python -m bench wire`: it runs end to end, through the proxy, and
writes a complete JSON report. Tiny datasets, one iteration, no timing assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.wire import TASKS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_bench_wire_quick_writes_every_task(tmp_path: Path) -> None:
    report = tmp_path / "x.json"
    command = [
        sys.executable,
        "-m",
        "bench",
        "wire",
        "--quick",
        "--json",
        str(report),
        "--iterations",
        "1",
        "--scale",
        "0.02",
        "--pings",
        "100",
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
        output, _ = process.communicate(timeout=55)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"bench wire did not finish in 55 s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text

    payload = json.loads(report.read_text())
    assert payload["benchmark"] == "wire"
    assert payload["machine"]["cpu_count"] >= 1
    assert [task["name"] for task in payload["tasks"]] == list(TASKS)
    for task in payload["tasks"]:
        assert task["dataset_bytes"] > 0, task["name"]
        for target in ("direct", "proxy"):
            assert task[target]["median_s"] > 0, (task["name"], target)
            assert task[target]["mb_per_s"] > 0, (task["name"], target)
        assert task["ratio"] > 0, task["name"]
    latency = payload["ping_latency"]
    for target in ("direct", "proxy"):
        assert latency[target]["p50"] > 0
        assert latency[target]["p99"] >= latency[target]["p50"]
    assert "added_p50_us" in latency and "added_p99_us" in latency
    assert "proxy/direct" in text
