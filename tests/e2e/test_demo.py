"""`modelgate demo --size small`: the seed's whole story as a user runs it, end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.support.processes import ROOT

pytest.importorskip("torch", reason="needs the train extra (torch)")
pytest.importorskip("sklearn", reason="needs the train extra (scikit-learn)")

pytestmark = pytest.mark.train

PREDICTION = re.compile(
    r"^\s+(user-\d+)\s+(\d)\s+(\d) \((0\.\d\d|1\.00)\)\s+(\d) \((0\.\d\d|1\.00)\)", re.M
)


def test_demo_small_predicts_new_users() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", "--size", "small"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr[-3000:]

    rows = PREDICTION.findall(output)
    assert len(rows) == 5, output
    assert all(inline == deferred for _, _, inline, _, deferred, _ in rows), output
    right = sum(truth == deferred for _, truth, _, _, deferred, _ in rows)
    assert right >= 3, output  # most of them

    accuracy = re.search(r"validation accuracy: (0\.\d+|1\.0+)", output)
    assert accuracy is not None, output
    assert float(accuracy.group(1)) >= 0.85, output
    backfill = re.search(r"backfilled (\d+)/(\d+) users \((\d+) right\)", output)
    assert backfill is not None and backfill.group(1) == backfill.group(2) == "40", output
    assert int(backfill.group(3)) >= 32, output
    assert re.search(r"^total [\d.]+s: OK$", output, re.M), output
