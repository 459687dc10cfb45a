"""The model set (engine/models.py) over an in-memory registry: real onnxruntime sessions,
no server. Two ModelSets on one registry stand for two modelgate processes on one
upstream."""

from __future__ import annotations

import datetime
import hashlib
import threading

import pytest
import trio
import trio.testing

from bench.support import onnx_models
from engine.errors import HostUnreachable, ModelgateError, ModelNotFound
from engine.models import ModelSet
from engine.registry import ModelRecord
from engine.runtime import RuntimeSettings
from engine.spec import ClassifyPostprocess, Mode, ModelSpec, TensorPreprocess
from engine.upstream_failures import UpstreamRefusal

RUNTIME = RuntimeSettings(providers=("CPUExecutionProvider",), intra_op_threads=1)
ONNX = onnx_models.linear_classifier()


def spec(name: str = "m", mode: Mode = "deferred", namespace: str = "db.items") -> ModelSpec:
    return ModelSpec(
        name=name,
        namespace=namespace,
        input_field="x",
        output_field=f"_outputs.{name}",
        mode=mode,
        preprocess=TensorPreprocess(),
        postprocess=ClassifyPostprocess(labels=("a", "b", "c")),
    )


class InMemoryRegistry:
    """engine.registry.ModelRegistry's contract over dictionaries. Its methods run in
    worker threads, as the real one's do. `hold_reads()` makes `current()` take its
    snapshot and then wait for `release_reads()`: a refresh holding a stale view."""

    def __init__(self) -> None:
        self.records: dict[str, ModelRecord] = {}
        self.files: dict[str, bytes] = {}
        self.registrations = 0
        self.failure: ModelgateError | None = None  # what current_versions raises, if set
        self.reading = threading.Event()
        self._reads_open = threading.Event()
        self._reads_open.set()
        self._lock = threading.Lock()

    def register(self, spec: ModelSpec, onnx_bytes: bytes) -> ModelRecord:
        with self._lock:
            previous = self.records.get(spec.name)
            version = previous.version + 1 if previous is not None else 1
            file_id = f"{spec.name}.v{version}"
            self.files[file_id] = onnx_bytes
            record = ModelRecord(
                spec,
                version,
                file_id,
                hashlib.sha256(onnx_bytes).hexdigest(),
                len(onnx_bytes),
                datetime.datetime.now(datetime.UTC),
            )
            self.records[spec.name] = record
            self.registrations += 1
            return record

    def drop(self, name: str) -> ModelRecord:
        with self._lock:
            record = self.get(name)
            del self.records[name]
            return record

    def get(self, name: str) -> ModelRecord:
        record = self.records.get(name)
        if record is None:
            raise ModelNotFound(f"no model named '{name}'")
        return record

    def current_versions(self) -> dict[str, int]:
        if self.failure is not None:
            raise self.failure
        with self._lock:
            snapshot = {name: record.version for name, record in self.records.items()}
        self.reading.set()
        self._reads_open.wait()
        return snapshot

    def onnx_bytes(self, record: ModelRecord) -> bytes:
        return self.files[record.onnx_file_id]

    def hold_reads(self) -> None:
        self.reading.clear()
        self._reads_open.clear()

    def release_reads(self) -> None:
        self._reads_open.set()


def model_set(registry: InMemoryRegistry) -> ModelSet:
    return ModelSet(registry, RUNTIME)


def served_version(models: ModelSet, name: str = "m") -> int | None:
    server = models.get(name)
    return None if server is None else server.version


async def test_a_registered_model_is_served_at_once_and_found_by_namespace() -> None:
    models = model_set(InMemoryRegistry())
    first = await models.register(spec("d1"), ONNX)
    await models.register(spec("i1", mode="inline"), ONNX)
    await models.register(spec("d2", namespace="db.other"), ONNX)
    assert first.version == 1
    assert served_version(models, "d1") == 1
    d1, i1, d2 = (models.get(name) for name in ("d1", "i1", "d2"))
    assert models.deferred_for("db.items") == [d1]
    assert models.inline_for("db.items") == [i1]
    assert models.deferred_for("db.nothing") == []
    assert models.deferred_namespaces() == {"db.items", "db.other"}
    assert models.deferred_models() == {"d1": d1, "d2": d2}
    assert models.has_deferred_on("db.other")
    assert not models.has_deferred_on("db.nothing")


