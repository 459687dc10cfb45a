"""The deferred queue's lease and claim logic (engine/leases.py) against in-memory
collections (tests/engine/fake_collection.py): two WorkQueues with different owners
stand for two modelgate processes on one upstream.

Leases that expire are made with a negative lease time (already expired when written),
so no test waits for a clock."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.leases import WorkQueue
from tests.engine.conftest import deferred_spec
from tests.engine.fake_collection import FakeCollection

SPEC = deferred_spec()
OUT = "_outputs.m"
LONG = 600.0  # a lease that outlives any test
EXPIRED = -1.0  # a lease already expired when it is written


@dataclass
class Upstream:
    """The model's collection and the bookkeeping collections, shared by all queues."""

    collection: FakeCollection = field(default_factory=FakeCollection)
    leases: FakeCollection = field(default_factory=FakeCollection)
    failures: FakeCollection = field(default_factory=FakeCollection)
    stats: FakeCollection = field(default_factory=FakeCollection)

    def queue(self, owner: str, version: int = 1) -> WorkQueue:
        return WorkQueue(
            SPEC,
            version,
            owner,
            collection=self.collection,  # type: ignore[arg-type]
            leases=self.leases,  # type: ignore[arg-type]
            failures=self.failures,  # type: ignore[arg-type]
            stats=self.stats,  # type: ignore[arg-type]
        )

    def output(self, doc_id: int) -> Any:
        (document,) = [doc for doc in self.collection.documents if doc["_id"] == doc_id]
        return document.get("_outputs", {}).get("m")

    def counters(self) -> dict[str, Any]:
        return self.stats.find_one({"_id": SPEC.name}) or {}


@pytest.fixture
def upstream() -> Upstream:
    created = Upstream()
    created.collection.documents = [{"_id": i, "group": i % 2, "x": [float(i)]} for i in range(10)]
    return created


def ids(documents: list[dict[str, Any]]) -> list[Any]:
    return [doc["_id"] for doc in documents]


def predict(queue: WorkQueue, documents: list[dict[str, Any]], tag: str = "") -> list[Any]:
    """(document, output) pairs as a worker would write them."""
    return [(doc, {"value": doc["x"], "by": tag, "version": queue.version}) for doc in documents]


def live_leases(upstream: Upstream) -> list[dict[str, Any]]:
    now = datetime.datetime.now(datetime.UTC)
    return [lease for lease in upstream.leases.documents if lease["expires"] > now]


def claim_all(queue: WorkQueue) -> list[Any]:
    """Claim until nothing is left (claims go on from the newest claim's end and start
    over from the beginning past the last document); the ids claimed, in order."""
    claimed: list[Any] = []
    while more := queue.claim(100, LONG).documents:
        claimed += ids(more)
    return claimed


def finish(queue: WorkQueue, limit: int = 100) -> list[Any]:
    """Claim and write everything pending; the ids done."""
    claimed = queue.claim(limit, LONG)
    queue.write_outputs(claimed, predict(queue, claimed.documents))
    return ids(claimed.documents)


# -- claims ------------------------------------------------------------------------------


def test_claims_split_pending_documents_between_owners(upstream: Upstream) -> None:
    a, b = upstream.queue("a"), upstream.queue("b")
    first = a.claim(4, LONG)
    assert first.documents == [{"_id": i, "x": [float(i)]} for i in range(4)]
    assert first.scanned_to == 3
    second = b.claim(4, LONG)
    assert ids(second.documents) == [4, 5, 6, 7]
    rest = b.claim(4, LONG, after=second.scanned_to)
    assert ids(rest.documents) == [8, 9]
    # Everything is held: nothing for anyone, and nothing was taken over.
    held = a.claim(4, LONG)
    assert held.documents == []
    assert held.scanned_to is not None
    assert held.taken_over == 0
    assert upstream.queue("c").status()["leaseHolders"] == ["a", "b"]


def test_a_claim_with_nothing_pending_says_so(upstream: Upstream) -> None:
    queue = upstream.queue("a")
    assert finish(queue) == list(range(10))
    nothing = queue.claim(4, LONG)
    assert nothing.documents == []
    assert nothing.scanned_to is None


def test_a_renewed_lease_is_not_taken_over(upstream: Upstream) -> None:
    a, b = upstream.queue("a"), upstream.queue("b")
    claimed = a.claim(4, EXPIRED)
    a.renew(claimed, LONG)
    other = b.claim(10, LONG)
    assert other.taken_over == 0
    assert ids(other.documents) == [4, 5, 6, 7, 8, 9]


def test_expired_leases_are_taken_over(upstream: Upstream) -> None:
    a, b = upstream.queue("a"), upstream.queue("b")
    a.claim(4, EXPIRED)  # a dies with these
    other = b.claim(10, LONG)
    assert other.taken_over == 4
    assert ids(other.documents) == list(range(10))
    assert {lease["owner"] for lease in live_leases(upstream)} == {"b"}


