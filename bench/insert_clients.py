"""Client threads inserting documents for a fixed time, for the inline benchmarks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import bson
import pymongo

from bench.harness import summarize
from bench.support.processes import BenchError, connect

__all__ = ["ClientPool", "drive_inserts"]

DB_NAME = "modelgate_bench_inline"
INPUT_FIELD = "img"


class ClientPool:
    """Up to `size` MongoClients per URI, connected once and reused by every run.

    They write without retryable writes, straight or through modelgate alike: SecantusDB
    keeps a record of every retryable write for 30 minutes (up to 10,000 of them) and
    scans them all on every write (sorts them once the 10,000 are reached), so its
    rate on retryable writes falls with every write it has taken (5,536 docs/s at first,
    2,464 docs/s five runs later), where MongoDB keeps one record per session."""

    def __init__(self, uri: str, size: int) -> None:
        self.clients = [connect(uri, retryWrites=False) for _ in range(size)]

    def close(self) -> None:
        for client in self.clients:
            client.close()


def drive_inserts(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    collection: str,
    images: Sequence[bytes],
    *,
    duration_s: float,
    max_docs: int,
    warmup_per_client: int,
    on_ready: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """One thread per client, each `insert_one({img: png})` in a loop; warm-up inserts
    first, then `on_ready()`, then all start together and stop at the deadline or when
    `max_docs` were inserted. Returns images/s over the timed phase and the per-insert
    latencies."""
    count = len(clients)
    warmed, go = threading.Barrier(count + 1), threading.Barrier(count + 1)
    latencies: list[list[float]] = [[] for _ in range(count)]
    ends = [0.0] * count
    errors: list[BaseException] = []
    budget = threading.Semaphore(max_docs)
    state = {"deadline": float("inf")}
    payloads = [bson.Binary(png) for png in images]

    def worker(index: int) -> None:
        coll = clients[index][DB_NAME][collection]
        out = latencies[index]
        cursor = index * 7919  # clients start at different images
        try:
            for _ in range(warmup_per_client):
                coll.insert_one({INPUT_FIELD: payloads[cursor % len(payloads)]})
                cursor += 1
        except BaseException as exc:
            errors.append(exc)
        warmed.wait()
        try:
            go.wait()
        except threading.BrokenBarrierError:
            return
        if errors:
            return
        clock = time.perf_counter
        try:
            while clock() < state["deadline"] and budget.acquire(blocking=False):
                document = {INPUT_FIELD: payloads[cursor % len(payloads)]}
                cursor += 1
                start = clock()
                coll.insert_one(document)
                out.append(clock() - start)
        except BaseException as exc:
            errors.append(exc)
        ends[index] = clock()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    warmed.wait()  # every client warmed up, none timed yet
    if on_ready is not None and not errors:
        try:
            on_ready()
        except BaseException:
            go.abort()
            raise
    started = time.perf_counter()
    state["deadline"] = started + duration_s
    go.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"insert_one failed: {errors[0]!r}")
    samples = [value for values in latencies for value in values]
    if not samples:
        raise BenchError("no insert finished in the timed phase")
    elapsed = max(ends) - started
    return {
        "concurrency": count,
        "docs": len(samples),
        "elapsed_s": elapsed,
        "images_per_s": len(samples) / elapsed,
        "latency_ms": summarize(samples, scale=1e3),
    }
