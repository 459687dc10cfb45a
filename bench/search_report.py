"""The tables of `python -m bench search`'s end-to-end and text parts (bench.search_e2e)."""

from __future__ import annotations

from typing import Any

from bench.harness import format_table

__all__ = ["autoembed_table", "e2e_table", "text_recall_table"]


def e2e_table(section: dict[str, Any]) -> str:
    title = (
        f"$vectorSearch end to end: {section['docs']:,} documents x {section['dim']}, "
        f"limit {section['limit']}, numCandidates {section['num_candidates']}, "
        f"{section['queries']} queries, one client; index built in {section['build_s']:.1f} s"
    )
    rows = [
        ["modelgate: $vectorSearch + $project score", section["proxy"]],
        ["modelgate: same, exact: true", section["proxy_exact"]],
        ["upstream alone: the pipeline modelgate sends", section["direct_sent_pipeline"]],
        ["upstream alone: $match {_id: {$in: the 10}}", section["direct_match_in"]],
        ["upstream alone: find_one by _id", section["direct_find_one"]],
    ]
    table = [
        [name, r.get("recall_at_k"), r["p50_ms"], r["p99_ms"], r["mean_ms"]] for name, r in rows
    ]
    headers = ["query", "recall@10", "p50 ms", "p99 ms", "mean ms"]
    return title + "\n" + format_table(headers, table, floatfmt=["", ".3f", ".2f", ".2f", ".2f"])


def autoembed_table(section: dict[str, Any]) -> str:
    title = (
        f"autoEmbed ingest: {section['texts']:,} texts, {section['model']} "
        f"({section['dim']} dims), batches of {section['batch']}; modelgate: from "
        "createSearchIndexes until $listSearchIndexes counts every document indexed"
    )
    headers = ["", "seconds", "texts/s", "ratio"]
    rows = [
        ["onnxruntime alone", section["onnxruntime_s"], section["onnxruntime_per_s"], 1.0],
        ["modelgate: embedded and stored", section["embedded_s"], None, None],
        [
            "modelgate: embedded, stored, indexed",
            section["indexed_s"],
            section["proxy_per_s"],
            section["ratio"],
        ],
    ]
    note = (
        f"(inserting the texts through modelgate first: {section['insert_s']:.2f} s; stored "
        f"vectors vs onnxruntime's: max |diff| {section['max_abs_diff']:.1e})"
    )
    return (
        title + "\n" + format_table(headers, rows, floatfmt=["", ".2f", ".0f", ".2f"]) + "\n" + note
    )


def text_recall_table(section: dict[str, Any]) -> str:
    title = (
        f"local index on real sentence embeddings: {section['count']:,} x {section['dim']} "
        f"({section['model']}, {section['distinct_texts']:,} distinct sentences), "
        f"{section['queries']:,} other sentences as queries, limit {section['limit']}"
    )
    headers = [
        "M", "efConstruction", "numCandidates", "recall@10", "recall@10 (ties)",
        "p50 ms", "p99 ms", "build s",
    ]  # fmt: skip
    rows = [
        [
            r["connectivity"], r["expansion_add"], r["num_candidates"], r["recall_at_k"],
            r["recall_at_k_ties"], r["p50_ms"], r["p99_ms"], r["build_s"],
        ]
        for r in section["rows"]
    ]  # fmt: skip
    formats = [".0f", ".0f", ".0f", ".3f", ".3f", ".3f", ".3f", ".1f"]
    return title + "\n" + format_table(headers, rows, floatfmt=formats)
