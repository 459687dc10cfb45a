"""Smoke test of `python -m bench connections`: pings alone and beside idle and slow-byte
connections, the proxy's memory per idle connection, a complete JSON report and its plot.
A tiny run; no timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import assert_png, run_benchmark


@pytest.mark.timeout(90)
def test_bench_connections_quick(tmp_path: Path) -> None:
    plot = tmp_path / "connections.png"
    argv = ["connections", "--quick", "--idle", "20", "--slow", "2", "--seconds", "0.5"]
    payload, text = run_benchmark([*argv, "--plot", str(plot)], tmp_path / "c.json", timeout=85)
    assert payload["benchmark"] == "connections" and payload["machine"]["cpu_count"] >= 1
    assert (payload["idle_connections"], payload["slow_clients"]) == (20, 2)
    for load in ("unloaded", "loaded"):
        assert payload["ping_ms"][load]["n"] > 0 and payload["ping_ms"][load]["p50"] > 0
    rss = payload["proxy_rss_bytes"]
    assert rss["before_idle"] > 0 and rss["with_idle"] > 0
    assert "KiB per idle connection" in text and f"wrote {plot}" in text
    assert_png(plot)
