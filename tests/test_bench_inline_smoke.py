"""Smoke test of `python -m bench inline`: it runs end to end on the digits model,
through the proxy and plain onnxruntime, and writes a complete JSON report. Short runs,
no timing assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32)


@pytest.mark.timeout(90)
def test_bench_inline_quick_digits(tmp_path: Path) -> None:
    report = tmp_path / "inline.json"
    command = [
        sys.executable,
        "-m",
        "bench",
        "inline",
        "--quick",
        "--models",
        "digits",
        "--json",
        str(report),
        "--concurrency",
        ",".join(map(str, CONCURRENCY)),
        "--duration",
        "1",
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
        output, _ = process.communicate(timeout=80)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"bench inline did not finish in 80 s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text

    payload = json.loads(report.read_text())
    assert payload["benchmark"] == "inline"
    assert payload["machine"]["cpu_count"] >= 1
    [result] = payload["models"]
    assert result["model"]["name"] == "digits"
    baseline = result["baseline"]
    assert baseline["best_e2e"]["images_per_s"] > 0
    assert baseline["best_run"]["images_per_s"] > 0
    for row in baseline["batches"]:
        assert row["e2e_images_per_s"] > 0 and row["run_images_per_s"] > 0, row
    assert [cell["concurrency"] for cell in result["inline"]] == list(CONCURRENCY)
    for cell in result["inline"]:
        assert cell["images_per_s"] > 0, cell
        assert cell["ratio_to_baseline"] > 0, cell
        assert cell["latency_ms"]["p99"] >= cell["latency_ms"]["p50"] > 0, cell
        assert cell["mean_batch_size"] >= 1, cell
    assert [plain["concurrency"] for plain in result["no_model"]] == list(CONCURRENCY)
    for plain in result["no_model"]:
        for target in ("proxy", "direct"):
            assert plain[target]["images_per_s"] > 0, (plain["concurrency"], target)
    assert "proxy/base" in text
