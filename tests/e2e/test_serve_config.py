"""`modelgate serve --config FILE`, and its start-up report of the onnxruntime build, as a
real process in front of the shared upstream (this machine has the CPU build only)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pymongo

from bench.support.processes import ProxyProcess


def test_serve_reads_its_file_and_warns_that_cuda_is_missing(
    upstream_uri: str, tmp_path: Path
) -> None:
    config = tmp_path / "modelgate.toml"
    config.write_text(
        f'data-dir = "{tmp_path}"\n'
        'providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]\n'
        'log-level = "INFO"\n'
    )
    log_path = tmp_path / "modelgate.log"
    with ProxyProcess(upstream_uri, log_path, args=("--config", str(config))) as gate:
        with pymongo.MongoClient(gate.uri, serverSelectionTimeoutMS=10_000) as client:
            assert client.admin.command("ping")["ok"] == 1
        log = gate.log_text()
    version = importlib.metadata.version("onnxruntime")
    assert f"onnxruntime build: onnxruntime {version}; providers available:" in log
    assert (
        "CUDAExecutionProvider asked for but not in this onnxruntime build "
        f"(onnxruntime {version}): models run on CPUExecutionProvider" in log
    )
