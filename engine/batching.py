"""Gathering concurrent predictions from any task into batches, without a background task.

Leader/follower: the first caller that finds no open batch opens one and leads it; later
callers join it (followers). If the model is idle the leader runs at once; if it is busy,
the batch gathers until it is full, a run of the model ends or `max_delay_ms` has passed
(waiting longer than the run it waits on would only add latency), and keeps gathering while
it waits for a run slot of the shared CapacityLimiter (so load makes batches bigger rather
than queues longer). The leader then closes it, runs the model in a worker thread, and
publishes the rows (or the error) to every member through the batch's `done` Event.
Joining is synchronous (no await between looking at the open batch and adding to it), so
no lock is needed.

A thread hop costs tens of microseconds of CPU (waking the worker, handing the GIL over,
waking the event loop with the result): more than a small model's whole run of a batch.
So a model whose runs are measured to take less than INLINE_RUN_S for the batch at hand
runs on the event loop itself, which it holds no longer than a hop would cost. Every
model's first run goes to a thread, and one that turns out slower goes back to threads
(the estimate is the least cost per item of its last few runs, so that one slow run does
not send the next ones to a thread). A run's cost is the CPU time of the thread that ran
it, not the time it took: in a worker thread a run may wait for the GIL (up to the 5 ms
switch interval while the event loop holds it), and any run may be preempted on a busy
host; neither is what the run would cost the event loop. A request that would lead such a
batch at once (the model idle, no batch open, a run slot free) skips the batch
machinery altogether: its run holds the event loop from start to end, so no other request
could join it, and the events, cancel scope and slot would cost more than the run.

Cancellation: a follower just stops waiting; its rows are computed and dropped. The leader
runs its whole duty (the short wait, then the run) inside a shielded cancel scope, so that
cancelling it can never strand its followers: the cost is that a cancelled leader returns
at most max_delay_ms + one model run late. Handing leadership over would avoid that delay
but needs a second waiter per batch and more states; the model run itself cannot be
interrupted anyway (onnxruntime runs to completion in its thread).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from engine.errors import ImageFetchError, PredictionError
from engine.inputs import BadImage, ImageSource, image_bytes, tensors_from_values
from engine.inputs.text import NoTokens, check_text
from engine.metrics import EngineMetrics, ModelMetrics, PredictionErrorKind
from engine.outputs import postprocess_rows
from engine.runtime import CompiledModel
from engine.spec import ImagePreprocess, TextPreprocess
from engine.stats import percentile

__all__ = ["BatchStats", "Batcher", "Failure", "ModelServer", "Outcome", "Prediction"]

LATENCY_WINDOW = 1024
#: A batch whose run is expected to take less than this runs on the event loop (see above).
INLINE_RUN_S = 150e-6
# A run's expected CPU seconds per item: the least of the last few runs' (see above).
_RUN_COSTS_KEPT = 8


class BatchStats:
    """Counters and a bounded window of recent batch latencies, for `modelStatus`."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.predicted = 0  # documents that got a prediction
        self.errors = 0  # documents that got a failure
        self.batches = 0  # model runs (one per closed batch)
        self.batched_items = 0  # items over all batches, for the mean batch size
        self.batch_errors = 0  # batches whose run failed
        self._latencies: deque[float] = deque(maxlen=window)  # seconds, open -> result

    def record_batch(self, size: int, latency_s: float, *, failed: bool) -> None:
        self.batches += 1
        self.batched_items += size
        if failed:
            self.batch_errors += 1
        self._latencies.append(latency_s)

    @property
    def mean_batch_size(self) -> float:
        return self.batched_items / self.batches if self.batches else 0.0

    def latency_percentiles_ms(self) -> dict[str, float]:
        latencies = list(self._latencies)
        return {f"p{q}": percentile(latencies, q) * 1000.0 for q in (50, 95, 99)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "predicted": self.predicted,
            "errors": self.errors,
            "batches": self.batches,
            "failedBatches": self.batch_errors,
            "meanBatchSize": self.mean_batch_size,
            "latencyMs": self.latency_percentiles_ms(),
        }


