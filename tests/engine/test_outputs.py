from __future__ import annotations

import bson
import numpy as np
import pytest

from engine.errors import PredictionError
from engine.outputs import (
    error_record,
    is_probability_vector,
    postprocess,
    postprocess_rows,
    softmax,
)
from engine.spec import (
    ClassifyPostprocess,
    EmbeddingPostprocess,
    ModelSpec,
    Postprocess,
    RawPostprocess,
    Softmax,
    TensorPreprocess,
)


def spec_with(post: Postprocess) -> ModelSpec:
    return ModelSpec(
        name="m",
        namespace="db.c",
        input_field="x",
        output_field="_outputs.m",
        mode="inline",
        preprocess=TensorPreprocess(),
        postprocess=post,
    )


def classify(softmax_mode: Softmax = "auto", top_k: int = 2) -> ModelSpec:
    return spec_with(
        ClassifyPostprocess(labels=("cat", "dog", "fox"), top_k=top_k, softmax=softmax_mode)
    )


def test_classify_logits_get_softmax() -> None:
    row = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    value = postprocess(row, classify(), 7)
    probs = softmax(row.astype(np.float64))
    assert value["label"] == "dog"
    assert value["score"] == pytest.approx(probs[1])
    assert [t["label"] for t in value["top"]] == ["dog", "fox"]
    assert value["top"][1]["score"] == pytest.approx(probs[2])
    assert value["version"] == 7
    assert type(value["score"]) is float
    assert all(type(t["score"]) is float for t in value["top"])
    bson.encode(value)  # storable as is


def test_classify_probabilities_kept_in_auto() -> None:
    row = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    value = postprocess(row, classify(), 1)
    assert value["score"] == pytest.approx(0.5)
    assert value["top"][1] == {"label": "fox", "score": pytest.approx(0.3)}


def test_classify_softmax_forced_and_disabled() -> None:
    row = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    forced = postprocess(row, classify(True), 1)
    assert forced["score"] == pytest.approx(softmax(row.astype(np.float64))[1])
    raw_logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    off = postprocess(raw_logits, classify(False), 1)
    assert off["score"] == pytest.approx(3.0)


def test_classify_top_k_all_and_ties_stable() -> None:
    value = postprocess(np.array([0.0, 0.0, 0.0]), classify(top_k=3), 1)
    assert [t["label"] for t in value["top"]] == ["cat", "dog", "fox"]
    assert value["score"] == pytest.approx(1 / 3)


def test_classify_wrong_size_and_nan() -> None:
    with pytest.raises(PredictionError, match="2 scores for 3 labels"):
        postprocess(np.array([1.0, 2.0]), classify(), 1)
    with pytest.raises(PredictionError, match="non-finite"):
        postprocess(np.array([1.0, np.nan, 2.0]), classify(), 1)


def test_is_probability_vector() -> None:
    assert is_probability_vector(np.array([0.25, 0.75]))
    assert is_probability_vector(np.array([0.3333, 0.3333, 0.3333]))
    assert not is_probability_vector(np.array([0.5, 0.6]))
    assert not is_probability_vector(np.array([-0.5, 1.5]))


def test_embedding() -> None:
    value = postprocess(
        np.array([[1.0, 2.5]], dtype=np.float32), spec_with(EmbeddingPostprocess()), 3
    )
    assert value == {"vector": [1.0, 2.5], "version": 3}
    assert all(type(v) is float for v in value["vector"])


def test_raw() -> None:
    row = np.array([[1, 2], [3, 4]], dtype=np.int64)
    value = postprocess(row, spec_with(RawPostprocess()), 2)
    assert value == {"value": [[1, 2], [3, 4]], "version": 2}
    bson.encode(value)


def test_error_record() -> None:
    assert error_record("bad input", 4) == {"error": "bad input", "version": 4}
    assert error_record("bad input", 4, attempts=3) == {
        "error": "bad input",
        "version": 4,
        "attempts": 3,
    }


def _row_by_row(rows: list[np.ndarray], spec: ModelSpec) -> list[object]:
    results: list[object] = []
    for row in rows:
        try:
            results.append(postprocess(row, spec, 1))
        except PredictionError as exc:
            results.append(("error", exc.message))
    return results


@pytest.mark.parametrize("softmax_mode", ["auto", True, False])
@pytest.mark.parametrize("top_k", [1, 3])
def test_a_batch_is_postprocessed_as_its_rows_one_by_one(softmax_mode: Softmax, top_k: int) -> None:
    """postprocess_rows (the whole batch at once) gives exactly what postprocess gives
    row by row: logits, probabilities, ties, non-finite rows, float32 and float64."""
    rng = np.random.default_rng(7)
    spec = classify(softmax_mode, top_k=top_k)
    labels = len(spec.postprocess.labels)  # type: ignore[union-attr]
    for dtype in (np.float32, np.float64):
        rows = [rng.normal(size=labels).astype(dtype) for _ in range(20)]
        rows.append(np.full(labels, 1.0 / labels, dtype=dtype))  # a tie, and probabilities
        rows.append(np.array([np.nan] + [0.0] * (labels - 1), dtype=dtype))
        rows.append(np.array([np.inf] + [0.0] * (labels - 1), dtype=dtype))
        rows.append(rng.dirichlet(np.ones(labels)).astype(dtype))
        batched = [
            ("error", result.message) if isinstance(result, PredictionError) else result
            for result in postprocess_rows(rows, spec, 1)
        ]
        assert batched == _row_by_row(rows, spec)


def test_a_batch_of_the_wrong_width_is_refused_for_every_row() -> None:
    spec = classify()
    rows = [np.zeros(5), np.zeros(5)]
    results = postprocess_rows(rows, spec, 1)
    assert all(isinstance(result, PredictionError) for result in results)
    assert _row_by_row(rows, spec) == [("error", r.message) for r in results]  # type: ignore[union-attr]
