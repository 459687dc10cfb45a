"""Smoke test of `python -m bench wire`: it runs end to end, through the proxy, and
writes a complete JSON report and its plot. Tiny datasets, one iteration, no timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.wire import TASKS
from tests.support import assert_png, run_benchmark


@pytest.mark.timeout(60)
def test_bench_wire_quick_writes_every_task(tmp_path: Path) -> None:
    report = tmp_path / "x.json"
    payload, text = run_benchmark(
        [
            "wire",
            "--quick",
            "--iterations",
            "1",
            "--scale",
            "0.02",
            "--pings",
            "100",
            "--plot",
            str(tmp_path / "wire.png"),
        ],
        report,
        timeout=55,
    )
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
    for target in ("direct", "proxy"):
        distribution = latency[target]["distribution"]
        assert len(distribution) == len(latency["percentiles"])
        assert distribution == sorted(distribution) and distribution[0] > 0
    assert_png(tmp_path / "wire.png")
    assert "proxy/direct" in text
