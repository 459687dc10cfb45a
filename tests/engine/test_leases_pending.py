"""Which documents a claim reads as pending (engine/pending.py): every document with the
input and without an output of the queue's version (none, stale, null, older, newer),
none else, in `_id` order whatever the order of the inserts; read from the index on the
output's version (one clause and the `_id`) where no output of another version exists,
with the input checked in the proxy.

Each test runs against the in-memory fake (tests/engine/fake_collection.py) and against a
real SecantusDB (or the MongoDB of MODELGATE_TEST_UPSTREAM)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.leases import WorkQueue
from engine.pending import has_path
from tests.engine.conftest import Collections, Queue
from tests.engine.fake_collection import FakeCollection

LONG = 600.0


def claim_all(work: WorkQueue, limit: int) -> list[list[Any]]:
    """The _ids of each claim until one finds nothing (the claims are not written)."""
    claims = []
    while (claimed := work.claim(limit, LONG)).documents:
        claims.append([doc["_id"] for doc in claimed.documents])
    return claims


def output(version: Any) -> dict[str, Any]:
    return {"m": {"value": 0, "version": version}}


def test_every_kind_of_pending_document_and_nothing_else_is_claimed(
    collections: Collections, queue: Queue
) -> None:
    work = queue(version=2)
    collections["items"].insert_many(
        [
            {"_id": 1, "x": 1},  # no output
            {"_id": 2, "x": 2, "_outputs": {"other": 1}},  # another model's output only
            {"_id": 3, "x": 3, "_outputs": {"m": {"value": 0, "staleVersion": 2}}},  # stale
            {"_id": 4, "x": 4, "_outputs": output(None)},
            {"_id": 5, "x": 5, "_outputs": output(2)},  # done
            {"_id": 6, "_outputs": output(None)},  # no input: not pending
            {"_id": 7, "y": 7},  # no input
            {"_id": 8, "x": 8, "_outputs": output(1)},  # older version
            {"_id": 9, "x": 9, "_outputs": output(5)},  # newer version (registered anew)
            {"_id": 10, "x": None},  # an input of null is there
        ]
    )
    claims = claim_all(work, 2)
    assert [doc for batch in claims for doc in batch] == [1, 2, 3, 4, 8, 9, 10]
    # Once the other versions are recomputed, the rest is read from the version index.
    collections["items"].update_many({"_id": {"$in": [8, 9]}}, {"$set": {"_outputs.m.version": 2}})
    collections["items"].insert_many([{"_id": 11, "x": 11}, {"_id": 12, "z": 0}])
    collections["leases"].delete_many({})
    assert [doc for batch in claim_all(work, 2) for doc in batch] == [1, 2, 3, 4, 10, 11]


def test_claims_go_in_id_order_whatever_the_order_of_the_inserts(
    collections: Collections, queue: Queue
) -> None:
    work, other = queue(owner="a"), queue(owner="b")
    order = [7, 3, 11, 1, 9, 5, 12, 2, 8, 4, 10, 6]
    collections["items"].insert_many([{"_id": i, "x": i} for i in order])
    claims = []
    for _ in range(3):
        for each in (work, other):
            claims.append([doc["_id"] for doc in each.claim(2, LONG).documents])
    assert claims == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]


def test_documents_without_the_input_do_not_hide_those_after_them(
    collections: Collections, queue: Queue
) -> None:
    work = queue()
    collections["items"].insert_many([{"_id": i, "y": i} for i in range(20)])
    collections["items"].insert_many([{"_id": 20 + i, "x": i} for i in range(3)])
    assert claim_all(work, 2) == [[20, 21], [22]]


def test_a_model_with_a_filter_claims_only_what_it_selects(
    collections: Collections, queue: Queue
) -> None:
    work = queue(filter={"kind": "a"})
    collections["items"].insert_many(
        [{"_id": i, "x": i, "kind": "a" if i % 2 else "b"} for i in range(6)]
    )
    assert claim_all(work, 2) == [[1, 3], [5]]


def test_the_pending_read_is_index_backed(collections: Collections, queue: Queue) -> None:
    if isinstance(collections["items"], FakeCollection):
        pytest.skip("the in-memory stand-in collection has no query planner to explain")
    work = queue()
    collections["items"].insert_many([{"_id": i, "x": i} for i in range(5)])
    for position in ({"$gte": 0}, {"$gt": 2}):
        plan = collections["items"].find({"_outputs.m.version": None, "_id": position}).explain()
        assert "IXSCAN" in str(plan["queryPlanner"]["winningPlan"])
        assert "_outputs.m.version_1__id_1" in str(plan["queryPlanner"]["winningPlan"])
    assert [doc for batch in claim_all(work, 2) for doc in batch] == [0, 1, 2, 3, 4]


def test_an_input_is_there_as_mongodb_sees_it() -> None:
    assert has_path({"x": None}, "x")
    assert not has_path({"y": 1}, "x")
    assert has_path({"a": {"b": 0}}, "a.b")
    assert not has_path({"a": 5}, "a.b")
    assert has_path({"a": [{"c": 1}, {"b": 2}]}, "a.b")
    assert not has_path({"a": [{"c": 1}, 3]}, "a.b")
    assert not has_path({"a": []}, "a.b")
    assert has_path({"a": [{"b": 1}]}, "a.0.b")
    assert not has_path({"a": [[{"b": 1}]]}, "a.b")
