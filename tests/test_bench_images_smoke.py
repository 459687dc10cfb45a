"""Smoke test of `python -m bench images`: it runs end to end (image server process,
proxy, cold and warm cache, local-disk baseline, LMDB lookups) and writes a complete
JSON report. A tiny run on the digits model only; no timing assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_bench_images_quick_digits(tmp_path: Path) -> None:
    report = tmp_path / "images.json"
    command = [
        sys.executable, "-m", "bench", "images", "--quick", "--models", "digits",
        "--images", "24", "--seconds", "0.2", "--json", str(report),
    ]  # fmt: skip
    upstream = os.environ.get("MODELGATE_TEST_UPSTREAM")
    if upstream:
        command += ["--upstream", upstream]
    # A session of its own, so that a hung run is ended with everything it started.
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=110)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"bench images did not finish in 110 s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text

    payload = json.loads(report.read_text())
    assert payload["benchmark"] == "images" and payload["concurrency"] == 8
    assert payload["machine"]["cpu_count"] >= 1
    assert all(rate > 0 for rate in payload["lookups_per_s"].values())
    [result] = payload["models"]
    assert result["model"]["image_size"] == [28, 28]
    for key in ("cold_cache", "warm_cache"):
        run = result[key]
        assert run["images"] == 24 and run["images_per_s"] > 0, run
        assert run["latency_ms"]["p99"] >= run["latency_ms"]["p50"] > 0, run
        assert run["ratio_to_local_disk"] > 0
    assert result["local_disk"]["images_per_s"] > 0 and result["local_disk"]["batch"] >= 1
    assert result["cache_after"]["entries"] == 24
    assert "warm cache (LMDB)" in text and "lookups/s" in text
