"""The project's own rules, enforced where CI runs: ruff (lint and format) and mypy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.support.processes import ROOT

PATHS = ["modelgate", "proxy", "engine", "bench", "tests"]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", *PATHS), ("ruff", "format", "--check", *PATHS), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_clean(command: tuple[str, ...]) -> None:
    result = _run(*command)
    assert result.returncode == 0, result.stdout + result.stderr
