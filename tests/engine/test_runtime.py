from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio

from bench.support import onnx_models
from engine.batching import Batcher, Failure, ModelServer, Prediction
from engine.errors import InvalidModel, PredictionError
from engine.runtime import CompiledModel, RuntimeSettings, load_model, resolve_providers
from engine.spec import (
    BatchPolicy,
    ClassifyPostprocess,
    EmbeddingPostprocess,
    ImagePreprocess,
    ModelSpec,
    Postprocess,
    Preprocess,
    RawPostprocess,
    TensorPreprocess,
)

CPU = RuntimeSettings(providers=("CPUExecutionProvider",))
LABELS = ("a", "b", "c")


def make_spec(
    preprocess: Preprocess | None = None,
    postprocess: Postprocess | None = None,
    batch: BatchPolicy | None = None,
) -> ModelSpec:
    return ModelSpec(
        name="m",
        namespace="db.coll",
        input_field="x",
        output_field="_outputs.m",
        mode="inline",
        preprocess=preprocess or TensorPreprocess(),
        postprocess=postprocess or ClassifyPostprocess(labels=LABELS, top_k=2),
        batch=batch or BatchPolicy(),
    )


def classifier(policy: BatchPolicy | None = None, **kwargs: Any) -> CompiledModel:
    return load_model(make_spec(batch=policy), 1, onnx_models.linear_classifier(**kwargs), CPU)


def one_hot(i: int, features: int = 4) -> np.ndarray:
    x = np.zeros(features, dtype=np.float32)
    x[i] = 1.0
    return x


# ----------------------------------------------------------------------------- load_model


def test_load_linear_classifier() -> None:
    model = classifier()
    assert model.providers == ("CPUExecutionProvider",)
    assert model.input_name == "x"
    assert model.input_dtype == np.float32
    assert model.item_shape == (4,)
    assert model.max_batch is None
    assert model.version == 1
    x = np.stack([one_hot(0), one_hot(1), one_hot(2), one_hot(3)])
    out = model.run(x)
    np.testing.assert_allclose(out, onnx_models.linear_logits(x), rtol=1e-6)
    assert out.argmax(axis=1).tolist() == [0, 1, 2, 0]


def test_io_binding_path() -> None:
    # The CUDA path binds input and output; exercise the same calls with the output on CPU.
    model = classifier(batch=2)
    assert model.output_device is None  # CPU provider: plain session.run
    model.output_device = "cpu"
    x = np.stack([one_hot(i % 3) for i in range(3)])
    np.testing.assert_allclose(model.run(x), onnx_models.linear_logits(x), rtol=1e-6)


def test_auto_providers_include_cpu() -> None:
    providers = resolve_providers(RuntimeSettings())
    assert providers[-1] == "CPUExecutionProvider"
    assert "TensorrtExecutionProvider" not in providers


def test_fixed_batch_runs_in_chunks() -> None:
    model = classifier(batch=1)
    assert model.max_batch == 1
    x = np.stack([one_hot(i % 3) for i in range(5)])
    out = model.run(x)
    assert out.shape == (5, 3)
    assert out.argmax(axis=1).tolist() == [0, 1, 2, 0, 1]


def test_fixed_batch_larger_than_one_pads() -> None:
    model = classifier(batch=4)
    assert model.max_batch == 4
    x = np.stack([one_hot(i % 3) for i in range(6)])
    assert model.run(x).argmax(axis=1).tolist() == [0, 1, 2, 0, 1, 2]


def test_garbage_bytes() -> None:
    with pytest.raises(InvalidModel, match="onnxruntime cannot load it") as info:
        load_model(make_spec(), 1, b"this is not an onnx model", CPU)
    assert info.value.code == 2


def test_labels_mismatch_static() -> None:
    spec = make_spec(postprocess=ClassifyPostprocess(labels=("a", "b", "c", "d", "e")))
    with pytest.raises(InvalidModel, match=r"3 classes .* 5 labels"):
        load_model(spec, 1, onnx_models.linear_classifier(classes=3), CPU)


def test_labels_mismatch_found_by_smoke_run() -> None:
    # The output's last dimension is 2 like the labels, but an item has 3 x 2 scores: only
    # running the model shows it.
    spec = make_spec(postprocess=ClassifyPostprocess(labels=("a", "b")))
    data = onnx_models.reshaped_classifier(classes=6, item=(3, 2))
    with pytest.raises(InvalidModel, match=r"shape \[1, 3, 2\] .* 2 labels"):
        load_model(spec, 1, data, CPU)


def test_two_inputs_rejected() -> None:
    with pytest.raises(InvalidModel, match="exactly one input"):
        load_model(make_spec(postprocess=RawPostprocess()), 1, onnx_models.two_input_model(), CPU)


