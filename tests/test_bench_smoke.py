"""Smoke test of `python -m bench wire`: it runs end to end, through the frame forwarder
and the proxy, one and two proxy processes, and writes a complete JSON report and its plot.
Tiny datasets, one iteration, no timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.wire import TARGETS, TASKS
from tests.support import assert_png, run_benchmark


@pytest.mark.timeout(120)
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
            "--clients",
            "4",
            "--plot",
            str(tmp_path / "wire.png"),
        ],
        report,
        timeout=110,
    )
    assert payload["benchmark"] == "wire"
    assert payload["machine"]["cpu_count"] >= 1
    assert [task["name"] for task in payload["tasks"]] == list(TASKS)
    for task in payload["tasks"]:
        assert task["dataset_bytes"] > 0, task["name"]
        for target in TARGETS:
            assert task[target]["median_s"] > 0, (task["name"], target)
            assert task[target]["mb_per_s"] > 0, (task["name"], target)
        assert task["ratio"] > 0 and task["forwarder_ratio"] > 0, task["name"]
    latency = payload["ping_latency"]
    for target in TARGETS:
        assert latency[target]["p50"] > 0
        assert latency[target]["p99"] >= latency[target]["p50"]
    for prefix, slower, faster in (
        ("added", "proxy", "direct"),
        ("forwarder_added", "forwarder", "direct"),
        ("excess", "proxy", "forwarder"),
    ):
        assert latency[f"{prefix}_p50_us"] == latency[slower]["p50"] - latency[faster]["p50"]
    scaling = payload["scaling"]
    assert scaling["clients"] == 4
    for configuration, processes in (("1 process", 1), ("2 processes", 2)):
        assert scaling[configuration]["ops_per_s"] > 0, configuration
        for run in scaling[configuration]["runs"]:
            # The CPU of each modelgate process of the configuration is measured (how the
            # driver spreads the clients over two is its own choice, not asserted).
            assert len(run["modelgate_cores"]) == processes, run
            assert sum(run["modelgate_cores"]) > 0, run
    for target in ("direct", "proxy"):
        distribution = latency[target]["distribution"]
        assert len(distribution) == len(latency["percentiles"])
        assert distribution == sorted(distribution) and distribution[0] > 0
    assert_png(tmp_path / "wire.png")
    assert "proxy/direct" in text and "modelgate over forwarder" in text
    assert "2 processes" in text
