"""The output document: what a model stores in its output field, and how it goes stale.

A prediction is `{label, score, top, version}`, `{vector, version}` or `{value, version}`;
a failure is `{error, version[, attempts]}`. `version` says which model version made it.
An output made stale (backfillModel, or an update of the input) keeps its contents and
has its `version` renamed to `backfillOf`: the document is pending again for deferred
work, and still says which version made what it holds until it is replaced."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import PredictionError
from engine.spec import ClassifyPostprocess, EmbeddingPostprocess, ModelSpec

__all__ = [
    "STALE_VERSION",
    "VERSION",
    "error_record",
    "is_probability_vector",
    "postprocess",
    "postprocess_rows",
    "softmax",
    "stale_update",
]

#: The field of an output that names the model version that made it.
VERSION = "version"
#: Where `version` goes when the output is stale.
STALE_VERSION = "backfillOf"


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x)
    e = np.exp(shifted)
    return e / np.sum(e)


def is_probability_vector(x: np.ndarray, tolerance: float = 1e-3) -> bool:
    return bool(np.all(x >= 0.0) and np.all(x <= 1.0) and abs(float(np.sum(x)) - 1.0) <= tolerance)


def postprocess(row: np.ndarray, spec: ModelSpec, version: int) -> dict[str, Any]:
    """One output row (one item's slice of the first output) -> the stored value."""
    post = spec.postprocess
    if isinstance(post, ClassifyPostprocess):
        scores = np.asarray(row, dtype=np.float64).reshape(-1)
        if scores.size != len(post.labels):
            raise PredictionError(f"model gave {scores.size} scores for {len(post.labels)} labels")
        if not np.all(np.isfinite(scores)):
            raise PredictionError("model gave non-finite scores")
        if post.softmax is True or (post.softmax == "auto" and not is_probability_vector(scores)):
            scores = softmax(scores)
        order = np.argsort(-scores, kind="stable")[: post.top_k]
        top = [{"label": post.labels[i], "score": float(scores[i])} for i in order]
        return {"label": top[0]["label"], "score": top[0]["score"], "top": top, "version": version}
    if isinstance(post, EmbeddingPostprocess):
        vector = np.asarray(row, dtype=np.float64).reshape(-1)
        return {"vector": vector.tolist(), "version": version}
    return {"value": np.asarray(row).tolist(), "version": version}


def postprocess_rows(
    rows: list[np.ndarray], spec: ModelSpec, version: int
) -> list[dict[str, Any] | PredictionError]:
    """`postprocess` of each row (or its PredictionError), the same values, computed for
    all rows at once where they share a shape (one numpy call per step, not per row)."""
    post = spec.postprocess
    if not isinstance(post, ClassifyPostprocess) or len(rows) < 2:
        return [_postprocess_or_error(row, spec, version) for row in rows]
    try:
        scores = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    except ValueError:  # rows of different shapes: one at a time
        return [_postprocess_or_error(row, spec, version) for row in rows]
    if scores.shape[1] != len(post.labels):
        count = scores.shape[1]
        error = PredictionError(f"model gave {count} scores for {len(post.labels)} labels")
        return [error] * len(rows)
    finite = np.all(np.isfinite(scores), axis=1)
    if post.softmax is True:
        convert = np.ones(len(rows), dtype=bool)
    elif post.softmax == "auto":
        # is_probability_vector, row by row
        convert = ~(
            np.all(scores >= 0.0, axis=1)
            & np.all(scores <= 1.0, axis=1)
            & (np.abs(np.sum(scores, axis=1) - 1.0) <= 1e-3)
        )
    else:
        convert = np.zeros(len(rows), dtype=bool)
    convert &= finite
    if convert.any():
        picked = scores[convert]
        shifted = picked - np.max(picked, axis=1, keepdims=True)
        e = np.exp(shifted)
        scores[convert] = e / np.sum(e, axis=1, keepdims=True)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : post.top_k]
    labels = post.labels
    values = scores.tolist()
    results: list[dict[str, Any] | PredictionError] = []
    for ok, row, top_indices in zip(finite.tolist(), values, order.tolist(), strict=True):
        if not ok:
            results.append(PredictionError("model gave non-finite scores"))
            continue
        top = [{"label": labels[i], "score": row[i]} for i in top_indices]
        results.append(
            {"label": top[0]["label"], "score": top[0]["score"], "top": top, "version": version}
        )
    return results


def _postprocess_or_error(
    row: np.ndarray, spec: ModelSpec, version: int
) -> dict[str, Any] | PredictionError:
    try:
        return postprocess(row, spec, version)
    except PredictionError as e:
        return e


def error_record(message: str, version: int, attempts: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"error": message, "version": version}
    if attempts is not None:
        record["attempts"] = attempts
    return record


def stale_update(output_field: str) -> dict[str, Any]:
    """The update operator that makes the output at `output_field` stale."""
    return {"$rename": {f"{output_field}.{VERSION}": f"{output_field}.{STALE_VERSION}"}}
