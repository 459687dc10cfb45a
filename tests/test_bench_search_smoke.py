"""Smoke test of `python -m bench search`: every part runs end to end on a tiny set and
ends with a complete JSON report: the ANN part with hnswlib and modelgate's LocalIndex,
`$vectorSearch` through a modelgate process, autoEmbed ingest and the recall on text
embeddings with the small generated text encoder (not MiniLM). No timing assertions
(recall is deterministic enough at these sizes to be checked loosely)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import run_benchmark


@pytest.mark.timeout(180)
def test_bench_search_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the text embeddings
    arguments = ["search", "--quick", "--count", "2000", "--queries", "50"]
    arguments += ["--library", "hnswlib", "--library", "modelgate-LocalIndex"]
    arguments += ["--docs", "300", "--e2e-queries", "20", "--texts", "100"]
    arguments += ["--recall-texts", "600", "--recall-queries", "30"]
    payload, text = run_benchmark(arguments, tmp_path / "search.json", timeout=170)
    assert payload["benchmark"] == "search" and payload["machine"]["cpu_count"] >= 1
    results = payload["results"]
    assert list(results) == ["ann", "e2e", "autoembed", "text-recall"]
    ann = results["ann"]
    assert (ann["count"], ann["dim"], ann["limit"], ann["num_candidates"]) == (2000, 384, 10, 100)
    rows = ann["results"]["clustered"]
    assert list(rows) == ["numpy-exact", "hnswlib", "modelgate-LocalIndex"]
    for name in ("hnswlib", "modelgate-LocalIndex"):
        row = rows[name]
        assert row["recall_at_k"] >= 0.9 and row["recall_after_load"] >= 0.9, name
        assert row["recall_after_update"] >= 0.9, name
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["build_s"] > 0

    e2e = results["e2e"]
    assert (e2e["docs"], e2e["queries"], e2e["num_candidates"]) == (300, 20, 100)
    assert e2e["proxy"]["recall_at_k"] >= 0.9 and e2e["proxy_exact"]["recall_at_k"] == 1.0
    timed = ["proxy", "proxy_exact", "direct_sent_pipeline", "direct_match_in", "direct_find_one"]
    for row in timed:
        assert 0 < e2e[row]["p50_ms"] <= e2e[row]["p99_ms"], row

    auto = results["autoembed"]
    assert (auto["model"], auto["texts"], auto["batch"]) == ("small-encoder", 100, 64)
    assert auto["max_abs_diff"] < 1e-4  # modelgate stored what onnxruntime computes
    assert auto["query_by_text_top"] == 7  # a text's own document comes first
    assert auto["indexed_s"] >= auto["embedded_s"] > 0 and auto["ratio"] > 0

    recall = results["text-recall"]
    assert (recall["count"], recall["queries"], recall["dim"]) == (600, 30, 32)
    assert recall["rows"][0]["num_candidates"] == 100
    for row in recall["rows"]:
        assert row["recall_at_k_ties"] >= row["recall_at_k"] >= 0.9, row
    for title in ("modelgate-LocalIndex", "$vectorSearch end to end", "autoEmbed ingest"):
        assert title in text