def test_dynamic_item_dimension_rejected_for_tensor() -> None:
    with pytest.raises(InvalidModel, match="must be fixed"):
        load_model(
            make_spec(postprocess=RawPostprocess()), 1, onnx_models.dynamic_item_model(), CPU
        )


def image_spec(**kwargs: Any) -> ModelSpec:
    pre = ImagePreprocess(
        **{"size": (28, 28), "mode": "L", "mean": (0.0,), "std": (1.0,), **kwargs}
    )
    return make_spec(preprocess=pre, postprocess=ClassifyPostprocess(labels=("black", "white")))


def test_image_model_loads() -> None:
    model = load_model(image_spec(), 2, onnx_models.image_classifier(), CPU)
    assert model.item_shape == (1, 28, 28)
    nhwc = load_model(
        image_spec(size=(8, 6), mode="RGB", mean=(0.0,) * 3, std=(1.0,) * 3, layout="NHWC"),
        1,
        onnx_models.image_classifier(3, (8, 6), layout="NHWC"),
        CPU,
    )
    assert nhwc.item_shape == (8, 6, 3)


def test_image_model_dynamic_spatial_dims_accepted() -> None:
    model = load_model(
        image_spec(size=(10, 12)), 1, onnx_models.image_classifier(static_spatial=False), CPU
    )
    assert model.item_shape == (1, 10, 12)


@pytest.mark.parametrize(
    ("spec_kwargs", "fragment"),
    [
        ({"size": (32, 32)}, "H=32"),
        ({"mode": "RGB", "mean": (0.0,) * 3, "std": (1.0,) * 3}, "C=3"),
        ({"layout": "NHWC"}, "NHWC"),
    ],
)
def test_image_model_mismatch(spec_kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidModel, match=fragment):
        load_model(image_spec(**spec_kwargs), 1, onnx_models.image_classifier(), CPU)


def test_image_preprocess_needs_rank_4() -> None:
    with pytest.raises(InvalidModel, match="rank-4"):
        load_model(image_spec(), 1, onnx_models.linear_classifier(classes=2), CPU)


def test_embedding_and_raw_accept_any_output() -> None:
    for post in (EmbeddingPostprocess(), RawPostprocess()):
        model = load_model(make_spec(postprocess=post), 1, onnx_models.embedding_model(5), CPU)
        assert model.item_shape == (5,)


def test_run_shape_mismatch_is_prediction_error() -> None:
    model = classifier()
    with pytest.raises(PredictionError, match="shape"):
        model.run(np.zeros((2, 5), dtype=np.float32))


# ----------------------------------------------------------------------------- batching


async def test_many_concurrent_single_predictions_are_batched() -> None:
    model = classifier(policy=BatchPolicy(max_size=64, max_delay_ms=20))
    server = ModelServer(model, trio.CapacityLimiter(2))
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        [outcome] = await server.predict_values([one_hot(i % 3).tolist()])
        results[i] = outcome

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)

    for i in range(200):
        outcome = results[i]
        assert isinstance(outcome, Prediction), outcome
        assert outcome.value["label"] == LABELS[i % 3]
        assert outcome.value["version"] == 1
    snap = server.stats.snapshot()
    assert snap["predicted"] == 200
    assert snap["errors"] == 0
    assert snap["batches"] < 200
    assert snap["meanBatchSize"] > 1
    assert snap["latencyMs"]["p50"] <= snap["latencyMs"]["p99"]


async def test_large_call_split_across_batches() -> None:
    model = classifier(policy=BatchPolicy(max_size=8, max_delay_ms=1))
    batcher = Batcher(model, trio.CapacityLimiter(2))
    x = [one_hot(i % 3) for i in range(30)]
    out = await batcher.run(x)
    assert out.shape == (30, 3)
    assert out.argmax(axis=1).tolist() == [i % 3 for i in range(30)]
    assert batcher.stats.batches == 4


async def test_predict_values_mixes_failures_and_predictions() -> None:
    model = classifier()
    server = ModelServer(model, trio.CapacityLimiter(1))
    outcomes = await server.predict_values([[0, 1, 0, 0], "text", [1, 2], [0, 0, 1, 0], None])
    assert [type(o) for o in outcomes] == [Prediction, Failure, Failure, Prediction, Failure]
    assert outcomes[0].value["label"] == "b"  # type: ignore[union-attr]
    assert outcomes[3].value["label"] == "c"  # type: ignore[union-attr]
    assert "expected 4 values" in outcomes[2].message  # type: ignore[union-attr]
    assert server.stats.errors == 3
    assert server.stats.predicted == 2


