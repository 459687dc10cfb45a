"""The hand-written loop a user would write instead of a deferred model, for
`python -m bench deferred` to compare modelgate's catch-up with.

Straight to the upstream with pymongo: find documents without the output (index-backed,
`limit` = modelgate's claim size), run the model with plain onnxruntime (decode and
preprocess as modelgate does, one `run` per batch), write the outputs back with one
unordered bulk update. No leases, no retries, no other process: the fastest correct
loop for a single worker, so the ratio shows what modelgate's bookkeeping costs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pymongo

from bench.models import BenchModel
from bench.support.processes import BenchError, connect

__all__ = ["run_loop"]

COLLECTION = "loop_items"
OUTPUT = "prediction"
# Empty-handed finds sleep this long: short, so polling costs the loop little.
IDLE_SLEEP_S = 0.05


def _predict(
    session: Any, input_name: str, pre: Any, documents: list[dict[str, Any]], field: str
) -> list[pymongo.UpdateOne]:
    from engine.inputs.image import preprocess_image_bytes

    batch = np.stack([preprocess_image_bytes(doc[field], pre) for doc in documents])
    scores = session.run(None, {input_name: batch})[0]
    updates = []
    for doc, row in zip(documents, scores, strict=True):
        label = int(np.argmax(row))
        updates.append(
            pymongo.UpdateOne(
                {"_id": doc["_id"]},
                {"$set": {OUTPUT: {"label": label, "score": float(row[label]), "version": 1}}},
            )
        )
    return updates


def run_loop(
    uri: str,
    database: str,
    model: BenchModel,
    field: str,
    total: int,
    batch_size: int,
    insert: Callable[[Any], float],
    timeout: float,
) -> dict[str, Any]:
    """Catch up on `total` documents that `insert(collection)` writes (it returns the
    time of its first insert) while the loop runs beside it, in another thread; the
    rate is `total` over the time from the first insert to the last output written."""
    from bench.onnx_baseline import open_session, preprocess_spec

    session = open_session(model.onnx, ["CPUExecutionProvider"], require_first=False)
    input_name = session.get_inputs()[0].name
    pre = preprocess_spec(model)
    written = 0
    batches = 0
    finished = 0.0
    errors: list[BaseException] = []
    with connect(uri) as client:
        coll = client[database][COLLECTION]
        coll.drop()
        # Index-backed: {OUTPUT.version: null} is answered from this index.
        coll.create_index(f"{OUTPUT}.version")
        deadline = time.monotonic() + timeout

        def loop() -> None:
            nonlocal written, batches, finished
            try:
                while written < total and time.monotonic() < deadline:
                    documents = list(
                        coll.find({f"{OUTPUT}.version": None}, {field: 1}).limit(batch_size)
                    )
                    if not documents:
                        time.sleep(IDLE_SLEEP_S)
                        continue
                    updates = _predict(session, input_name, pre, documents, field)
                    written += coll.bulk_write(updates, ordered=False).modified_count
                    batches += 1
                finished = time.time()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        first = insert(coll)
        worker.join(timeout)
        coll.drop()
    if errors:
        raise BenchError(f"the hand-written loop failed: {errors[0]!r}")
    if written < total:
        raise BenchError(f"the hand-written loop did not catch up in {timeout:.0f}s")
    seconds = finished - first
    return {
        "documents": total,
        "batch": batch_size,
        "batches": batches,
        "catch_up_s": seconds,
        "documents_per_s": total / seconds,
    }
