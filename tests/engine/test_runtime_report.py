"""The start-up report of the onnxruntime build (this machine has the CPU build only)."""

from __future__ import annotations

import importlib.metadata
import logging

import onnxruntime as ort
import pytest

from engine.runtime import RuntimeSettings, report_onnxruntime

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _report(caplog: pytest.LogCaptureFixture, settings: RuntimeSettings) -> list[logging.LogRecord]:
    with caplog.at_level(logging.INFO, logger="engine.runtime"):
        report_onnxruntime(settings)
    return [record for record in caplog.records if record.name == "engine.runtime"]


def test_the_build_and_its_providers_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert CUDA not in ort.get_available_providers(), "this test expects the CPU build"
    (record,) = _report(caplog, RuntimeSettings())  # automatic providers: nothing to warn
    assert record.levelno == logging.INFO
    version = importlib.metadata.version("onnxruntime")
    assert f"onnxruntime build: onnxruntime {version};" in record.getMessage()
    assert f"providers available: {', '.join(ort.get_available_providers())}" in (
        record.getMessage()
    )


@pytest.mark.parametrize(
    ("settings", "missing"),
    [
        (RuntimeSettings(providers=(CUDA, CPU)), CUDA),
        (RuntimeSettings(tensorrt=True), "TensorrtExecutionProvider"),
    ],
)
def test_a_gpu_provider_asked_for_but_missing_is_warned_about(
    caplog: pytest.LogCaptureFixture, settings: RuntimeSettings, missing: str
) -> None:
    warnings = [r for r in _report(caplog, settings) if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert message.startswith(f"{missing} asked for but not in this onnxruntime build")
    assert f"models run on {CPU}" in message
    assert "pip install 'modelgate[gpu]'" in message


def test_cpu_asked_for_is_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    records = _report(caplog, RuntimeSettings(providers=(CPU,)))
    assert [r.levelno for r in records] == [logging.INFO]