def test_a_document_waits_for_its_retry_time_then_gets_an_error_record(
    upstream: Upstream,
) -> None:
    queue = upstream.queue("a")
    claimed = queue.claim(1, LONG)
    (document,) = claimed.documents
    assert queue.record_failures([(document, "bad input")], LONG, max_attempts=2) == []
    queue.release(claimed)
    assert 0 not in ids(queue.claim(10, LONG).documents)  # waiting for its retry
    assert queue.status()["retrying"] == 1
    exhausted = queue.record_failures([(document, "bad input")], LONG, max_attempts=2)
    assert exhausted == [(document, "bad input", 2)]


# -- results -----------------------------------------------------------------------------


def test_results_are_written_only_where_the_input_is_unchanged(upstream: Upstream) -> None:
    queue = upstream.queue("a")
    claimed = queue.claim(4, LONG)
    # Document 1 is updated while the batch runs: its prediction is of the old input.
    upstream.collection.update_one({"_id": 1}, {"$set": {"x": [100.0]}})
    duplicates = queue.write_outputs(claimed, predict(queue, claimed.documents))
    assert duplicates == 0
    assert upstream.output(1) is None
    for doc_id in (0, 2, 3):
        assert upstream.output(doc_id) == {"value": [float(doc_id)], "by": "", "version": 1}
    assert live_leases(upstream) == []  # the batch is released
    assert upstream.counters()["done"] == 3
    # Still pending, with its new input (found when claims start over from the beginning).
    assert upstream.queue("b").claim(1, LONG, after=0).documents == [{"_id": 1, "x": [100.0]}]


def test_work_done_twice_is_counted_and_not_overwritten(upstream: Upstream) -> None:
    a, b = upstream.queue("a"), upstream.queue("b")
    slow = a.claim(4, EXPIRED)
    fast = b.claim(4, LONG)
    assert fast.taken_over == 4
    assert b.write_outputs(fast, predict(b, fast.documents, "b")) == 0
    assert a.write_outputs(slow, predict(a, slow.documents, "a")) == 4
    assert [upstream.output(i)["by"] for i in range(4)] == ["b"] * 4
    counters = upstream.counters()
    assert counters["duplicates"] == 4
    assert counters["done"] == 4


def test_a_new_version_makes_every_output_pending(upstream: Upstream) -> None:
    assert finish(upstream.queue("a", version=1)) == list(range(10))
    newer = upstream.queue("a", version=2)
    assert newer.status()["pending"] == 10
    assert finish(newer) == list(range(10))
    assert {upstream.output(i)["version"] for i in range(10)} == {2}


# -- making outputs pending again ----------------------------------------------------------


def test_mark_changed_makes_one_output_pending_again(upstream: Upstream) -> None:
    queue = upstream.queue("a")
    finish(queue, limit=5)  # documents 0..4 have outputs
    queue.mark_changed(0)
    queue.mark_changed(7)  # no output yet: nothing to make stale
    assert upstream.output(0) == {"value": [0.0], "by": "", "backfillOf": 1}
    assert upstream.output(7) is None
    # Past the newest claim first, then from the beginning again.
    assert claim_all(queue) == [5, 6, 7, 8, 9, 0]


def test_mark_stale_recomputes_the_outputs_that_match(upstream: Upstream) -> None:
    queue = upstream.queue("a")
    finish(queue, limit=6)  # documents 0..5 have outputs
    assert queue.mark_stale({"group": 0}) == 3  # 0, 2 and 4 (6, 8 had none)
    assert claim_all(queue) == [6, 7, 8, 9, 0, 2, 4]
    assert upstream.output(1)["version"] == 1


# -- status ------------------------------------------------------------------------------


def test_status_counts_a_lease_in_progress_only_while_its_document_is_pending(
    upstream: Upstream,
) -> None:
    a = upstream.queue("a")
    claimed = a.claim(4, LONG)
    status = a.status()
    assert status["inProgress"] == 4
    assert status["leaseHolders"] == ["a"]
    assert status["pending"] == 10
    # The outputs are stored, the leases not released yet (between the bulk write and
    # the release, or a holder killed in that moment): finished, not in progress.
    done = [doc["_id"] for doc in claimed.documents[:3]]
    for doc_id in done:
        upstream.collection.update_one({"_id": doc_id}, {"$set": {OUT: {"version": 1}}})
    status = a.status()
    assert status["inProgress"] == 1
    assert status["leaseHolders"] == ["a"]
    assert status["done"] == 3
    assert status["pending"] == 7
    upstream.collection.update_one({"_id": 3}, {"$set": {OUT: {"version": 1}}})
    status = a.status()
    assert status["inProgress"] == 0
    assert status["leaseHolders"] == []


# -- claims made at the same time ------------------------------------------------------


