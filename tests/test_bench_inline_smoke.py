"""Smoke test of `python -m bench inline`: it runs end to end on the digits model,
through the proxy and plain onnxruntime, and writes a complete JSON report and its plot. Short runs,
no timing assertions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import assert_png, run_benchmark

CONCURRENCY = (1, 8, 32)


@pytest.mark.timeout(240)
def test_bench_inline_quick_digits(tmp_path: Path) -> None:
    report = tmp_path / "inline.json"
    payload, text = run_benchmark(
        [
            "inline",
            "--quick",
            "--models",
            "digits",
            "--concurrency",
            ",".join(map(str, CONCURRENCY)),
            "--duration",
            "1",
            "--plot",
            str(tmp_path / "inline.png"),
        ],
        report,
        timeout=230,
    )
    assert payload["benchmark"] == "inline"
    assert payload["machine"]["cpu_count"] >= 1
    [result] = payload["models"]
    assert result["model"]["name"] == "digits"
    baseline = result["baseline"]
    assert baseline["best_e2e"]["images_per_s"] > 0
    assert baseline["best_run"]["images_per_s"] > 0
    for row in baseline["batches"]:
        assert row["e2e_images_per_s"] > 0 and row["run_images_per_s"] > 0, row
    assert [cell["concurrency"] for cell in result["inline"]] == list(CONCURRENCY)
    for cell in result["inline"]:
        assert cell["images_per_s"] > 0, cell
        assert cell["ratio_to_baseline"] > 0, cell
        assert cell["latency_ms"]["p99"] >= cell["latency_ms"]["p50"] > 0, cell
        assert cell["mean_batch_size"] >= 1, cell
    assert [plain["concurrency"] for plain in result["no_model"]] == list(CONCURRENCY)
    for plain in result["no_model"]:
        for target in ("proxy", "direct"):
            assert plain[target]["images_per_s"] > 0, (plain["concurrency"], target)
    assert "proxy/base" in text
    assert [row["model"] for row in payload["batched"]] == ["mlp16", "digits"]
    for row in payload["batched"]:
        for key in ("upstream_docs_per_s", "proxy_no_model_docs_per_s", "model_docs_per_s"):
            assert row[key] > 0, (row["model"], key)
        assert row["proxy_no_model"]["forwarder_docs_per_s"] > 0, row
        assert 0 < row["limit_docs_per_s"] < row["upstream_docs_per_s"], row
        assert [cell["max_size"] for cell in row["proxy"]] == [16, 64], row
        for cell in row["proxy"]:
            assert cell["docs_per_s"] > 0 and cell["ratio_to_limit"] > 0, cell
            # Interleaved: U, U stored and modelgate, one run of each per round.
            rounds = len(cell["runs"])
            assert rounds >= 2 and len(cell["upstream_runs"]) == rounds, cell
            assert len(cell["stored_upstream_runs"]) == rounds, cell
            assert min(cell["stored_upstream_runs"]) > 0, cell
            assert 0 < cell["stored_limit_docs_per_s"] < cell["stored_upstream_docs_per_s"], cell
            assert "stored_documents" not in cell, cell
            assert cell["mean_batch_size"] >= 1, cell
            # CPU accounting: the embedded upstream runs on this machine, so all three
            # processes' CPU is read, and the cores they kept busy follow from it.
            for key in ("proxy", "upstream", "clients"):
                assert cell[f"{key}_cpu_ms_per_1k"] > 0, (key, cell)
            assert cell["cores_busy"] > 0 and cell["upstream_cores_busy"] > 0, cell
    assert "/limit" in text and "/stored limit" in text
    # With the embedded upstream each batched cell (and each no-model run) gets a fresh
    # upstream and modelgate, so that all start from the same state; a given upstream is
    # shared by all of them.
    stacks = [
        (stack["upstream_pid"], stack["proxy_pid"])
        for row in payload["batched"]
        for stack in [row["proxy_no_model"]["stack"], *(cell["stack"] for cell in row["proxy"])]
    ]
    fresh = not os.environ.get("MODELGATE_TEST_UPSTREAM")
    assert [row["stack_per_cell"] for row in payload["batched"]] == [fresh, fresh]
    if fresh:  # serverStatus gives the embedded upstream's pid
        assert all(upstream and proxy for upstream, proxy in stacks), stacks
    distinct = len(stacks) if fresh else 1
    assert len({upstream for upstream, _ in stacks}) == distinct, stacks
    assert len({proxy for _, proxy in stacks}) == distinct, stacks
    assert_png(tmp_path / "inline.png")
