"""Deferred models: predictions in the background with at-least-once delivery.

Each process runs one worker per deferred model. A worker wakes up when it is kicked
(a write through this proxy, a change-stream event for writes that went around it, in
the one process that follows the namespace's stream: engine.deferred_watch, or another
model's output appearing in a chain) and at least every sweep interval; then it
claims pending documents with leases in MongoDB, predicts them in batches through the
same batching and runtime as inline models, and writes the results with bulk updates
conditioned on the input being unchanged. The documents are the queue (engine/leases.py),
so a killed process loses nothing: its leases expire and another process takes over."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import pymongo
import pymongo.errors
import trio

from engine.batching import Failure, ModelServer, Outcome
from engine.deferred_watch import follow_namespace
from engine.documents import array_on_path, get_path, path_touches, through_array_message
from engine.errors import first_exception
from engine.leases import Claimed, WorkQueue
from engine.metrics import DeferredMetrics
from engine.models import ModelSet
from engine.outputs import error_record

__all__ = ["DeferredSettings", "DeferredWorkers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeferredSettings:
    change_streams: bool = True
    sweep_interval: float = 5.0
    lease_seconds: float = 30.0
    claim_size: int = 256
    max_attempts: int = 3
    retry_backoff: float = 1.0
    pause_seconds: float = 30.0
    progress_interval: float = 10.0


def process_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def insert_lag(
    doc_id: Any, served_since: datetime.datetime, now: datetime.datetime
) -> float | None:
    """Seconds from a document's insert (its ObjectId's time, to the second) to `now`;
    None when that time is unknown (not an ObjectId) or not a fresh write: a document
    inserted before the version was registered is backfill, and its age is no lag."""
    inserted = getattr(doc_id, "generation_time", None)
    if not isinstance(inserted, datetime.datetime):
        return None
    if served_since.tzinfo is None:  # pymongo decodes dates as naive UTC
        served_since = served_since.replace(tzinfo=datetime.UTC)
    if inserted < served_since.replace(microsecond=0):  # both to the second
        return None
    return max(0.0, (now - inserted).total_seconds())


class ModelWorker:
    """Works off one deferred model's pending documents, in this process."""

    def __init__(self, workers: DeferredWorkers, name: str) -> None:
        self.workers = workers
        self.name = name
        self.wakeup = trio.Event()
        # A pause holds for the version that failed: a new version (say, a fixed model)
        # starts afresh, as does retryFailed (resume).
        self.paused_until = 0.0
        self.paused_version: int | None = None
        self.pause_reason: str | None = None
        self.processed = 0
        self.duplicates = 0
        self.recent: list[tuple[float, int]] = []  # (time, documents) for the throughput
        # Documents claimed at once: shrunk while a batch takes more than half the lease
        # (an expired lease lets another process redo the work), grown back when quick.
        self.claim_limit = workers.settings.claim_size
        # True while a drain works off a backlog: the namespace's change stream pauses
        # meanwhile (engine.deferred_watch).
        self.draining = False
        self.idle = False  # the last claim found nothing pending at all

    def kick(self) -> None:
        self.wakeup.set()

    def paused(self, version: int) -> bool:
        return self.paused_version == version and time.monotonic() < self.paused_until

    def resume(self) -> None:
        """Lift a pause now and look for work."""
        self.paused_version = None
        self.pause_reason = None
        self.kick()

    def throughput(self, window: float = 60.0) -> float:
        now = time.monotonic()
        self.recent = [(t, n) for t, n in self.recent if now - t <= window]
        if not self.recent:
            return 0.0
        span = max(now - self.recent[0][0], 1.0)
        return sum(n for _, n in self.recent) / span

    async def run(self) -> None:
        settings = self.workers.settings
        ensured: int | None = None
        while True:
            with trio.move_on_after(settings.sweep_interval):
                await self.wakeup.wait()
            self.wakeup = trio.Event()
            server = self.workers.models.get(self.name)
            if server is None:
                return
            if self.paused(server.version):
                continue
            queue = self.workers.queue_for(server)
            # Taken while the model is served (no checkpoint since the lookup): a drop
            # while this pass runs leaves its updates on removed series (engine.metrics).
            gauges = self.workers.models.metrics.deferred(self.name)
            try:
                if ensured != server.version:
                    await trio.to_thread.run_sync(queue.ensure_index)
                    # Once per version: later the drains and status passes keep them.
                    pending = await trio.to_thread.run_sync(queue.count_pending)
                    failed = await trio.to_thread.run_sync(
                        partial(queue.count_outputs, failed=True)
                    )
                    gauges.pending.set(pending)
                    gauges.failed.set(failed)
                    ensured = server.version
                try:
                    await self._drain(server, queue, gauges)
                finally:
                    self.draining = False
            # A drain renews its leases in a task beside the batch, so an upstream error
            # can arrive wrapped in an exception group: caught either way, it must not end
            # the process (the upstream restarting is routine).
            except* pymongo.errors.PyMongoError as group:
                log.warning(
                    "deferred model '%s': upstream error, retrying: %s",
                    self.name,
                    first_exception(group),
                )
            # Anything else is a bug (such as a value the output write cannot encode): it
            # must not end the process and every model's work with it, nor spin. Pause
            # this model's version, as a model that fails for every document is paused;
            # its leases expire, and modelStatus says why.
            except* Exception as group:
                error = first_exception(group)
                log.error(
                    "deferred model '%s' v%d: unexpected error; pausing %gs",
                    self.name,
                    server.version,
                    settings.pause_seconds,
                    exc_info=error,
                )
                self.paused_until = time.monotonic() + settings.pause_seconds
                self.paused_version = server.version
                self.pause_reason = f"unexpected error: {type(error).__name__}: {error}"

    async def _drain(self, server: ModelServer, queue: WorkQueue, gauges: DeferredMetrics) -> None:
        """Claim and predict until nothing is pending (or the model was replaced).

        While a full batch is predicted and written, the next one is claimed beside it:
        the claim's round trips to the upstream overlap the model's run and the writes
        instead of following them. (After a batch that was not full there is little
        left, and claiming early would only keep it from other processes.)"""
        settings = self.workers.settings
        started = time.monotonic()
        last_progress = started
        reported = False  # a drain that showed progress also says when it caught up
        done = 0
        claimed = await self._claim(queue, gauges)
        while True:
            if self.workers.models.get(self.name) is not server:
                await trio.to_thread.run_sync(queue.release, claimed)
                return
            if claimed.scanned_to is None:
                gauges.pending.set(0)  # the scan found nothing pending at all
                if reported:
                    self._log_rate(server, done, started, prefix="caught up, ")
                return
            if not claimed.documents:
                # Whatever is pending, other processes hold (or waits for its retry):
                # leave it to them until the next wake-up (a write, or the sweep, which
                # takes over the leases of a process that died).
                return
            self.draining = True  # a backlog: see DeferredWorkers._busy
            batch_started = time.monotonic()
            held = [claimed]  # the leases to renew: this batch's, and the next one's
            # Not while other processes work on the model too: then each holds one batch
            # at a time (batches held at once cost the upstream more than they bring).
            ahead = len(claimed.documents) >= self.claim_limit and not claimed.shared
            gauges.in_progress.set(len(claimed.documents))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_leases, queue, held)
                    claiming = trio.Event()
                    if ahead:
                        nursery.start_soon(self._claim_ahead, queue, gauges, held, claiming)
                    written = await self._predict_batch(server, queue, claimed, gauges)
                    if ahead:
                        await claiming.wait()
                    nursery.cancel_scope.cancel()
            finally:
                gauges.in_progress.set(0)
            upcoming = held[1] if len(held) > 1 else None
            if written is None:
                if upcoming is not None:
                    await trio.to_thread.run_sync(queue.release, upcoming)
                return
            took = time.monotonic() - batch_started
            if took > settings.lease_seconds / 2:
                self.claim_limit = max(1, self.claim_limit // 2)
            elif took < settings.lease_seconds / 4:
                self.claim_limit = min(settings.claim_size, self.claim_limit * 2)
            done += written
            self.workers.kick_namespace(server.model.spec.namespace, except_model=self.name)
            if time.monotonic() - last_progress >= settings.progress_interval:
                # Only the pending count: the full status costs several more queries.
                pending = await trio.to_thread.run_sync(queue.count_pending)
                gauges.pending.set(pending)
                self._log_rate(server, done, started, suffix=f", {pending} pending")
                last_progress = time.monotonic()
                reported = True
            claimed = upcoming if upcoming is not None else await self._claim(queue, gauges)

    async def _claim(self, queue: WorkQueue, gauges: DeferredMetrics) -> Claimed:
        claimed = await trio.to_thread.run_sync(
            partial(queue.claim, idle=self.idle),
            self.claim_limit,
            self.workers.settings.lease_seconds,
        )
        self.idle = claimed.scanned_to is None
        if claimed.taken_over:
            gauges.lease_takeovers.inc(claimed.taken_over)
            log.warning(
                "deferred model '%s': %d expired leases taken over (their holder died "
                "or did not renew them in time); those documents may be done twice",
                self.name,
                claimed.taken_over,
            )
        return claimed

    async def _claim_ahead(
        self, queue: WorkQueue, gauges: DeferredMetrics, held: list[Claimed], done: trio.Event
    ) -> None:
        """Claim the next batch into `held`, where its lease is renewed from then on."""
        held.append(await self._claim(queue, gauges))
        done.set()

    async def _keep_leases(self, queue: WorkQueue, held: list[Claimed]) -> None:
        """Renew the leases in `held` while they are worked on: a batch that outlasts
        its lease (a big model, a busy machine) would otherwise be taken over and done
        twice."""
        lease_seconds = self.workers.settings.lease_seconds
        while True:
            await trio.sleep(lease_seconds / 3)
            for claimed in list(held):
                try:
                    await trio.to_thread.run_sync(
                        queue.renew, claimed, lease_seconds, abandon_on_cancel=True
                    )
                except pymongo.errors.PyMongoError as exc:
                    log.warning("deferred model '%s': cannot renew leases: %s", self.name, exc)

    def _log_rate(
        self, server: ModelServer, done: int, started: float, prefix: str = "", suffix: str = ""
    ) -> None:
        took = time.monotonic() - started
        log.info(
            "deferred model '%s' v%d: %s%d done in %.0fs (%.1f/s)%s",
            self.name,
            server.version,
            prefix,
            done,
            took,
            done / max(took, 1e-9),
            suffix,
        )

    async def _predict_batch(
        self, server: ModelServer, queue: WorkQueue, claimed: Claimed, gauges: DeferredMetrics
    ) -> int | None:
        """Predict and store one claimed batch; None when the model itself is failing."""
        spec = server.model.spec
        documents = claimed.documents
        # An input path that goes through an array (`items.x`, items an array of
        # sub-documents) names one value per element, not one input: such a document
        # fails alone, without a run, and gets an error record like any bad input.
        blocked = {
            index: Failure(through_array_message(spec.input_field, through))
            for index, doc in enumerate(documents)
            if (through := array_on_path(doc, spec.input_field)) is not None
        }
        runnable = [index for index in range(len(documents)) if index not in blocked]
        values = [get_path(documents[index], spec.input_field) for index in runnable]
        image_source = self.workers.models.image_source
        runs_failed = server.stats.batch_errors
        predicted = await server.predict_values(values, image_source=image_source) if values else []
        if server.stats.batch_errors > runs_failed and len(values) > 1:
            # A failed run fails its whole batch: try each document alone, so one
            # poisonous document does not take the others down with it.
            predicted = []
            for value in values:
                predicted += await server.predict_values([value], image_source=image_source)
        failures = [o for o in predicted if isinstance(o, Failure)]
        if failures and len(failures) == len(predicted) and server.stats.batch_errors > runs_failed:
            await self._pause(server, queue, claimed, failures[0].message)
            return None
        ran = dict(zip(runnable, predicted, strict=True))
        outcomes: list[Outcome] = [
            blocked[index] if index in blocked else ran[index] for index in range(len(documents))
        ]
        results = [
            (doc, o.value)
            for doc, o in zip(documents, outcomes, strict=True)
            if not isinstance(o, Failure)
        ]
        failed = [
            (doc, o.message)
            for doc, o in zip(documents, outcomes, strict=True)
            if isinstance(o, Failure)
        ]
        settings = self.workers.settings
        if failed:
            exhausted = await trio.to_thread.run_sync(
                queue.record_failures, failed, settings.retry_backoff, settings.max_attempts
            )
            results += [
                (doc, error_record(message, server.version, attempts))
                for doc, message, attempts in exhausted
            ]
            gauges.failed.inc(len(exhausted))
        duplicates = await trio.to_thread.run_sync(queue.write_outputs, claimed, results)
        self._observe_lag(results, gauges)
        gauges.duplicates.inc(duplicates)
        self.duplicates += duplicates
        self.processed += len(results)
        self.recent.append((time.monotonic(), len(results)))
        return len(results)

    def _observe_lag(
        self, results: list[tuple[dict[str, Any], dict[str, Any]]], gauges: DeferredMetrics
    ) -> None:
        record = self.workers.models.records.get(self.name)
        if record is None:
            return
        now = datetime.datetime.now(datetime.UTC)
        for doc, _ in results:
            lag = insert_lag(doc["_id"], record.created, now)
            if lag is not None:
                gauges.lag_seconds.observe(lag)

    async def _pause(
        self, server: ModelServer, queue: WorkQueue, claimed: Claimed, reason: str
    ) -> None:
        """The model fails whatever the document: stop instead of spinning (and instead
        of marking every document failed), and say so in modelStatus."""
        settings = self.workers.settings
        self.paused_until = time.monotonic() + settings.pause_seconds
        self.paused_version = server.version
        self.pause_reason = reason
        log.error(
            "deferred model '%s' v%d fails for every document; pausing %gs: %s",
            self.name,
            server.version,
            settings.pause_seconds,
            reason,
        )
        await trio.to_thread.run_sync(queue.release, claimed)

    def status(self, version: int) -> dict[str, Any]:
        paused = self.paused(version)
        return {
            "paused": paused,
            "pausedReason": self.pause_reason if paused else None,
            "throughputPerSecond": round(self.throughput(), 2),
            "processedHere": self.processed,
            "duplicatesHere": self.duplicates,
        }


class DeferredWorkers:
    """All deferred workers of this process, started and stopped as models come and go."""

    def __init__(
        self,
        models: ModelSet,
        client: pymongo.MongoClient[dict[str, Any]],
        settings: DeferredSettings,
    ) -> None:
        self.models = models
        self.client = client
        self.settings = settings
        self.owner = process_owner_id()
        self.workers: dict[str, ModelWorker] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._watched: dict[str, trio.CancelScope] = {}

    def queue_for(self, server: ModelServer) -> WorkQueue:
        return WorkQueue.on(self.client, server.model.spec, server.version, self.owner)

    async def prepare(self, server: ModelServer) -> None:
        """Create the indexes the model's queue needs (and so its collection) before
        registerModel replies: the client's first writes then find the collection in
        place instead of creating it while a worker creates its index. (SecantusDB can
        deadlock on that race; on any upstream it keeps the first sweep indexed.)"""
        await trio.to_thread.run_sync(self.queue_for(server).ensure_index)

    def resume(self, name: str) -> None:
        """retryFailed: the model's worker here stops any pause at once and looks for work.
        (Workers of other processes stay paused until their pause ends.)"""
        worker = self.workers.get(name)
        if worker is not None:
            worker.resume()

    def kick_namespace(self, namespace: str, except_model: str | None = None) -> None:
        """Writes happened in `namespace`: wake its deferred workers."""
        for server in self.models.deferred_for(namespace):
            name = server.model.spec.name
            worker = self.workers.get(name)
            if worker is not None and name != except_model:
                worker.kick()

    async def run(self) -> None:
        """Follow the model set: a worker (and a change stream) for each deferred model,
        started as soon as it is served and stopped as soon as it is dropped."""
        async with trio.open_nursery() as nursery:
            while True:
                self._sync_workers(nursery)
                await self.models.next_change()

    def _sync_workers(self, nursery: trio.Nursery) -> None:
        deferred = self.models.deferred_models()
        for name in set(self.workers) - set(deferred):
            self._scopes.pop(name).cancel()
            del self.workers[name]
        for name in set(deferred) - set(self.workers):
            worker = self.workers[name] = ModelWorker(self, name)
            self._scopes[name] = trio.CancelScope()
            nursery.start_soon(self._run_worker, worker, self._scopes[name])
        for worker in self.workers.values():
            # A new model, or a new version of one, backfills at once; for the others
            # an extra wake-up costs one claim that finds nothing.
            worker.kick()
        if self.settings.change_streams:
            namespaces = self.models.deferred_namespaces()
            for namespace in namespaces - set(self._watched):
                self._watched[namespace] = trio.CancelScope()
                nursery.start_soon(self._watch, namespace, self._watched[namespace])
            for namespace in set(self._watched) - namespaces:
                self._watched.pop(namespace).cancel()

    async def _run_worker(self, worker: ModelWorker, scope: trio.CancelScope) -> None:
        with scope:
            await worker.run()
        # The worker returns by itself when it finds its model gone before this sync.
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
            del self._scopes[worker.name]

    async def _watch(self, namespace: str, scope: trio.CancelScope) -> None:
        """Wake the namespace's workers on every write, whoever made it, while this
        process holds the namespace's watch (engine.deferred_watch: one process of all
        those serving it follows its change stream)."""
        with scope:
            await follow_namespace(
                self.client,
                namespace,
                self.owner,
                self.settings,
                partial(self._on_change, namespace),
                partial(self.kick_namespace, namespace),
                partial(self._busy, namespace),
            )

    def _on_change(self, namespace: str, change: dict[str, Any]) -> tuple[list[WorkQueue], bool]:
        """What a change event in `namespace` asks of this process: the work queues of
        its deferred models whose input the event (an update or a replacement) may have
        changed, and whether to wake its workers. An update of deferred outputs alone
        (modelgate's own writes, seen by the stream) wakes nobody: the process that
        wrote it woke the models that read those outputs."""
        operation = change.get("operationType")
        servers = self.models.deferred_for(namespace)
        if operation not in {"update", "replace"}:
            return [], operation != "delete"
        description = change.get("updateDescription") or {}
        paths = [
            *(description.get("updatedFields") or {}),
            *(description.get("removedFields") or []),
        ]
        touched = [
            self.queue_for(server)
            for server in servers
            if operation == "replace"
            or any(path_touches(path, server.model.spec.input_field) for path in paths)
        ]
        outputs = [server.model.spec.output_field for server in servers]
        own = operation == "update" and all(
            any(path == out or path.startswith(out + ".") for out in outputs) for path in paths
        )
        return touched, bool(touched) or not own

    def _busy(self, namespace: str) -> bool:
        """Whether a worker of the namespace's deferred models is working off a backlog
        here (read from the watching thread: one attribute per worker)."""
        return any(
            worker.draining
            for server in self.models.deferred_for(namespace)
            if (worker := self.workers.get(server.model.spec.name)) is not None
        )

    async def status(self, server: ModelServer) -> dict[str, Any]:
        """The deferred part of modelStatus: the model's queue, as every process sees it,
        and this process's worker (a worker not started yet reads as a new one: idle)."""
        name = server.model.spec.name
        worker = self.workers.get(name) or ModelWorker(self, name)
        queue = self.queue_for(server)
        gauges = self.models.metrics.deferred(name)  # before the await: see ModelWorker.run
        status = await trio.to_thread.run_sync(queue.status)
        gauges.pending.set(status["pending"])
        gauges.failed.set(status["failed"])
        return {**status, **worker.status(server.version)}
