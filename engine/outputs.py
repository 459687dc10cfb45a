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
    "pool_token_states",
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


def pool_token_states(
    output: np.ndarray, attention_mask: np.ndarray | None, post: EmbeddingPostprocess
) -> np.ndarray:
    """A batch's first output -> one row per item, pooled over the token axis where the
    output has one ([batch, tokens, dim]) and the postprocess asks for it: "mean" over the
    tokens the attention mask keeps (all tokens without a mask), "cls" token 0. Any other
    output comes back as it is. Runs in the worker thread, on the whole batch at once."""
    if output.ndim != 3 or post.pooling == "none":
        return output
    if post.pooling == "cls":
        return output[:, 0, :]
    if attention_mask is None:
        return output.mean(axis=1)
    mask = attention_mask.astype(output.dtype, copy=False)[:, :, np.newaxis]
    counts = np.maximum(mask.sum(axis=1), 1)  # an item without tokens never gets here
    return (output * mask).sum(axis=1) / counts


def _embedding_values(
    rows: list[np.ndarray], post: EmbeddingPostprocess, version: int
) -> list[dict[str, Any] | PredictionError]:
    """Pooled rows -> {vector, version}, normalized (L2) if asked, all rows at once."""
    try:
        vectors = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    except ValueError:  # rows of different sizes: one at a time
        return [_embedding_values([row], post, version)[0] for row in rows]
    finite = np.all(np.isfinite(vectors), axis=1)
    if post.normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # A zero vector stays zero (as torch's F.normalize leaves it).
        vectors = vectors / np.where(norms > 0.0, norms, 1.0)
    return [
        {"vector": vector, "version": version}
        if ok
        else PredictionError("model gave a non-finite vector")
        for ok, vector in zip(finite.tolist(), vectors.tolist(), strict=True)
    ]


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
        pooled = pool_token_states(np.asarray(row)[np.newaxis], None, post)[0]
        [value] = _embedding_values([pooled], post, version)
        if isinstance(value, PredictionError):
            raise value
        return value
    return {"value": np.asarray(row).tolist(), "version": version}


def postprocess_rows(
    rows: list[np.ndarray], spec: ModelSpec, version: int
) -> list[dict[str, Any] | PredictionError]:
    """`postprocess` of each row (or its PredictionError), the same values, computed for
    all rows at once where they share a shape (one numpy call per step, not per row)."""
    post = spec.postprocess
    if isinstance(post, EmbeddingPostprocess) and rows:
        # Rows from a batch run are pooled already (pool_token_states, with the mask).
        return _embedding_values(rows, post, version)
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
    # Few numpy calls over the whole batch (each costs more than a row's arithmetic): a
    # finite sum means finite scores; only a batch with a non-finite sum looks closer.
    sums = scores.sum(axis=1)
    finite = np.isfinite(sums)
    if not finite.all():
        finite = np.isfinite(scores).all(axis=1)
    if post.softmax is False:
        convert = np.zeros(len(rows), dtype=bool)
    else:
        highest = scores.max(axis=1)
        if post.softmax is True:
            convert = finite
        else:  # "auto": is_probability_vector, row by row
            probability = (highest <= 1.0) & (np.abs(sums - 1.0) <= 1e-3)
            if probability.any():
                probability &= scores.min(axis=1) >= 0.0
            convert = finite & ~probability
        if convert.all():  # the same arithmetic as on the rows picked below, without picking
            e = np.exp(scores - highest[:, np.newaxis])
            scores = e / e.sum(axis=1, keepdims=True)
        elif convert.any():
            e = np.exp(scores[convert] - highest[convert, np.newaxis])
            scores[convert] = e / e.sum(axis=1, keepdims=True)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : post.top_k]
    labels = post.labels
    results: list[dict[str, Any] | PredictionError] = []
    for ok, indices, row in zip(finite.tolist(), order.tolist(), scores.tolist(), strict=True):
        if not ok:
            results.append(PredictionError("model gave non-finite scores"))
            continue
        top = [{"label": labels[i], "score": row[i]} for i in indices]
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
