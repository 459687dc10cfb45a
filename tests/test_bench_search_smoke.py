"""Smoke test of `python -m bench search`: the ANN part runs end to end with hnswlib and
modelgate's LocalIndex on a tiny set and ends with a complete JSON report. No timing
assertions (recall is deterministic enough at this size to be checked loosely)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import run_benchmark


@pytest.mark.timeout(120)
def test_bench_search_quick(tmp_path: Path) -> None:
    arguments = ["search", "--quick", "--count", "2000", "--queries", "50"]
    arguments += ["--library", "hnswlib", "--library", "modelgate-LocalIndex"]
    payload, text = run_benchmark(arguments, tmp_path / "search.json", timeout=110)
    assert payload["benchmark"] == "search" and payload["machine"]["cpu_count"] >= 1
    ann = payload["results"]["ann"]
    assert (ann["count"], ann["dim"], ann["limit"], ann["num_candidates"]) == (2000, 384, 10, 100)
    rows = ann["results"]["clustered"]
    assert list(rows) == ["numpy-exact", "hnswlib", "modelgate-LocalIndex"]
    for name in ("hnswlib", "modelgate-LocalIndex"):
        row = rows[name]
        assert row["recall_at_k"] >= 0.9 and row["recall_after_load"] >= 0.9, name
        assert row["recall_after_update"] >= 0.9, name
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["build_s"] > 0
    assert "modelgate-LocalIndex" in text and "recall@10" in text
