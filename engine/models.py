"""The models this process serves: the registry's current versions, loaded and ready.

Every modelgate process on an upstream keeps its ModelSet in step with the registry by
polling it, so a model registered through one proxy is served by all of them, and a
restarted proxy serves what was registered before. Switching to a new version replaces
one dictionary entry: requests in flight keep the ModelServer they started with.

Whoever must follow the set (the deferred workers) waits on `next_change` rather than
polling it: every install and removal wakes them."""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from engine.batching import ModelServer
from engine.errors import ModelgateError, ModelNotFound
from engine.inputs import ImageSource
from engine.metrics import EngineMetrics
from engine.registry import ModelRecord
from engine.runtime import CompiledModel, RuntimeSettings, load_model
from engine.spec import ModelSpec
from engine.upstream_failures import UpstreamRefusal

__all__ = ["ModelSet", "Registry"]

log = logging.getLogger(__name__)


class Registry(Protocol):
    """What the model set needs of the registry: engine.registry.ModelRegistry in the
    proxy (synchronous, called from worker threads); an in-memory one in unit tests."""

    def register(self, spec: ModelSpec, onnx_bytes: bytes) -> ModelRecord: ...
    def drop(self, name: str) -> ModelRecord: ...
    def get(self, name: str) -> ModelRecord: ...
    def current_versions(self) -> dict[str, int]: ...
    def onnx_bytes(self, record: ModelRecord) -> bytes: ...


class ModelSet:
    def __init__(
        self,
        registry: Registry,
        runtime: RuntimeSettings,
        *,
        image_source: ImageSource | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.image_source = image_source
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.limiter = trio.CapacityLimiter(runtime.max_concurrent_runs)
        self.servers: dict[str, ModelServer] = {}
        self.records: dict[str, ModelRecord] = {}
        self._inline: dict[str, list[ModelServer]] = {}
        self._deferred: dict[str, list[ModelServer]] = {}
        self._refresh_lock = trio.Lock()
        self._changed = trio.Event()
        self._loaded = trio.Event()
        self._answered = trio.Event()

    # -- lookups used on every write ---------------------------------------------------

    @property
    def has_inline(self) -> bool:
        return bool(self._inline)

    def inline_for(self, namespace: str) -> list[ModelServer]:
        return self._inline.get(namespace, [])

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def has_deferred_on(self, namespace: str) -> bool:
        return namespace in self._deferred

    def deferred_for(self, namespace: str) -> list[ModelServer]:
        return self._deferred.get(namespace, [])

    def deferred_namespaces(self) -> set[str]:
        return set(self._deferred)

    def deferred_models(self) -> dict[str, ModelServer]:
        """Every deferred model served, by name."""
        return {
            server.model.spec.name: server
            for servers in self._deferred.values()
            for server in servers
        }

    def get(self, name: str) -> ModelServer | None:
        return self.servers.get(name)

    @property
    def registry_loaded(self) -> bool:
        """Whether the registry has been read once: until then a restarted process does not
        know the models registered before (readiness waits for it)."""
        return self._loaded.is_set()

    @property
    def registry_answered(self) -> bool:
        """Whether the upstream has answered a read of the registry, with the models or
        with a refusal (modelgate's own connection may not read it: no model can be
        served then). Writes wait for it: until then one could miss a model."""
        return self._answered.is_set()

    async def wait_until_answered(self) -> None:
        await self._answered.wait()

    async def next_change(self) -> None:
        """Return once a model is installed, replaced or removed. A caller that looks at
        the set and then waits here misses nothing: there is no checkpoint between."""
        await self._changed.wait()

    # -- changes -------------------------------------------------------------------------

    async def register(self, spec: ModelSpec, onnx_bytes: bytes) -> ModelRecord:
        """Validate by loading, store as version n+1, and serve it at once."""
        model = await trio.to_thread.run_sync(load_model, spec, 0, onnx_bytes, self.runtime)
        # Under the refresh lock: a refresh that read the registry before this version was
        # stored must not apply its stale view afterwards (it would remove the new model).
        async with self._refresh_lock:
            record = await trio.to_thread.run_sync(self.registry.register, spec, onnx_bytes)
            model.version = record.version
            self._install(record, model)
        return record

    async def drop(self, name: str) -> ModelRecord:
        # Under the refresh lock, so that a refresh with a stale view cannot serve it again.
        async with self._refresh_lock:
            record = await trio.to_thread.run_sync(self.registry.drop, name)
            self._remove(name)
        return record

    async def refresh(self) -> None:
        """Bring the served models in step with the registry."""
        async with self._refresh_lock:
            try:
                versions = await trio.to_thread.run_sync(self.registry.current_versions)
            except UpstreamRefusal:
                self._answered.set()
                raise
            for name in list(self.servers):
                if name not in versions:
                    log.info("model '%s' was dropped", name)
                    self._remove(name)
            for name, version in versions.items():
                served = self.records.get(name)
                if served is not None and served.version >= version:
                    continue
                try:
                    record = await trio.to_thread.run_sync(self.registry.get, name)
                except ModelNotFound:
                    continue  # dropped since the versions were read
                try:
                    model = await trio.to_thread.run_sync(self._load, record)
                except ModelgateError as exc:
                    # Keep serving the previous version (if any) rather than none.
                    log.error("cannot load model '%s' v%d: %s", name, record.version, exc)
                    continue
                self._install(record, model)
            self._loaded.set()
            self._answered.set()

    def _load(self, record: ModelRecord) -> CompiledModel:
        onnx_bytes = self.registry.onnx_bytes(record)
        return load_model(record.spec, record.version, onnx_bytes, self.runtime)

    async def refresh_forever(self, interval: float) -> None:
        while True:
            try:
                await self.refresh()
            except ModelgateError as exc:
                log.warning("model registry refresh failed: %s", exc)
            await trio.sleep(interval)

    def _install(self, record: ModelRecord, model: CompiledModel) -> None:
        previous = self.records.get(record.spec.name)
        if previous is not None and previous.version > record.version:
            return
        self.records[record.spec.name] = record
        self.servers[record.spec.name] = ModelServer(model, self.limiter, metrics=self.metrics)
        # The session's first provider is the one it runs on; the rest are fallbacks.
        self.metrics.serve_model(record.spec.name, record.version, model.providers[0])
        log.info(
            "serving model '%s' v%d on %s (%s, %s)",
            record.spec.name,
            record.version,
            record.spec.namespace,
            record.spec.mode,
            ", ".join(model.providers),
        )
        self._reindex()

    def _remove(self, name: str) -> None:
        self.records.pop(name, None)
        self.servers.pop(name, None)
        self.metrics.forget_model(name)
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the per-namespace lookups after a change, and announce the change."""
        inline: dict[str, list[ModelServer]] = {}
        deferred: dict[str, list[ModelServer]] = {}
        for server in self.servers.values():
            by_mode = inline if server.model.spec.mode == "inline" else deferred
            by_mode.setdefault(server.model.spec.namespace, []).append(server)
        self._inline = inline
        self._deferred = deferred
        self._changed.set()
        self._changed = trio.Event()