class _Batch:
    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.items: list[Any] = []  # arrays of the model's item shape, or strings (text)
        self.joined_at: list[float] = []  # one per request that put items in, for queue wait
        self.full = trio.Event()  # full, or a run ended: stop gathering
        self.done = trio.Event()
        # One row per item (a text the tokenizer empties has its NoTokens error instead).
        self.result: np.ndarray | list[np.ndarray | PredictionError] | None = None
        self.error: str | None = None


@dataclass(frozen=True)
class _Slot:
    batch: _Batch
    start: int
    count: int


class Batcher:
    """Batches `run` calls for one CompiledModel; the limiter is shared across models."""

    def __init__(
        self,
        model: CompiledModel,
        limiter: trio.CapacityLimiter,
        *,
        stats: BatchStats | None = None,
        metrics: ModelMetrics | None = None,
    ) -> None:
        self.model = model
        self.limiter = limiter
        self.stats = stats if stats is not None else BatchStats()
        self.metrics = metrics if metrics is not None else EngineMetrics().model(model.spec.name)
        self.max_size = model.spec.batch.max_size
        self.max_delay_s = model.spec.batch.max_delay_ms / 1000.0
        self._open: _Batch | None = None
        self._running = 0  # batches of this model running now
        self._item_costs: deque[float] = deque(maxlen=_RUN_COSTS_KEPT)  # CPU s per item

    async def run(self, items: Sequence[Any]) -> np.ndarray:
        """Output rows for `items`, in order. Raises PredictionError if any batch failed."""
        rows = await self.run_each(items)
        for row in rows:
            if isinstance(row, PredictionError):
                raise row
        if not rows:
            return np.empty((0,), dtype=np.float32)
        return np.stack(rows)  # type: ignore[arg-type]

    async def run_each(self, items: Sequence[Any]) -> list[np.ndarray | PredictionError]:
        """One output row per item (postprocess_rows' input), or the PredictionError of
        the batch it ran in. Items are arrays of the model's item shape, or strings for a
        text model (tokenized with the rest of their batch, in the run's thread)."""
        if self._can_run_alone(len(items)):
            await trio.lowlevel.checkpoint_if_cancelled()
            return self._run_alone(items)
        slots, led = self._join(items)
        if len(led) == 1:
            # Shielded as a task of its own would be, so no task is needed; a cancelled
            # caller still gets its Cancelled once the batch is done, as from a nursery.
            await self._lead(led[0])
            await trio.lowlevel.checkpoint_if_cancelled()
        elif led:
            async with trio.open_nursery() as nursery:
                for batch in led:
                    nursery.start_soon(self._lead, batch)
        results: list[np.ndarray | PredictionError] = []
        for slot in slots:
            if not slot.batch.done.is_set():
                await slot.batch.done.wait()
            if slot.batch.result is None:
                error = PredictionError(slot.batch.error or "batch aborted")
                results.extend([error] * slot.count)
            else:
                results.extend(slot.batch.result[slot.start : slot.start + slot.count])
        return results

    def _quick(self, count: int) -> bool:
        """Whether a batch of `count` items is expected to run quicker than a thread hop."""
        costs = self._item_costs
        return bool(costs) and min(costs) * count < INLINE_RUN_S

    def _can_run_alone(self, count: int) -> bool:
        """Whether a request can skip gathering: the model is idle with no batch open (so
        the request would lead a batch that runs at once), its items fit one batch, a run
        slot is free, and the run is quick enough for the event loop, where nothing else
        happens until it ends, so nobody could have joined it anyway."""
        return (
            self._open is None
            and not self._running
            and 0 < count <= self.max_size
            and self.limiter.available_tokens > 0
            and self._quick(count)
        )

    def _run_alone(self, items: Sequence[Any]) -> list[np.ndarray | PredictionError]:
        """A batch of just these items, run on the event loop at once (see _can_run_alone):
        what _lead does for it, without the events, the cancel scope and the run slot,
        which a run that holds the event loop throughout does not need."""
        self.metrics.queue_wait_seconds.observe(0.0)
        self.metrics.batch_size.observe(len(items))
        started = trio.current_time()
        failed = False
        try:
            rows: list[np.ndarray | PredictionError] = list(self._timed_run(items))
        except PredictionError as e:
            failed, rows = True, [e] * len(items)
        self.stats.record_batch(len(items), trio.current_time() - started, failed=failed)
        return rows

    def _join(self, items: Sequence[Any]) -> tuple[list[_Slot], list[_Batch]]:
        """Put items into the open batch, opening new ones (led by this caller) as needed."""
        slots: list[_Slot] = []
        led: list[_Batch] = []
        position = 0
        now = trio.current_time()
        while position < len(items):
            batch = self._open
            if batch is None:
                batch = self._open = _Batch(now)
                led.append(batch)
            take = min(self.max_size - len(batch.items), len(items) - position)
            slots.append(_Slot(batch, len(batch.items), take))
            batch.joined_at.append(now)
            batch.items.extend(items[position : position + take])
            position += take
            if len(batch.items) >= self.max_size:
                self._open = None  # full: the next caller opens a new batch
                batch.full.set()
        return slots, led

    async def _lead(self, batch: _Batch) -> None:
        # Shielded so that cancelling the leader cannot strand its followers (see module doc).
        with trio.CancelScope(shield=True):
            try:
                if self._running:
                    # The model is busy: gather while it works, until a run ends, at
                    # most max_delay_ms. An idle model runs at once, so a lone client never
                    # waits for company.
                    with trio.move_on_after(self.max_delay_s):
                        await batch.full.wait()
                # The batch stays open while it waits for a run slot: requests that come
                # meanwhile ride along instead of queueing up in batches of their own.
                async with self.limiter:
                    if self._open is batch:
                        self._open = None  # closed: nobody joins from here on
                    self._observe_start(batch)
                    self._running += 1
                    try:
                        # The slot is held by this task; the thread needs no limiter of its own.
                        # One hop for the whole batch: stacking (or decoding, tokenizing) and
                        # the run; none for a batch quicker to run than a hop.
                        if self._quick(len(batch.items)):
                            batch.result = self._timed_run(batch.items)
                        else:
                            batch.result = await trio.to_thread.run_sync(
                                self._timed_run, batch.items
                            )
                    finally:
                        self._running -= 1
                        if self._open is not None:
                            self._open.full.set()  # the batch gathered meanwhile goes now
            except PredictionError as e:
                batch.result = None
                batch.error = e.message
            except Exception as e:  # never leave followers without an answer
                batch.result = None
                batch.error = f"model '{self.model.spec.name}' failed to run: {e}"
            finally:
                if self._open is batch:
                    self._open = None
                self.stats.record_batch(
                    len(batch.items),
                    trio.current_time() - batch.opened_at,
                    failed=batch.result is None,
                )
                batch.done.set()

    def _observe_start(self, batch: _Batch) -> None:
        started = trio.current_time()
        for joined_at in batch.joined_at:
            self.metrics.queue_wait_seconds.observe(started - joined_at)
        self.metrics.batch_size.observe(len(batch.items))

    def _timed_run(self, items: Sequence[Any]) -> np.ndarray | list[np.ndarray | PredictionError]:
        """In the worker thread (or the event loop, see the module doc): stacking (or
        decoding, tokenizing) and the run, without the wait for a thread."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            rows = self.model.run_items(items)
        except PredictionError:
            raise
        except Exception as e:
            raise PredictionError(f"model '{self.model.spec.name}' failed to run: {e}") from e
        finally:
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
            cpu = time.thread_time() - cpu_started
            self._item_costs.append(cpu / max(len(items), 1))
        if len(rows) != len(items):  # CompiledModel checks it too
            raise PredictionError("model returned the wrong number of rows")
        return rows


@dataclass(frozen=True, slots=True)
class Prediction:
    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Failure:
    message: str


Outcome = Prediction | Failure


class ModelServer:
    """One loaded model version ready for documents: inputs -> batcher -> output values."""

    def __init__(
        self,
        model: CompiledModel,
        limiter: trio.CapacityLimiter,
        *,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model = model
        self.metrics = (metrics if metrics is not None else EngineMetrics()).model(model.spec.name)
        self.batcher = Batcher(model, limiter, metrics=self.metrics)
        self.stats = self.batcher.stats

    @property
    def version(self) -> int:
        return self.model.version

    async def predict_one(self, value: Any, *, image_source: ImageSource | None = None) -> Outcome:
        """The Outcome for one value (e.g. a query text to embed at search time), batched
        with whatever else the model is predicting; `Prediction.value` is what a document
        would store ({vector, version} for an embedding). Never raises PredictionError."""
        [outcome] = await self.predict_values([value], image_source=image_source)
        return outcome

    async def predict_values(
        self, values: Sequence[Any], *, image_source: ImageSource | None = None
    ) -> list[Outcome]:
        """One Outcome per value, in order; a bad value fails alone, a failed run fails its
        batch. Never raises PredictionError."""
        outcomes: list[Outcome | None] = [None] * len(values)
        prepared: dict[int, Any] = {}  # arrays, image bytes, or strings for a text model
        failed: list[PredictionErrorKind] = []
        pre = self.model.spec.preprocess

        async def fetch(index: int, value: Any) -> None:
            try:
                prepared[index] = await image_bytes(value, image_source)
            except PredictionError as e:
                outcomes[index] = Failure(e.message)
                failed.append("fetch" if isinstance(e, ImageFetchError) else "input")

        if isinstance(pre, TextPreprocess):
            # Texts are checked here, one by one, and tokenized by batch in the run's thread.
            for index, value in enumerate(values):
                try:
                    prepared[index] = check_text(value)
                except PredictionError as e:
                    outcomes[index] = Failure(e.message)
                    failed.append("input")
        elif not isinstance(pre, ImagePreprocess):
            # Tensor inputs are converted right here (nothing to wait for), all at once.
            shape, dtype = self.model.item_shape, self.model.input_dtype
            for index, item in enumerate(tensors_from_values(values, shape, dtype)):
                if isinstance(item, PredictionError):
                    outcomes[index] = Failure(item.message)
                    failed.append("input")
                else:
                    prepared[index] = item
        else:
            # Image bytes go to the run's thread as they are (decoded there, the whole batch
            # in one hop); only URLs are waited for here, all at once.
            urls = [(index, value) for index, value in enumerate(values) if isinstance(value, str)]
            for index, value in enumerate(values):
                if not isinstance(value, str):
                    await fetch(index, value)  # no wait: bytes or a wrong type
            if len(urls) == 1:
                await fetch(*urls[0])
            elif urls:
                async with trio.open_nursery() as nursery:
                    for index, value in urls:
                        nursery.start_soon(fetch, index, value)

        order = sorted(prepared) if len(prepared) < len(values) else range(len(values))
        rows = await self.batcher.run_each([prepared[i] for i in order])
        good: list[tuple[int, np.ndarray]] = []
        for index, row in zip(order, rows, strict=True):
            if isinstance(row, PredictionError):
                outcomes[index] = Failure(row.message)
                failed.append("input" if isinstance(row, NoTokens | BadImage) else "model")
            else:
                good.append((index, row))
        values_out = postprocess_rows(
            [row for _, row in good],
            self.model.spec,
            self.model.version,
        )
        for (index, _), value in zip(good, values_out, strict=True):
            if isinstance(value, PredictionError):
                outcomes[index] = Failure(value.message)
                failed.append("output")
            else:
                outcomes[index] = Prediction(value)

        final = [o if o is not None else Failure("no prediction") for o in outcomes]
        predicted = sum(isinstance(o, Prediction) for o in final)
        self.stats.predicted += predicted
        self.stats.errors += len(final) - predicted
        self.metrics.predictions.inc(predicted)
        for kind in failed:
            self.metrics.errors[kind].inc()
        return final
