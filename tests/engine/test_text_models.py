"""Text models in the engine: loading (named inputs, dynamic axes, the test run), a batch
of strings tokenized and run in one worker-thread hop, pooling (mean honouring the
attention mask, cls, none) and L2 normalization against numpy, and per-item failures that
leave the rest of their batch alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tokenizers
import trio
from tokenizers import models, normalizers, pre_tokenizers

from bench.support import text_models
from engine.batching import Failure, ModelServer, Prediction
from engine.errors import InvalidModel
from engine.metrics import EngineMetrics
from engine.outputs import pool_token_states, postprocess, postprocess_rows
from engine.runtime import CompiledModel, RuntimeSettings, load_model
from engine.spec import (
    BatchPolicy,
    ClassifyPostprocess,
    EmbeddingPostprocess,
    ModelSpec,
    Postprocess,
    RawPostprocess,
    TextPreprocess,
)

CPU = RuntimeSettings(providers=("CPUExecutionProvider",))
TOKENIZER = text_models.tokenizer_json()
VOCAB = tokenizers.Tokenizer.from_str(TOKENIZER.decode()).get_vocab_size()
DIM = 6
TEXTS = [
    "A red waterproof jacket for travel",
    "lamp",
    "The small quiet speaker plays every day at home",
    "kettle and mug",
]


def spec(
    post: Postprocess | None = None, *, max_length: int = 256, tokenizer: bytes = TOKENIZER
) -> ModelSpec:
    return ModelSpec(
        name="t",
        namespace="db.texts",
        input_field="text",
        output_field="_outputs.t",
        mode="inline",
        preprocess=TextPreprocess(tokenizer, max_length),
        postprocess=post or EmbeddingPostprocess("mean"),
        batch=BatchPolicy(max_size=64, max_delay_ms=5.0),
    )


def lookup(post: Postprocess | None = None, **kwargs: Any) -> CompiledModel:
    max_length = kwargs.pop("max_length", 256)
    onnx = text_models.lookup_encoder(VOCAB, DIM, **kwargs)
    return load_model(spec(post, max_length=max_length), 1, onnx, CPU)


def expected(
    text: str, pooling: str = "mean", normalize: bool = False, max_length: int = 256
) -> np.ndarray:
    """The lookup encoder's vector for one text alone, in numpy."""
    tok = tokenizers.Tokenizer.from_str(TOKENIZER.decode())
    tok.enable_truncation(max_length=max_length)
    states = text_models.lookup_table(VOCAB, DIM)[tok.encode(text).ids].astype(np.float64)
    vector = states.mean(axis=0) if pooling == "mean" else states[0]
    return vector / np.linalg.norm(vector) if normalize else vector


def input_errors(metrics: EngineMetrics) -> float | None:
    labels = {"model": "t", "kind": "input"}
    return metrics.registry.get_sample_value("modelgate_prediction_errors_total", labels)


def server(model: CompiledModel) -> ModelServer:
    return ModelServer(model, trio.CapacityLimiter(2), metrics=EngineMetrics())


def vectors(outcomes: list[Any]) -> np.ndarray:
    assert all(isinstance(o, Prediction) for o in outcomes), outcomes
    return np.array([o.value["vector"] for o in outcomes])


# ----------------------------------------------------------------------------- loading


