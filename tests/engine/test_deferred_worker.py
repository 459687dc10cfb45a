"""A deferred worker outlives its upstream's failures: an error in the middle of a batch
(while its leases are renewed beside it) is logged and the work is retried, never the
end of the process."""

from __future__ import annotations

import bson.errors
import pymongo
import pymongo.errors
import trio
from bson import ObjectId
from prometheus_client import CollectorRegistry

from engine.deferred import DeferredSettings, ModelWorker
from engine.metrics import EngineMetrics
from engine.models import ModelSet
from tests.engine.fake_collection import FakeCollection
from tests.engine.test_metrics import GOOD, InMemoryWorkers, deferred_spec
from tests.engine.test_models import ONNX, RUNTIME, InMemoryRegistry


class FlakyCollection(FakeCollection):
    """Loses the connection on its first bulk write, as an upstream that restarts does."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 1

    def bulk_write(
        self, requests: list[pymongo.UpdateOne], ordered: bool = True
    ) -> pymongo.results.BulkWriteResult:
        if self.failures_left:
            self.failures_left -= 1
            raise pymongo.errors.AutoReconnect("connection closed")
        return super().bulk_write(requests, ordered)


async def test_an_upstream_error_mid_batch_is_retried_not_fatal() -> None:
    models = ModelSet(InMemoryRegistry(), RUNTIME, metrics=EngineMetrics(CollectorRegistry()))
    await models.register(deferred_spec(), ONNX)
    workers = InMemoryWorkers(models, DeferredSettings(sweep_interval=0.05, lease_seconds=0.2))
    docs = FlakyCollection()
    docs.documents = [{"_id": ObjectId(), "x": GOOD} for _ in range(3)]
    workers.collections["docs"] = docs
    worker = ModelWorker(workers, "d")
    workers.workers["d"] = worker
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        worker.kick()
        with trio.fail_after(30):
            while not all("_outputs" in doc for doc in docs.documents):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert docs.failures_left == 0  # the failure happened, and the worker went on
    assert all(doc["_outputs"]["d"]["label"] for doc in docs.documents)


class UnencodableCollection(FakeCollection):
    """Fails its bulk writes as pymongo does for a value BSON cannot encode: not a
    PyMongoError."""

    def bulk_write(
        self, requests: list[pymongo.UpdateOne], ordered: bool = True
    ) -> pymongo.results.BulkWriteResult:
        raise bson.errors.InvalidDocument("cannot encode object: MISSING")


async def test_an_unexpected_error_pauses_the_model_instead_of_ending_the_process() -> None:
    models = ModelSet(InMemoryRegistry(), RUNTIME, metrics=EngineMetrics(CollectorRegistry()))
    await models.register(deferred_spec(), ONNX)
    workers = InMemoryWorkers(models, DeferredSettings(sweep_interval=0.05, pause_seconds=60))
    docs = UnencodableCollection()
    docs.documents = [{"_id": ObjectId(), "x": GOOD}]
    workers.collections["docs"] = docs
    worker = ModelWorker(workers, "d")
    workers.workers["d"] = worker
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)  # an error out of run would end the nursery
        worker.kick()
        with trio.fail_after(30):
            while not worker.paused(1):
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # a few sweeps: still paused, still running
        assert worker.status(1)["paused"] is True
        nursery.cancel_scope.cancel()
    assert worker.pause_reason == "unexpected error: InvalidDocument: cannot encode object: MISSING"