def scanning_while(queue: WorkQueue, meanwhile: Any) -> list[int]:
    """Make `queue`'s scans call `meanwhile()` (other processes' work done while the scan
    is on its way) the first time; returns a list that counts the scans."""
    scans: list[int] = []
    original = queue._scan

    def scan(*args: Any) -> Any:
        found = original(*args)
        if not scans:
            meanwhile()
        scans.append(1)
        return found

    queue._scan = scan  # type: ignore[method-assign]
    return scans


def test_a_claim_that_comes_second_leaves_the_first_its_documents(upstream: Upstream) -> None:
    a, b = upstream.queue("a"), upstream.queue("b")
    scans = scanning_while(a, lambda: b.claim(2, LONG))
    claimed = a.claim(4, LONG)
    # 0 and 1 went to b meanwhile: a takes a full batch from the rest of its scan
    # (which read twice the batch), without scanning again.
    assert ids(claimed.documents) == [2, 3, 4, 5]
    assert len(scans) == 1
    assert sorted(lease["claim"] for lease in live_leases(upstream)) == [1, 2]


def test_work_finished_meanwhile_is_not_claimed_again(upstream: Upstream) -> None:
    """b claims, finishes and releases documents while a scans, and c's claim then
    cleans b's lease up: a cannot tell which documents b had, so it scans again."""
    a, b, c = upstream.queue("a"), upstream.queue("b"), upstream.queue("c")

    def others() -> None:
        assert finish(b, limit=2) == [0, 1]
        assert ids(c.claim(1, LONG).documents) == [2]

    scans = scanning_while(a, others)
    claimed = a.claim(4, LONG)
    assert ids(claimed.documents) == [3, 4, 5, 6]
    assert len(scans) == 2
    assert upstream.counters()["duplicates"] == 0


def test_released_leases_are_deleted_some_time_after_their_release(
    upstream: Upstream,
) -> None:
    upstream.collection.documents = [{"_id": i, "x": [float(i)]} for i in range(60)]
    queue = upstream.queue("a")
    for _ in range(15):
        claimed = queue.claim(2, LONG)
        queue.write_outputs(claimed, predict(queue, claimed.documents))
    assert len(upstream.leases.documents) == 15
    assert live_leases(upstream) == []
    # The 16th claim cleans up, but only leases released more than two minutes ago
    # (a claim that read before they were released may still use their numbers).
    queue.claim(2, LONG)
    assert len(upstream.leases.documents) == 16
    for lease in upstream.leases.documents[:10]:
        lease["released_at"] -= datetime.timedelta(minutes=2)
    for _ in range(16):
        queue.claim(1, LONG)
    assert sorted(lease["claim"] for lease in upstream.leases.documents) == list(range(11, 33))


def test_an_idle_claim_reads_no_documents_when_nothing_is_pending(upstream: Upstream) -> None:
    """A worker whose last claim found nothing asks the output's version index first
    (upstreams that plan the pending filter as a collection scan answer it in time that
    grows with the collection, even when nothing is pending)."""
    queue = upstream.queue("a")
    assert finish(queue) == list(range(10))
    scans = scanning_while(queue, lambda: None)
    nothing = queue.claim(4, LONG, idle=True)
    assert (nothing.documents, nothing.scanned_to, scans) == ([], None, [])
    # Still found: a new document, and one whose output is of a newer version (the model
    # was dropped and registered again, its versions counted anew).
    upstream.collection.documents += [
        {"_id": 10, "x": [10.0]},
        {"_id": 11, "x": [11.0], "_outputs": {"m": {"version": 5}}},
    ]
    assert ids(queue.claim(4, LONG, idle=True).documents) == [10, 11]


def test_a_claim_that_finds_only_held_documents_does_not_start_over(upstream: Upstream) -> None:
    """Past the newest claim's end all that is pending is held by others: the claim
    leaves it to them without a second scan from the beginning. What is pending before
    that end waits for the next claim that finds nothing held past it."""
    a, b = upstream.queue("a"), upstream.queue("b")
    first = a.claim(5, LONG, after=4)
    assert ids(first.documents) == [5, 6, 7, 8, 9]
    # The newest claim ended at 4 (as one that started over from the beginning would).
    upstream.leases.update_one({"claim": 1}, {"$set": {"hi": 4}})
    held = b.claim(4, LONG)
    assert held.documents == []
    assert held.scanned_to is not None  # pending, but held
    a.write_outputs(first, predict(a, first.documents))
    assert ids(b.claim(4, LONG).documents) == [0, 1, 2, 3]


def test_a_claim_says_whether_other_processes_hold_claims_too(upstream: Upstream) -> None:
    """(A worker claims its next batch ahead only while it works alone on the model.)"""
    a, b = upstream.queue("a"), upstream.queue("b")
    first = a.claim(2, LONG)
    assert not first.shared
    assert not a.claim(2, LONG).shared  # its own claims only
    assert b.claim(2, LONG).shared
    a.write_outputs(first, predict(a, first.documents))
    assert b.claim(2, LONG).shared  # a still holds its second claim
