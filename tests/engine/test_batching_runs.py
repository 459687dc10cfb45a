"""Where a batch's work happens: tensor inputs converted all at once (the same arrays as
one by one), image bytes decoded in the run's own thread hop (a bad image failing alone),
and a model whose runs take less than a thread hop run on the event loop."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from bson import Int64

from bench.support import onnx_models
from bench.support.image_server import make_png
from engine import batching, runtime
from engine.batching import Failure, ModelServer, Prediction
from engine.errors import PredictionError
from engine.inputs import tensor_from_value, tensors_from_values
from engine.runtime import load_model
from tests.engine.test_runtime import CPU, image_spec, make_spec, one_hot

VALUES: list[Any] = [
    [1.0, 0.0, 0.0, 0.0],
    [0, 1, 0, 0],  # ints only: converted as ints, as alone
    [0.5, 1, Int64(2), 3],  # a float among ints: converted as floats, as alone
    [1.0, 2.0],  # the wrong size
    [True, 0.0, 0.0, 0.0],  # a boolean among the numbers
    [[1.0, 0.0], [0.0, 0.0]],  # nested: reshaped, alone
    [2**63, 0, 0, 0],  # past int64: alone
    [-(2**64), 0, 0, 0],  # no numpy integer holds it
    None,
    "text",
    7.0,
    [1.0, "a", 0.0, 0.0],
    [0.25, -0.0, 1e6, -3.5],
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_tensors_all_at_once_are_the_arrays_of_each_alone(dtype: type) -> None:
    # Past int64, numpy warns on the cast into int64 (alone as well).
    values = [v for v in VALUES if dtype is not np.int64 or v != [2**63, 0, 0, 0]]
    together = tensors_from_values(values, (4,), np.dtype(dtype))
    assert len(together) == len(values)
    for value, got in zip(values, together, strict=True):
        try:
            expected = tensor_from_value(value, (4,), np.dtype(dtype))
        except PredictionError as e:
            assert isinstance(got, PredictionError) and got.message == e.message, value
            continue
        assert isinstance(got, np.ndarray), value
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def _thread_of_each_run(model: Any, delay_s: float = 0.0) -> list[bool]:
    """Wraps the model's run_items: each run appends whether it ran on the caller's
    (the event loop's) thread."""
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    real = model.run_items

    def run_items(items: Any) -> Any:
        on_loop.append(threading.get_ident() == loop_thread)
        # Busy for delay_s of this thread's CPU time: a run's cost is its CPU time.
        busy_until = time.thread_time() + delay_s
        while time.thread_time() < busy_until:
            pass
        return real(items)

    model.run_items = run_items
    return on_loop


async def test_a_model_quicker_than_a_thread_hop_runs_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The threshold set high: how quick this machine is must not decide the test.
    monkeypatch.setattr(batching, "INLINE_RUN_S", 10.0)
    model = load_model(make_spec(), 1, onnx_models.linear_classifier(), CPU)
    on_loop = _thread_of_each_run(model)
    server = ModelServer(model, trio.CapacityLimiter(1))
    for i in range(3):
        [outcome] = await server.predict_values([one_hot(i).tolist()])
        assert isinstance(outcome, Prediction) and outcome.value["label"] == "abc"[i]
    # The first run is measured in a thread; the next ones know it is quick.
    assert on_loop == [False, True, True]


async def test_a_lone_request_to_an_idle_quick_model_skips_the_batch_machinery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It gets what a batch of its own would give (rows, counters, a failed run failing
    each item), without opening a batch (nothing could join it on the loop anyway)."""
    monkeypatch.setattr(batching, "INLINE_RUN_S", 10.0)
    model = load_model(make_spec(), 1, onnx_models.linear_classifier(), CPU)
    server = ModelServer(model, trio.CapacityLimiter(1))
    opened: list[Any] = []
    real_batch = batching._Batch

    def counting_batch(opened_at: float) -> Any:
        opened.append(opened_at)
        return real_batch(opened_at)

    monkeypatch.setattr(batching, "_Batch", counting_batch)
    await server.predict_values([one_hot(0).tolist()])  # measured in a thread: a batch
    outcomes = await server.predict_values([one_hot(1).tolist(), one_hot(2).tolist()])
    assert [o.value["label"] for o in outcomes if isinstance(o, Prediction)] == ["b", "c"]
    assert len(opened) == 1
    assert server.stats.batches == 2 and server.stats.batched_items == 3
    assert server.stats.predicted == 3
    # A request none of whose values is an input runs nothing: no batch, no failed one.
    [failure] = await server.predict_values([[1.0, 2.0]])
    assert isinstance(failure, Failure) and server.stats.batches == 2
    assert server.stats.batch_errors == 0

    def broken(items: Any) -> Any:
        raise RuntimeError("boom")

    model.run_items = broken  # type: ignore[method-assign]
    outcomes = await server.predict_values([one_hot(0).tolist(), one_hot(1).tolist()])
    assert len(opened) == 1
    assert [o.message for o in outcomes] == ["model 'm' failed to run: boom"] * 2  # type: ignore[union-attr]
    assert server.stats.batch_errors == 1 and server.stats.errors == 3


async def test_a_request_while_the_model_runs_still_joins_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "INLINE_RUN_S", 10.0)
    model = load_model(make_spec(), 1, onnx_models.linear_classifier(), CPU)
    server = ModelServer(model, trio.CapacityLimiter(1))
    await server.predict_values([one_hot(0).tolist()])  # now known to be quick
    released = threading.Event()
    real = model.run_items
    first = [True]

    def held_once(items: Any) -> Any:
        if first[0]:
            first[0] = False
            released.wait()  # the first run holds its slot until the others have come
        return real(items)

    model.run_items = held_once  # type: ignore[method-assign]
    server.batcher._item_costs.clear()  # so the held run goes to a thread
    results: list[Any] = []

    async def predict(i: int) -> None:
        results.append(await server.predict_values([one_hot(i).tolist()]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(predict, 0)
        await trio.testing.wait_all_tasks_blocked()
        for i in (1, 2):
            nursery.start_soon(predict, i)
        await trio.testing.wait_all_tasks_blocked()
        released.set()
    assert len(results) == 3
    # The held run, then one batch of the two that came while it ran.
    assert server.stats.batches == 3 and server.stats.batched_items == 4


async def test_a_run_held_up_in_its_thread_does_not_keep_a_quick_model_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run's cost is its CPU time: the first run, in a thread, is held up (asleep here,
    as a run waiting for the GIL is) far past the threshold, and the next runs still go
    on the loop. 10 ms: far more CPU than this model's run takes on any machine."""
    monkeypatch.setattr(batching, "INLINE_RUN_S", 0.01)
    model = load_model(make_spec(), 1, onnx_models.linear_classifier(), CPU)
    on_loop: list[bool] = []
    loop_thread = threading.get_ident()
    real = model.run_items

    def held_up(items: Any) -> Any:
        on_loop.append(threading.get_ident() == loop_thread)
        if len(on_loop) == 1:
            time.sleep(0.05)
        return real(items)

    model.run_items = held_up  # type: ignore[method-assign]
    server = ModelServer(model, trio.CapacityLimiter(1))
    for i in range(3):
        [outcome] = await server.predict_values([one_hot(i).tolist()])
        assert isinstance(outcome, Prediction)
    assert on_loop == [False, True, True]


async def test_a_slower_model_runs_in_a_thread() -> None:
    model = load_model(make_spec(), 1, onnx_models.linear_classifier(), CPU)
    on_loop = _thread_of_each_run(model, delay_s=2 * batching.INLINE_RUN_S)
    server = ModelServer(model, trio.CapacityLimiter(1))
    for i in range(3):
        [outcome] = await server.predict_values([one_hot(i).tolist()])
        assert isinstance(outcome, Prediction)
    assert on_loop == [False, False, False]


async def test_images_are_decoded_in_the_runs_thread_and_a_bad_one_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.get_ident()
    decoded_in: list[int] = []
    real_decode = runtime.decode_item

    def decode_item(item: Any, pre: Any) -> Any:
        decoded_in.append(threading.get_ident())
        return real_decode(item, pre)

    monkeypatch.setattr(runtime, "decode_item", decode_item)

    class Source:
        async def fetch(self, url: str) -> bytes:
            return b"not an image" if url.endswith("bad") else make_png((28, 28), (0, 0, 0))

    server = ModelServer(
        load_model(image_spec(), 1, onnx_models.image_classifier(), CPU), trio.CapacityLimiter(1)
    )
    white = make_png((28, 28), (255, 255, 255))
    outcomes = await server.predict_values(
        [white, b"junk", "http://images/black", "http://images/bad", None],
        image_source=Source(),
    )
    assert [type(o) for o in outcomes] == [Prediction, Failure, Prediction, Failure, Failure]
    assert [o.value["label"] for o in outcomes if isinstance(o, Prediction)] == [
        "white",
        "black",
    ]
    assert "not an image" in outcomes[1].message  # type: ignore[union-attr]
    assert outcomes[3].message.startswith("image at http://images/bad: not an image")  # type: ignore[union-attr]
    assert "expected image bytes or a URL, got null" in outcomes[4].message  # type: ignore[union-attr]
    # The four images of the call were decoded in one hop, off the event loop.
    assert len(decoded_in) == 4 and len(set(decoded_in)) == 1 and loop_thread not in decoded_in
    assert server.stats.batches == 1 and server.stats.errors == 3
