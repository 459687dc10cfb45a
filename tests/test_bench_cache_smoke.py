"""Smoke test of `python -m bench cache`: LMDB lookups and fetches (cold, warm, local
disk) run end to end and end with a complete JSON report and its plot. A tiny run; no
timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import assert_png, run_benchmark


@pytest.mark.timeout(60)
def test_bench_cache_quick(tmp_path: Path) -> None:
    plot = tmp_path / "cache.png"
    payload, text = run_benchmark(
        ["cache", "--quick", "--images", "20", "--seconds", "0.2", "--plot", str(plot)],
        tmp_path / "cache.json",
        timeout=55,
    )
    assert payload["benchmark"] == "cache" and payload["machine"]["cpu_count"] >= 1
    results = payload["results"]
    assert results["images"] == 20 and results["mean_image_bytes"] > 0
    assert list(results["lookups_per_s"]) == ["1 thread", "2 threads"]
    assert all(rate > 0 for rate in results["lookups_per_s"].values())
    paths = ["cold cache (HTTP)", "warm cache (LMDB)", "local disk (files)"]
    assert list(results["fetch"]) == paths
    for path, row in results["fetch"].items():
        assert row["images_per_s"] > 0 and row["bytes"] > 0, path
    assert "warm cache (LMDB)" in text and f"wrote {plot}" in text
    assert_png(plot)
