"""Smoke test of `python -m bench images`: it runs end to end (image server process,
proxy, cold and warm cache, local-disk baseline, LMDB lookups) and writes a complete
JSON report and its plot. A tiny run on the digits model only; no timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import assert_png, run_benchmark


@pytest.mark.timeout(120)
def test_bench_images_quick_digits(tmp_path: Path) -> None:
    report, plot = tmp_path / "images.json", tmp_path / "images.png"
    payload, text = run_benchmark(
        [
            "images",
            "--quick",
            "--models",
            "digits",
            "--images",
            "24",
            "--seconds",
            "0.2",
            "--plot",
            str(plot),
        ],
        report,
        timeout=110,
    )
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
    assert_png(tmp_path / "images.png")
