"""Smoke test of `python -m bench deferred`: a tiny run on the digits model (one and two
modelgate processes) ends with a complete JSON report and its plot. No timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import assert_png, run_benchmark


@pytest.mark.timeout(150)
def test_bench_deferred_tiny_digits(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="needs the train extra (torch)")
    report = tmp_path / "deferred.json"
    payload, _ = run_benchmark(
        [
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
            "--plot",
            str(tmp_path / "deferred.png"),
        ],
        report,
        timeout=140,
    )
    assert payload["benchmark"] == "deferred"
    [result] = payload["models"]
    assert result["model"]["name"] == "digits"
    assert result["baseline"]["best_e2e"]["images_per_s"] > 0
    assert [cell["processes"] for cell in result["cells"]] == [1, 2]
    loop = result["loop"]
    assert loop["documents"] == 150 and loop["documents_per_s"] > 0, loop
    for cell in result["cells"]:
        fast = cell["catch_up"]
        assert fast["documents"] == 150 and fast["errors"] == 0, cell
        assert fast["documents_per_s"] > 0 and cell["ratio_to_baseline"] > 0, cell
        assert cell["ratio_to_loop"] > 0 and cell["ratio_to_one_process"] > 0, cell
        seconds, done = zip(*fast["progress"], strict=True)
        assert seconds == tuple(sorted(seconds)) and done == tuple(sorted(done)), cell
        assert done[0] == 0 and done[-1] == 150, cell
        slow = cell["steady"]
        assert slow["seen"] == slow["documents"] >= 1, cell
        assert slow["lag_s"]["p99"] >= slow["lag_s"]["p50"] >= 0, cell
    assert_png(tmp_path / "deferred.png")