def test_load_a_text_model() -> None:
    model = lookup()
    assert model.text is not None
    assert model.text.inputs == {"input_ids": np.int64, "attention_mask": np.int64}
    assert model.max_batch is None
    assert "text inputs=['input_ids', 'attention_mask'] maxLength=256" in repr(model)
    with_types = lookup(token_types=True)
    assert with_types.text is not None
    assert list(with_types.text.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    int32 = lookup(dtype="int32")
    assert int32.text is not None and set(int32.text.inputs.values()) == {np.dtype(np.int32)}


@pytest.mark.parametrize(
    ("kwargs", "post", "message"),
    [
        ({"inputs": ["x", "attention_mask"]}, None, "takes the inputs input_ids, attention_mask"),
        ({"inputs": ["input_ids"]}, None, "it has input_ids$"),
        (
            {"inputs": ["input_ids", "attention_mask", "position_ids"]},
            None,
            "it has input_ids, attention_mask, position_ids",
        ),
        ({"dtype": "float"}, None, "text input 'input_ids' must be integers, it is tensor"),
        ({"tokens": 16}, None, r"has shape \['batch', 16\]; it must be \[batch, tokens\]"),
        ({}, EmbeddingPostprocess("none"), "set postprocess.pooling to 'mean' or 'cls'"),
        ({}, ClassifyPostprocess(labels=("a", "b")), "labels were given"),
    ],
)
def test_refused_text_models(
    kwargs: dict[str, Any], post: Postprocess | None, message: str
) -> None:
    with pytest.raises(InvalidModel, match=message):
        lookup(post, **kwargs)


def test_a_fixed_batch_axis_is_refused() -> None:
    onnx = text_models.lookup_encoder(VOCAB, DIM)
    fixed = onnx.replace(b"batch", b"BATCH")  # still dynamic: only a rename
    load_model(spec(), 1, fixed, CPU)
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    for graph_input in model.graph.input:
        graph_input.type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(InvalidModel, match="both axes dynamic"):
        load_model(spec(), 1, model.SerializeToString(), CPU)


def test_a_tokenizer_without_tokens_for_the_sample_text_is_refused() -> None:
    vocab = {"[UNK]": 0, "red": 1}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace(tokenizers.Regex(r"[^\x01]"), "")  # deletes all text
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    onnx = text_models.lookup_encoder(4, DIM)
    with pytest.raises(InvalidModel, match="no tokens for a sample text"):
        load_model(spec(tokenizer=tok.to_str().encode()), 1, onnx, CPU)


def test_max_length_must_leave_room_for_text_and_fit_the_model() -> None:
    """[CLS] and [SEP] take 2 tokens: the tokenizer could not cut at 2 (it would not cut at
    all). The torch encoder has 512 positions: a longer maxLength fails its test run."""
    with pytest.raises(InvalidModel, match="maxLength' 2 leaves no room for text"):
        lookup(max_length=2)
    lookup(max_length=3)
    onnx = text_models.text_encoder().onnx
    load_model(spec(max_length=512), 1, onnx, CPU)
    with pytest.raises(InvalidModel, match=r"on a text of 513 tokens \(maxLength 513\)"):
        load_model(spec(max_length=513), 1, onnx, CPU)


def test_a_pooled_output_or_a_text_classifier_loads() -> None:
    lookup(EmbeddingPostprocess("none"), pooled=True)
    lookup(ClassifyPostprocess(labels=tuple("abcdef")), pooled=True)
    lookup(RawPostprocess(), pooled=True)


def test_the_torch_encoders_load() -> None:
    for kwargs in ({}, {"token_types": True}, {"pooled": True}, {"layers": 2, "dim": 16}):
        model = text_models.text_encoder(**kwargs)
        pooling = "none" if kwargs.get("pooled") else "mean"
        load_model(spec(EmbeddingPostprocess(pooling)), 1, model.onnx, CPU)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pooling


def test_pool_token_states_against_loops() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(4, 7, 5)).astype(np.float32)
    lengths = [7, 1, 4, 3]
    mask = np.array([[1] * n + [0] * (7 - n) for n in lengths])
    mean = pool_token_states(states, mask, EmbeddingPostprocess("mean"))
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(mean[row], states[row, :n].mean(axis=0), rtol=1e-5, atol=1e-6)
    cls = pool_token_states(states, mask, EmbeddingPostprocess("cls"))
    np.testing.assert_array_equal(cls, states[:, 0])
    np.testing.assert_allclose(
        pool_token_states(states, None, EmbeddingPostprocess("mean")), states.mean(axis=1)
    )
    assert pool_token_states(states, mask, EmbeddingPostprocess("none")) is states
    flat = states[:, 0]
    assert pool_token_states(flat, mask, EmbeddingPostprocess("mean")) is flat


def test_normalize_is_vectorised_and_equal_to_one_row_at_a_time() -> None:
    rng = np.random.default_rng(1)
    rows = list(rng.normal(size=(9, 5)).astype(np.float32))
    rows.append(np.zeros(5, dtype=np.float32))
    rows.append(np.array([1.0, np.nan, 0, 0, 0], dtype=np.float32))
    model_spec = spec(EmbeddingPostprocess("mean", normalize=True))
    results = postprocess_rows(rows, model_spec, 3)
    for row, result in zip(rows[:9], results[:9], strict=True):
        assert isinstance(result, dict)
        reference = row.astype(np.float64) / np.linalg.norm(row.astype(np.float64))
        np.testing.assert_allclose(result["vector"], reference, rtol=1e-12)
        assert result == postprocess(row, model_spec, 3)
        assert result["version"] == 3
    assert results[9] == {"vector": [0.0] * 5, "version": 3}  # stays zero
    assert str(results[10]) == "model gave a non-finite vector"
    plain = postprocess_rows(rows[:2], spec(EmbeddingPostprocess("mean")), 1)
    assert [r["vector"] for r in plain] == [r.astype(np.float64).tolist() for r in rows[:2]]  # type: ignore[index]


def test_postprocess_pools_one_row_of_token_states() -> None:
    states = np.arange(12, dtype=np.float32).reshape(3, 4)
    value = postprocess(states, spec(EmbeddingPostprocess("cls")), 1)
    assert value == {"vector": [0.0, 1.0, 2.0, 3.0], "version": 1}


