"""Engine metrics (engine/metrics.py) as the instrumented parts move them: real
onnxruntime sessions, the in-memory registry of test_models, a real HTTP image server,
and the deferred worker over in-memory collections (tests/engine/fake_collection.py)."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import trio
from bson import ObjectId
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from bench.support import onnx_models
from bench.support.image_server import ImageServer, make_png
from engine.batching import Failure, ModelServer, Prediction
from engine.cache import ImageCache
from engine.deferred import DeferredSettings, DeferredWorkers, ModelWorker, insert_lag
from engine.errors import PredictionError
from engine.fetch import Fetcher, FetchSettings
from engine.leases import WorkQueue
from engine.metrics import PREDICTION_ERROR_KINDS, EngineMetrics
from engine.models import ModelSet
from engine.runtime import load_model
from engine.spec import ModelSpec
from tests.engine.fake_collection import FakeCollection
from tests.engine.test_models import ONNX, RUNTIME, InMemoryRegistry, spec
from tests.engine.test_runtime import CPU, image_spec, make_spec

GOOD = [1.0, 0.0, 0.0, 0.0]
CPU_PROVIDER = "CPUExecutionProvider"
FETCH = FetchSettings(allow_private=True, retries=0, retry_backoff=0.01, negative_ttl=0.0)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def errors_by_kind(registry: CollectorRegistry, model: str) -> dict[str, float | None]:
    return {
        kind: value(registry, "modelgate_prediction_errors_total", model=model, kind=kind)
        for kind in PREDICTION_ERROR_KINDS
    }


def fixed_batch_of_one_model() -> bytes:
    """The linear classifier, its output reshaped to [1, 3]: loads and runs one item, and
    onnxruntime fails any run of more (a model that fails in the session itself)."""
    w, b = onnx_models.linear_weights(4, 3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Reshape", ["logits", "shape"], ["y"]),
        ],
        "fixed_batch_of_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


# -- predictions -----------------------------------------------------------------------


async def test_a_successful_call_counts_its_items_run_and_wait() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    server = ModelServer(
        load_model(make_spec(), 1, ONNX, CPU), trio.CapacityLimiter(1), metrics=metrics
    )
    outcomes = await server.predict_values([GOOD, GOOD, GOOD])
    assert all(isinstance(o, Prediction) for o in outcomes)
    r = metrics.registry
    assert value(r, "modelgate_predictions_total", model="m") == 3
    # One call, idle model: one batch of three, one run, one request waiting for it.
    assert value(r, "modelgate_batch_size_count", model="m") == 1
    assert value(r, "modelgate_batch_size_sum", model="m") == 3
    assert value(r, "modelgate_inference_seconds_count", model="m") == 1
    assert value(r, "modelgate_queue_wait_seconds_count", model="m") == 1
    assert set(errors_by_kind(r, "m").values()) == {0}


async def test_failures_are_counted_by_kind() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    tensor = ModelServer(
        load_model(make_spec(), 1, ONNX, CPU), trio.CapacityLimiter(1), metrics=metrics
    )
    outcomes = await tensor.predict_values([GOOD, [1.0, 2.0], [float("nan"), 0.0, 0.0, 0.0], GOOD])
    # A wrong length is a bad input; NaN scores cannot become a classification.
    assert [type(o) for o in outcomes] == [Prediction, Failure, Failure, Prediction]
    assert value(metrics.registry, "modelgate_predictions_total", model="m") == 2
    assert errors_by_kind(metrics.registry, "m") == {
        "input": 1,
        "fetch": 0,
        "model": 0,
        "output": 1,
    }


async def test_a_failed_run_counts_every_item_of_its_batch_as_a_model_error() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    model = load_model(make_spec(), 1, fixed_batch_of_one_model(), CPU)
    server = ModelServer(model, trio.CapacityLimiter(1), metrics=metrics)
    assert isinstance((await server.predict_values([GOOD]))[0], Prediction)
    outcomes = await server.predict_values([GOOD, GOOD])  # one run of two: it fails
    assert all(isinstance(o, Failure) for o in outcomes)
    r = metrics.registry
    assert value(r, "modelgate_predictions_total", model="m") == 1
    assert errors_by_kind(r, "m")["model"] == 2
    assert value(r, "modelgate_inference_seconds_count", model="m") == 2  # failed runs too


async def test_fetch_failures_are_told_from_bad_images() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    server = ModelServer(
        load_model(image_spec(), 1, onnx_models.image_classifier(), CPU),
        trio.CapacityLimiter(1),
        metrics=metrics,
    )
    with ImageServer() as images:
        good = images.add_png("white", size=(28, 28), color=(255, 255, 255))
        async with Fetcher(FETCH, metrics=metrics) as fetcher:
            outcomes = await server.predict_values(
                [good, images.url("/404"), images.url("/notimage"), b"junk"],
                image_source=fetcher,
            )
    assert [type(o) for o in outcomes] == [Prediction, Failure, Failure, Failure]
    r = metrics.registry
    assert errors_by_kind(r, "m") == {"input": 2, "fetch": 1, "model": 0, "output": 0}
    assert value(r, "modelgate_image_fetch_errors_total", reason="http_4xx") == 1
    assert value(r, "modelgate_image_fetches_total") == 3  # the bad bytes needed no fetch


# -- the model set ---------------------------------------------------------------------


async def test_counters_continue_across_versions_and_vanish_with_the_model() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    models = ModelSet(InMemoryRegistry(), RUNTIME, metrics=metrics)
    r = metrics.registry
    await models.register(spec("m", mode="inline"), ONNX)
    await models.register(spec("other", mode="inline"), ONNX)
    assert value(r, "modelgate_model_info", model="m", version="1", provider=CPU_PROVIDER) == 1

    v1 = models.get("m")
    assert v1 is not None
    await v1.predict_values([GOOD, GOOD])
    await models.register(spec("m", mode="inline"), ONNX)
    v2 = models.get("m")
    assert v2 is not None and v2 is not v1
    await v2.predict_values([GOOD, [0.0]])
    assert value(r, "modelgate_predictions_total", model="m") == 3
    assert errors_by_kind(r, "m")["input"] == 1
    assert value(r, "modelgate_batch_size_count", model="m") == 2
    # The new version's info series replaces the old one's.
    assert value(r, "modelgate_model_info", model="m", version="1", provider=CPU_PROVIDER) is None
    assert value(r, "modelgate_model_info", model="m", version="2", provider=CPU_PROVIDER) == 1

    await models.drop("m")
    exported = [sample for family in r.collect() for sample in family.samples]
    assert not [s for s in exported if s.labels.get("model") == "m"]
    assert [s for s in exported if s.labels.get("model") == "other"]
    # A late request on the dropped version brings none of its series back.
    await v2.predict_values([GOOD])
    assert value(r, "modelgate_predictions_total", model="m") is None


# -- image fetch and cache -------------------------------------------------------------


@pytest.fixture
def images() -> Iterator[ImageServer]:
    with ImageServer(slow_seconds=3.0) as server:
        yield server


async def test_fetches_cache_hits_misses_and_bytes(images: ImageServer, tmp_path: Path) -> None:
    metrics = EngineMetrics(CollectorRegistry())
    r = metrics.registry
    url = images.add_png("a", size=(8, 8))
    size = len(images.images["a"])
    with ImageCache(tmp_path / "cache", max_bytes=1 << 20, metrics=metrics) as cache:
        assert value(r, "modelgate_image_cache_bytes") == 0
        async with Fetcher(FETCH, cache, metrics=metrics) as fetcher:
            for _ in range(3):
                assert await fetcher.fetch(url) == images.images["a"]
        assert value(r, "modelgate_image_fetches_total") == 1
        assert value(r, "modelgate_image_cache_misses_total") == 1
        assert value(r, "modelgate_image_cache_hits_total") == 2
        assert value(r, "modelgate_image_cache_bytes") == size
        cache.delete(url)
        assert value(r, "modelgate_image_cache_bytes") == 0
    # A cache opened on the same directory reads the stored total at once.
    reopened = EngineMetrics(CollectorRegistry())
    with ImageCache(tmp_path / "cache", max_bytes=1 << 20, metrics=reopened) as cache:
        cache.put("http://example.test/b.png", make_png())
    with ImageCache(tmp_path / "cache", max_bytes=1 << 20, metrics=reopened):
        assert value(reopened.registry, "modelgate_image_cache_bytes") == len(make_png())


@pytest.mark.parametrize(
    ("path", "settings", "reason"),
    [
        ("/404", FETCH, "http_4xx"),
        ("/500-then-ok", FETCH, "http_5xx"),
        ("/loop", FETCH, "redirects"),
        ("/endless", dataclasses.replace(FETCH, max_bytes=1000), "too_large"),
        ("/img/a.png", dataclasses.replace(FETCH, allow_private=False), "blocked"),
    ],
)
async def test_fetch_errors_are_counted_by_reason(
    images: ImageServer, path: str, settings: FetchSettings, reason: str
) -> None:
    metrics = EngineMetrics(CollectorRegistry())
    images.add_png("a")
    async with Fetcher(settings, metrics=metrics) as fetcher:
        with pytest.raises(PredictionError):
            await fetcher.fetch(images.url(path))
    by_reason = {
        sample.labels["reason"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "modelgate_image_fetch_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert by_reason[reason] == 1
    assert sum(by_reason.values()) == 1


async def test_every_retry_is_a_network_fetch(images: ImageServer) -> None:
    metrics = EngineMetrics(CollectorRegistry())
    async with Fetcher(dataclasses.replace(FETCH, retries=2), metrics=metrics) as fetcher:
        await fetcher.fetch(images.url("/500-then-ok?retried"))  # 500, 500, then 200
    assert value(metrics.registry, "modelgate_image_fetches_total") == 3
    assert value(metrics.registry, "modelgate_image_fetch_errors_total", reason="http_5xx") == 0


async def test_a_scheme_refused_before_any_request_is_no_fetch() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    async with Fetcher(FETCH, metrics=metrics) as fetcher:
        with pytest.raises(PredictionError):
            await fetcher.fetch("ftp://example.test/a.png")
    assert value(metrics.registry, "modelgate_image_fetch_errors_total", reason="scheme") == 1
    assert value(metrics.registry, "modelgate_image_fetches_total") == 0


# -- deferred work ---------------------------------------------------------------------


def test_insert_lag_counts_fresh_inserts_only() -> None:
    registered = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    now = registered + datetime.timedelta(seconds=30)
    fresh = ObjectId.from_datetime(registered + datetime.timedelta(seconds=10))
    older = ObjectId.from_datetime(registered - datetime.timedelta(seconds=10))
    assert insert_lag(fresh, registered, now) == 20.0
    assert insert_lag(fresh, registered.replace(tzinfo=None), now) == 20.0  # as pymongo reads it
    assert insert_lag(older, registered, now) is None  # backfill, not lag
    assert insert_lag(7, registered, now) is None  # no insert time to go by


class InMemoryWorkers(DeferredWorkers):
    """DeferredWorkers whose queues are over in-memory collections."""

    def __init__(self, models: ModelSet, settings: DeferredSettings) -> None:
        super().__init__(models, None, settings)  # type: ignore[arg-type]
        self.collections = {name: FakeCollection() for name in ("docs", "leases", "fail", "st")}

    def queue_for(self, server: ModelServer) -> WorkQueue:
        c = self.collections
        return WorkQueue(
            server.model.spec,
            server.version,
            self.owner,
            collection=c["docs"],  # type: ignore[arg-type]
            leases=c["leases"],  # type: ignore[arg-type]
            failures=c["fail"],  # type: ignore[arg-type]
            stats=c["st"],  # type: ignore[arg-type]
        )


def deferred_spec() -> ModelSpec:
    return spec("d")


async def test_a_deferred_drain_keeps_its_gauges_and_counters() -> None:
    metrics = EngineMetrics(CollectorRegistry())
    models = ModelSet(InMemoryRegistry(), RUNTIME, metrics=metrics)
    await models.register(deferred_spec(), ONNX)
    workers = InMemoryWorkers(models, DeferredSettings(max_attempts=1, sweep_interval=60.0))
    docs = workers.collections["docs"]
    ids = [ObjectId() for _ in range(4)]
    docs.documents = [{"_id": i, "x": GOOD} for i in ids[:3]] + [{"_id": ids[3], "x": [0.0]}]
    # Another holder's lease, expired: the claim takes it over.
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    workers.collections["leases"].documents = [
        {
            "_id": {"model": "d", "doc": ids[0]},
            "model": "d",
            "doc": ids[0],
            "owner": "gone",
            "batch": "old",
            "expires": expired,
        }
    ]
    r = metrics.registry
    worker = ModelWorker(workers, "d")
    workers.workers["d"] = worker
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        worker.kick()
        with trio.fail_after(30):
            while value(r, "modelgate_deferred_lag_seconds_count", model="d") != 4:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert all("d" in doc["_outputs"] for doc in docs.documents)
    assert value(r, "modelgate_deferred_pending", model="d") == 0
    assert value(r, "modelgate_deferred_in_progress", model="d") == 0
    assert value(r, "modelgate_deferred_failed", model="d") == 1  # the bad input's record
    assert value(r, "modelgate_deferred_lease_takeovers_total", model="d") == 1
    assert value(r, "modelgate_deferred_duplicates_total", model="d") == 0

    # A status pass counts the queue: a new document, pending, shows at once.
    docs.documents.append({"_id": ObjectId(), "x": GOOD})
    server = models.get("d")
    assert server is not None
    status = await workers.status(server)
    assert status["pending"] == 1
    assert value(r, "modelgate_deferred_pending", model="d") == 1
    assert value(r, "modelgate_deferred_failed", model="d") == 1

    await models.drop("d")
    assert value(r, "modelgate_deferred_pending", model="d") is None
    assert value(r, "modelgate_deferred_lag_seconds_count", model="d") is None
