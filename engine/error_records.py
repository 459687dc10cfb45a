"""The error records a model left in documents (`{error, version[, attempts]}`, see
engine.outputs): which documents hold one, and what they say, counted by reason, so an
operator can see what to fix before retrying them (retryFailed).

Synchronous pymongo, called from worker threads."""

from __future__ import annotations

from typing import Any

from pymongo.collection import Collection

from engine.outputs import VERSION
from engine.spec import ModelSpec

__all__ = ["REASON_CHARS", "TOP_REASONS", "error_records_filter", "failure_reasons"]

#: A reason is the start of the error message: enough to tell failures apart, while the
#: URL or value that follows varies from document to document.
REASON_CHARS = 100
#: modelStatus shows the most frequent reasons only: a reply stays small however varied
#: the failures are.
TOP_REASONS = 20


def error_records_filter(
    spec: ModelSpec, extra_filter: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Documents of the model (those matching `extra_filter` too, when given) whose output
    is an error record. A stale one (its `version` renamed) is pending already: not one."""
    out = spec.output_field
    clauses: list[dict[str, Any]] = [
        {f"{out}.error": {"$exists": True}},
        {f"{out}.{VERSION}": {"$exists": True}},
    ]
    if spec.filter:
        clauses.append(spec.filter)
    if extra_filter:
        clauses.append(extra_filter)
    return {"$and": clauses}


def failure_reasons(
    collection: Collection[dict[str, Any]], spec: ModelSpec
) -> list[dict[str, Any]]:
    """[{reason, count}] over the model's error records, the most frequent first (ties by
    reason), at most TOP_REASONS of them."""
    pipeline: list[dict[str, Any]] = [
        {"$match": error_records_filter(spec)},
        {
            "$group": {
                "_id": {"$substrCP": [f"${spec.output_field}.error", 0, REASON_CHARS]},
                "count": {"$sum": 1},
            }
        },
        {"$sort": {"count": -1, "_id": 1}},
        {"$limit": TOP_REASONS},
    ]
    return [
        {"reason": row["_id"], "count": int(row["count"])} for row in collection.aggregate(pipeline)
    ]
