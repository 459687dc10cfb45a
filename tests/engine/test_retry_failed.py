"""retryFailed's engine side: WorkQueue.retry_failed over in-memory collections
(tests/engine/fake_collection.py), and the pause it lifts (engine.deferred.ModelWorker)."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from engine.deferred import DeferredSettings, DeferredWorkers, ModelWorker
from engine.leases import WorkQueue
from engine.outputs import error_record
from tests.engine.test_leases import LONG, Upstream, ids


@pytest.fixture
def upstream() -> Upstream:
    created = Upstream()
    created.collection.documents = [{"_id": i, "group": i % 2, "x": [float(i)]} for i in range(6)]
    return created


def fail_some(queue: WorkQueue, failing: set[int]) -> None:
    """One pass over everything: `failing` get error records at their first failure
    (max_attempts 1, which leaves their attempt records behind), the others predictions."""
    claimed = queue.claim(100, LONG)
    failed = [(doc, "cannot fetch http://images/x.png: HTTP 404") for doc in claimed.documents]
    exhausted = queue.record_failures(
        [(doc, message) for doc, message in failed if doc["_id"] in failing], LONG, 1
    )
    results: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (doc, {"value": doc["x"], "version": queue.version})
        for doc in claimed.documents
        if doc["_id"] not in failing
    ]
    results += [(doc, error_record(message, queue.version, n)) for doc, message, n in exhausted]
    queue.write_outputs(claimed, results)


def attempt_records(upstream: Upstream) -> list[Any]:
    return sorted(record["doc"] for record in upstream.failures.documents)


def test_error_records_are_pending_again_with_their_attempts_forgotten(
    upstream: Upstream,
) -> None:
    queue = upstream.queue("a")
    fail_some(queue, {0, 1, 2})
    assert queue.claim(100, LONG).documents == []  # everything has an output
    assert attempt_records(upstream) == [0, 1, 2]

    assert queue.retry_failed(None) == 3
    # Stale, not deleted: the record still says what failed, and which version.
    assert upstream.output(0) == {
        "error": "cannot fetch http://images/x.png: HTTP 404",
        "attempts": 1,
        "backfillOf": 1,
    }
    assert upstream.output(3) == {"value": [3.0], "version": 1}  # predictions untouched
    assert attempt_records(upstream) == []
    claimed = queue.claim(100, LONG)
    assert ids(claimed.documents) == [0, 1, 2]
    # A new failure is a first attempt again, not one past the limit.
    assert queue.record_failures([(claimed.documents[0], "again")], LONG, 2) == []
    # Stale records are pending already: a second retry finds nothing to mark.
    assert queue.retry_failed(None) == 0


def test_a_filter_retries_only_the_matching_documents(upstream: Upstream) -> None:
    queue = upstream.queue("a")
    fail_some(queue, {0, 1, 2})
    assert queue.retry_failed({"group": 0}) == 2  # 0 and 2
    assert attempt_records(upstream) == [1]
    assert upstream.output(1)["version"] == 1
    assert ids(queue.claim(100, LONG).documents) == [0, 2]


def test_a_pause_holds_for_the_version_that_failed_until_resumed() -> None:
    workers = cast(DeferredWorkers, type("Workers", (), {"settings": DeferredSettings()})())
    worker = ModelWorker(workers, "m")
    worker.paused_until = time.monotonic() + 3600
    worker.paused_version = 1
    worker.pause_reason = "model run failed"
    assert worker.paused(1)
    assert worker.status(1)["pausedReason"] == "model run failed"
    assert not worker.paused(2)  # a new version (re-registered) starts afresh
    worker.resume()
    assert not worker.paused(1)
    assert worker.status(1)["pausedReason"] is None
    assert worker.wakeup.is_set()  # and it looks for work at once
