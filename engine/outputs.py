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


def error_record(message: str, version: int, attempts: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"error": message, "version": version}
    if attempts is not None:
        record["attempts"] = attempts
    return record


def stale_update(output_field: str) -> dict[str, Any]:
    """The update operator that makes the output at `output_field` stale."""
    return {"$rename": {f"{output_field}.{VERSION}": f"{output_field}.{STALE_VERSION}"}}