async def test_refresh_serves_and_drops_what_another_process_registered_and_dropped() -> None:
    registry = InMemoryRegistry()
    here, there = model_set(registry), model_set(registry)
    await there.register(spec(), ONNX)
    assert served_version(here) is None
    await here.refresh()
    assert served_version(here) == 1
    assert list(here.deferred_models()) == ["m"]
    await there.drop("m")
    assert served_version(there) is None
    await here.refresh()
    assert served_version(here) is None
    assert here.deferred_models() == {}
    assert here.deferred_for("db.items") == []


async def test_a_newer_version_wins() -> None:
    registry = InMemoryRegistry()
    here, there = model_set(registry), model_set(registry)
    await here.register(spec(), ONNX)
    stale_record = registry.get("m")
    await there.register(spec(), ONNX)
    await here.refresh()
    assert served_version(here) == 2
    assert here.deferred_for("db.items") == [here.get("m")]
    # A registry read that still shows version 1 does not take the process back.
    registry.records["m"] = stale_record
    await here.refresh()
    assert served_version(here) == 2


async def test_a_stale_refresh_does_not_undo_a_registration() -> None:
    """A refresh that read the registry before a registration was stored applies its
    view before the registration is installed, never after it."""
    registry = InMemoryRegistry()
    models = model_set(registry)
    registry.hold_reads()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(models.refresh)
        await trio.to_thread.run_sync(registry.reading.wait)  # its view: no models
        nursery.start_soon(models.register, spec(), ONNX)
        # Until the registration is stored, or waits for the refresh to finish.
        while not (registry.registrations or models._refresh_lock.statistics().tasks_waiting):
            await trio.sleep(0.01)
        registry.release_reads()
    assert served_version(models) == 1
    assert list(models.deferred_models()) == ["m"]


async def test_changes_wake_whoever_waits_for_them() -> None:
    registry = InMemoryRegistry()
    models, other = model_set(registry), model_set(registry)
    changes = 0

    async def follow() -> None:
        nonlocal changes
        while True:
            await models.next_change()
            changes += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        await models.register(spec(), ONNX)
        await trio.testing.wait_all_tasks_blocked()
        assert changes == 1
        await models.refresh()  # nothing new: no change
        await trio.testing.wait_all_tasks_blocked()
        assert changes == 1
        await other.register(spec(), ONNX)
        await models.refresh()  # version 2, from another process
        await trio.testing.wait_all_tasks_blocked()
        assert changes == 2
        await models.drop("m")
        await trio.testing.wait_all_tasks_blocked()
        assert changes == 3
        nursery.cancel_scope.cancel()


async def test_the_registry_counts_as_answered_once_read_or_refused() -> None:
    """Writes wait until the upstream answers a read of the registry: an unreachable
    upstream is no answer; a refusal (modelgate may not read it) is one, though no model
    can be served then; readiness waits for a read."""
    registry = InMemoryRegistry()
    models = model_set(registry)
    assert not models.registry_answered and not models.registry_loaded
    registry.failure = HostUnreachable("the upstream did not answer")
    with pytest.raises(HostUnreachable):
        await models.refresh()
    assert not models.registry_answered and not models.registry_loaded
    registry.failure = UpstreamRefusal("not authorized", code=13, code_name="Unauthorized")
    with pytest.raises(UpstreamRefusal):
        await models.refresh()
    assert models.registry_answered and not models.registry_loaded
    registry.failure = None
    await models.refresh()
    assert models.registry_answered and models.registry_loaded