async def test_cancelled_leader_does_not_strand_followers() -> None:
    model = classifier(policy=BatchPolicy(max_size=64, max_delay_ms=200))
    limiter = trio.CapacityLimiter(1)
    batcher = Batcher(model, limiter)
    follower_rows: dict[int, np.ndarray] = {}
    leader_scope = trio.CancelScope()
    leader_finished = trio.Event()
    # Another model holds the only run slot: the leader waits for it with its batch open.
    busy = object()
    await limiter.acquire_on_behalf_of(busy)

    async def leader() -> None:
        with leader_scope:
            await batcher.run([one_hot(0)])
        leader_finished.set()

    async def follower(i: int) -> None:
        follower_rows[i] = await batcher.run([one_hot(i)])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.sleep(0.01)  # the leader has opened the batch and is waiting
            for i in (1, 2):
                nursery.start_soon(follower, i)
            await trio.sleep(0.01)
            leader_scope.cancel()
            await trio.sleep(0.01)
            limiter.release_on_behalf_of(busy)
    assert leader_scope.cancelled_caught
    assert leader_finished.is_set()
    assert follower_rows[1].argmax(axis=1).tolist() == [1]
    assert follower_rows[2].argmax(axis=1).tolist() == [2]
    assert batcher.stats.batches == 1


async def test_cancelled_follower_does_not_break_batch() -> None:
    model = classifier(policy=BatchPolicy(max_size=64, max_delay_ms=50))
    batcher = Batcher(model, trio.CapacityLimiter(2))
    rows: list[np.ndarray] = []

    async def leader() -> None:
        rows.append(await batcher.run([one_hot(2)]))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.sleep(0.005)
            with trio.move_on_after(0.005):
                await batcher.run([one_hot(1)])
    assert rows[0].argmax(axis=1).tolist() == [2]


async def test_failing_run_fails_its_batch_and_next_batch_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = classifier(policy=BatchPolicy(max_size=64, max_delay_ms=20))
    server = ModelServer(model, trio.CapacityLimiter(2))
    real_run = model.run

    def broken_run(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(model, "run", broken_run)
    outcomes: list[Any] = []

    async def one(i: int) -> None:
        outcomes.extend(await server.predict_values([one_hot(i % 3).tolist()]))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert len(outcomes) == 10
    assert all(isinstance(o, Failure) and "CUDA out of memory" in o.message for o in outcomes)
    assert server.stats.errors == 10

    monkeypatch.setattr(model, "run", real_run)
    [ok] = await server.predict_values([one_hot(1).tolist()])
    assert isinstance(ok, Prediction)
    assert ok.value["label"] == "b"
    snap = server.stats.snapshot()
    assert snap["failedBatches"] == 1
    assert snap["predicted"] == 1


async def test_batcher_run_raises_prediction_error_on_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = classifier(policy=BatchPolicy(max_size=4, max_delay_ms=0))

    def broken_run(batch: np.ndarray) -> np.ndarray:
        raise PredictionError("model 'm' failed to run: boom")

    monkeypatch.setattr(model, "run", broken_run)
    batcher = Batcher(model, trio.CapacityLimiter(1))
    with pytest.raises(PredictionError, match="boom"):
        await batcher.run([one_hot(0)])


async def test_image_model_end_to_end() -> None:
    from tests.engine.test_inputs import png_bytes

    model = load_model(image_spec(), 1, onnx_models.image_classifier(), CPU)
    server = ModelServer(model, trio.CapacityLimiter(2))
    outcomes = await server.predict_values(
        [png_bytes("L", (40, 30), 255), png_bytes("RGB", (10, 10), (0, 0, 0)), b"junk"]
    )
    assert isinstance(outcomes[0], Prediction) and outcomes[0].value["label"] == "white"
    assert isinstance(outcomes[1], Prediction) and outcomes[1].value["label"] == "black"
    assert isinstance(outcomes[2], Failure) and "not an image" in outcomes[2].message


async def test_idle_model_runs_at_once_and_busy_model_gathers() -> None:
    # A lone request must not wait max_delay_ms for company that never comes.
    model = classifier(policy=BatchPolicy(max_size=64, max_delay_ms=5_000))
    limiter = trio.CapacityLimiter(1)
    batcher = Batcher(model, limiter)
    with trio.fail_after(2):
        rows = await batcher.run([one_hot(1)])
    assert rows.argmax(axis=1).tolist() == [1]
    # While the only run slot is taken, requests gather into one batch.
    busy = object()
    await limiter.acquire_on_behalf_of(busy)
    results: dict[int, np.ndarray] = {}

    async def request(i: int) -> None:
        results[i] = await batcher.run([one_hot(i % 3)])

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(request, i)
        await trio.sleep(0.05)
        limiter.release_on_behalf_of(busy)
    assert [results[i].argmax(axis=1).tolist() for i in range(10)] == [[i % 3] for i in range(10)]
    assert batcher.stats.batches == 2  # the lone request, then all ten together