# ----------------------------------------------------------------------------- serving


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [False, True])
async def test_vectors_match_numpy(pooling: str, normalize: bool) -> None:
    model = lookup(EmbeddingPostprocess(pooling, normalize))  # type: ignore[arg-type]
    outcomes = await server(model).predict_values(TEXTS)
    for text, vector in zip(TEXTS, vectors(outcomes), strict=True):
        np.testing.assert_allclose(vector, expected(text, pooling, normalize), rtol=1e-5, atol=1e-6)
    assert all(o.value["version"] == 1 for o in outcomes)  # type: ignore[union-attr]


async def test_truncation_and_token_types() -> None:
    model = lookup(token_types=True, max_length=5)
    long = "The small quiet speaker plays every day at home"
    [outcome] = await server(model).predict_values([long])
    # token types are 0 for one text: the same as without them, cut at 5 tokens
    np.testing.assert_allclose(
        vectors([outcome])[0], expected(long, max_length=5), rtol=1e-5, atol=1e-6
    )


async def test_mean_of_a_padded_batch_equals_each_text_alone() -> None:
    model = text_models.text_encoder(layers=2)
    compiled = load_model(spec(EmbeddingPostprocess("mean", True)), 1, model.onnx, CPU)
    together = vectors(await server(compiled).predict_values(TEXTS))
    alone = np.array([vectors(await server(compiled).predict_values([t]))[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    reference = text_models.embed_reference(model, TEXTS, normalize=True)
    np.testing.assert_allclose(together, reference, atol=1e-5)


async def test_bad_items_fail_alone_and_count_as_input_errors() -> None:
    metrics = EngineMetrics()
    model_server = ModelServer(lookup(), trio.CapacityLimiter(1), metrics=metrics)
    values = [TEXTS[0], 3, "", None, "  ", TEXTS[1], b"bytes"]
    outcomes = await model_server.predict_values(values)
    assert [type(o) for o in outcomes] == [
        Prediction,
        Failure,
        Failure,
        Failure,
        Failure,
        Prediction,
        Failure,
    ]
    good = vectors([outcomes[0], outcomes[5]])
    np.testing.assert_allclose(good, [expected(TEXTS[0]), expected(TEXTS[1])], atol=1e-6)
    assert outcomes[1] == Failure("expected a string, got int")
    assert outcomes[2] == Failure("expected text, got an empty or whitespace-only string")
    assert outcomes[3] == Failure("expected a string, got null")
    assert input_errors(metrics) == 5
    assert model_server.stats.batches == 1 and model_server.stats.batch_errors == 0


async def test_a_text_without_tokens_fails_alone_inside_its_batch() -> None:
    vocab = {"[UNK]": 0, "red": 1, "shoe": 2, "modelgate": 3}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # drops control characters
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    onnx = text_models.lookup_encoder(4, DIM)
    compiled = load_model(spec(tokenizer=tok.to_str().encode()), 1, onnx, CPU)
    metrics = EngineMetrics()
    model_server = ModelServer(compiled, trio.CapacityLimiter(1), metrics=metrics)
    outcomes = await model_server.predict_values(["red shoe", "\x01\x02", "shoe"])
    assert outcomes[1] == Failure("the text gives no tokens")
    table = text_models.lookup_table(4, DIM).astype(np.float64)
    good = vectors([outcomes[0], outcomes[2]])
    np.testing.assert_allclose(good, [table[[1, 2]].mean(0), table[2]], atol=1e-6)
    assert input_errors(metrics) == 1
    only = await model_server.predict_values(["\x01"])
    assert only == [Failure("the text gives no tokens")]


async def test_concurrent_callers_share_batches_and_keep_their_rows() -> None:
    model_server = ModelServer(lookup(), trio.CapacityLimiter(1), metrics=EngineMetrics())
    texts = text_models.sample_texts(40, seed=3)
    results: dict[int, list[Any]] = {}

    async def caller(i: int) -> None:
        results[i] = await model_server.predict_values([texts[i], 7 if i % 5 == 0 else texts[i]])

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(caller, i)
    for i, (first, second) in results.items():
        np.testing.assert_allclose(first.value["vector"], expected(texts[i]), rtol=1e-5, atol=1e-6)
        assert isinstance(second, Failure) == (i % 5 == 0)
    assert model_server.stats.batches < 40


async def test_predict_one_for_query_time_embedding() -> None:
    model_server = server(lookup(EmbeddingPostprocess("mean", normalize=True)))
    outcome = await model_server.predict_one("red shoe")
    assert isinstance(outcome, Prediction)
    np.testing.assert_allclose(outcome.value["vector"], expected("red shoe", normalize=True))
    assert await model_server.predict_one("") == Failure(
        "expected text, got an empty or whitespace-only string"
    )


async def test_a_text_classifier() -> None:
    labels = tuple("abcdef")
    model_server = server(lookup(ClassifyPostprocess(labels, top_k=1, softmax=False), pooled=True))
    [outcome] = await model_server.predict_values(["red shoe"])
    assert isinstance(outcome, Prediction)
    assert outcome.value["label"] == labels[int(np.argmax(expected("red shoe")))]
