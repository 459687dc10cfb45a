"""Threads that write the way an application with retryable writes does: each write is an
idempotent upsert by `_id`, and a write that fails with an error the driver calls
retryable is sent again until it is acknowledged. Every exception is counted by kind, so
that a test can say which errors its clients saw and a benchmark can report them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pymongo.errors
from pymongo.collection import Collection

__all__ = ["RetryingWriters", "is_retryable", "kind"]

Document = dict[str, Any]
# Between two attempts of one write: while no process or no upstream answers, the
# driver fails at once, and the threads must not spin on the shared cores.
RETRY_PAUSE = 0.05


def is_retryable(exc: BaseException) -> bool:
    """What a driver reports as worth retrying: network errors (AutoReconnect, whose
    subclasses include NotPrimaryError) and errors labelled RetryableWriteError."""
    if isinstance(exc, pymongo.errors.AutoReconnect):
        return True
    return isinstance(exc, pymongo.errors.PyMongoError) and exc.has_error_label(
        "RetryableWriteError"
    )


def kind(exc: BaseException) -> str:
    """The exception's class, with its RetryableWriteError label when it has one."""
    labelled = isinstance(exc, pymongo.errors.PyMongoError) and exc.has_error_label(
        "RetryableWriteError"
    )
    return f"{type(exc).__name__}{' (RetryableWriteError)' if labelled else ''}"


class RetryingWriters:
    """`threads` threads; thread t's n-th write upserts `{_id: "t-n", **fields(n)}` into
    `collections[n % len(collections)]`, until `stop()`.

    `acknowledged[name]` holds the ids each collection acknowledged; `retried` counts
    the retryable exceptions by `kind`, `unexpected` keeps the others (whose write
    is then given up)."""

    def __init__(
        self,
        collections: Sequence[Collection[Document]],
        fields: Callable[[int], Document],
        threads: int,
    ) -> None:
        self.collections = list(collections)
        self.fields = fields
        self.acknowledged: dict[str, set[str]] = {c.name: set() for c in self.collections}
        self.retried: Counter[str] = Counter()
        self.unexpected: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, args=(t,), name=f"writer-{t}", daemon=True)
            for t in range(threads)
        ]

    def start(self) -> RetryingWriters:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> list[str]:
        """Let each thread finish the write it is on; the names of threads still running
        after `timeout` (a write that never got through)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]

    def count(self) -> int:
        with self._lock:
            return sum(len(ids) for ids in self.acknowledged.values())

    def _write(self, thread: int) -> None:
        n = 0
        while not self._stopping.is_set():
            collection = self.collections[n % len(self.collections)]
            doc_id = f"{thread}-{n}"
            if self._upsert_until_acknowledged(collection, doc_id, self.fields(n)):
                with self._lock:
                    self.acknowledged[collection.name].add(doc_id)
            n += 1

    def _upsert_until_acknowledged(
        self, collection: Collection[Document], doc_id: str, fields: Document
    ) -> bool:
        while True:
            try:
                collection.update_one({"_id": doc_id}, {"$set": fields}, upsert=True)
                return True
            except Exception as exc:
                with self._lock:
                    if not is_retryable(exc):
                        self.unexpected.append(exc)
                        return False
                    self.retried[kind(exc)] += 1
            time.sleep(RETRY_PAUSE)
