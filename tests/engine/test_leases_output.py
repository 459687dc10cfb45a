"""The deferred output write (WorkQueue.write_outputs) and its guarantees: an output is
stored only where the input is still the one read and the output is not of this version
already (that is duplicate work: counted, never overwritten); a stale output is replaced
whole; the document's other fields stay as and where they were; values are data.

Each test runs twice: against the in-memory fake (tests/engine/fake_collection.py) and
against a real SecantusDB (or the MongoDB of MODELGATE_TEST_UPSTREAM), so the fake's
reading of the write is held to the upstream's."""

from __future__ import annotations

from typing import Any

import pytest

from engine.leases import Claimed, WorkQueue
from tests.engine.conftest import Collections, Queue


def insert(collections: Collections, *documents: dict[str, Any]) -> None:
    collections["items"].insert_many([dict(document) for document in documents])


def stored(collections: Collections, doc_id: Any) -> dict[str, Any]:
    document = collections["items"].find_one({"_id": doc_id})
    assert document is not None
    return dict(document)


def write(queue: WorkQueue, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    return queue.write_outputs(Claimed("batch", [doc for doc, _ in pairs]), pairs)


def counters(collections: Collections) -> dict[str, Any]:
    return collections["stats"].find_one({"_id": "m"}) or {}


def test_an_output_replaces_a_stale_one_whole_and_keeps_its_neighbours(
    collections: Collections, queue: Queue
) -> None:
    insert(
        collections,
        {"_id": 1, "x": [1.0]},
        {
            "_id": 2,
            "_outputs": {"a": 0, "m": {"value": [0.0], "backfillOf": 1, "extra": 9}, "z": 1},
            "x": [2.0],
            "after": True,
        },
    )
    new = {"value": [5.0], "version": 2}
    duplicates = write(
        queue(version=2), [({"_id": 1, "x": [1.0]}, new), ({"_id": 2, "x": [2.0]}, new)]
    )
    assert duplicates == 0
    assert stored(collections, 1) == {"_id": 1, "x": [1.0], "_outputs": {"m": new}}
    second = stored(collections, 2)
    # No field of the stale output is left (no merge), the others stay where they were.
    assert second["_outputs"] == {"a": 0, "m": new, "z": 1}
    assert list(second) == ["_id", "_outputs", "x", "after"]
    assert list(second["_outputs"]) == ["a", "m", "z"]
    assert counters(collections)["done"] == 2


def test_an_input_changed_since_it_was_read_leaves_the_document_as_it_is(
    collections: Collections, queue: Queue
) -> None:
    insert(collections, {"_id": 1, "x": [9.0]}, {"_id": 2, "x": [9.0], "_outputs": {"o": 1}})
    as_read = [({"_id": 1, "x": [1.0]}, {"value": [1.0], "version": 1})]
    as_read.append(({"_id": 2, "x": [2.0]}, {"value": [2.0], "version": 1}))
    assert write(queue(), as_read) == 0
    # Not even an empty parent of the output field is created.
    assert stored(collections, 1) == {"_id": 1, "x": [9.0]}
    assert stored(collections, 2) == {"_id": 2, "x": [9.0], "_outputs": {"o": 1}}
    assert counters(collections)["done"] == 0
    assert counters(collections)["duplicates"] == 0


def test_an_output_of_this_version_is_never_overwritten_and_counts_as_duplicate(
    collections: Collections, queue: Queue
) -> None:
    theirs = {"value": [1.0], "version": 1, "by": "them"}
    insert(collections, {"_id": 1, "x": [1.0], "_outputs": {"m": theirs}}, {"_id": 2, "x": [2.0]})
    ours = [
        ({"_id": 1, "x": [1.0]}, {"value": [1.0], "version": 1, "by": "us"}),
        ({"_id": 2, "x": [2.0]}, {"value": [2.0], "version": 1, "by": "us"}),
    ]
    assert write(queue(), ours) == 1
    assert stored(collections, 1)["_outputs"]["m"] == theirs
    assert stored(collections, 2)["_outputs"]["m"]["by"] == "us"
    assert counters(collections)["done"] == 1
    assert counters(collections)["duplicates"] == 1


def test_dollar_strings_in_the_input_and_the_output_are_data(
    collections: Collections, queue: Queue
) -> None:
    # Read as "$x", then changed: were "$x" read as a field path (as an aggregation
    # expression would), it would equal the new input and the stale output be stored.
    insert(collections, {"_id": 1, "x": "changed"}, {"_id": 2, "x": "$x"})
    output = {"value": "$x", "labels": ["$$ROOT", "$x"], "version": 1}
    pairs = [({"_id": 1, "x": "$x"}, output), ({"_id": 2, "x": "$x"}, output)]
    assert write(queue(), pairs) == 0
    assert "_outputs" not in stored(collections, 1)
    assert stored(collections, 2)["_outputs"]["m"] == output


@pytest.mark.parametrize("output_field", ["prediction", "a.b.m"])
def test_output_fields_at_the_top_and_deeper(
    collections: Collections, queue: Queue, output_field: str
) -> None:
    insert(
        collections,
        {"_id": 1, "x": 1, "a": {"keep": 1, "b": {"m": {"version": 0}, "n": 2}}},
        {"_id": 2, "x": 2},
    )
    new = {"value": 1, "version": 1}
    pairs = [({"_id": 1, "x": 1}, new), ({"_id": 2, "x": 2}, new)]
    assert write(queue(output_field=output_field), pairs) == 0
    first, second = stored(collections, 1), stored(collections, 2)
    if output_field == "prediction":
        assert first["prediction"] == new
        assert second == {"_id": 2, "x": 2, "prediction": new}
    else:
        assert first["a"] == {"keep": 1, "b": {"m": new, "n": 2}}
        assert second == {"_id": 2, "x": 2, "a": {"b": {"m": new}}}


@pytest.mark.parametrize("collections", ["upstream"], indirect=True)  # the fake has no $type
def test_an_input_through_an_array_gets_its_error_record_while_the_array_is_there(
    collections: Collections, queue: Queue
) -> None:
    """Input `items.x` with `items` an array: no one value to condition the write on
    (get_path gives MISSING, which BSON cannot encode); the error record is about the
    array, so it is stored while the array is there, and not once it is gone."""
    through = queue(input_field="items.x")
    insert(
        collections,
        {"_id": 1, "items": [{"x": 1}, {"x": 2}]},
        {"_id": 2, "items": {"x": 3}},  # an array when read, one value since
        {"_id": 3, "items": {"x": 4}},
    )
    record = {"error": "input 'items.x' goes through an array at 'items'", "version": 1}
    as_read = {"_id": 2, "items": [{"x": 3}]}
    value = {"value": [4.0], "version": 1}
    pairs = [({"_id": 1, "items": [{"x": 1}, {"x": 2}]}, record), (as_read, record)]
    assert write(through, [*pairs, ({"_id": 3, "items": {"x": 4}}, value)]) == 0
    assert stored(collections, 1)["_outputs"]["m"] == record
    assert "_outputs" not in stored(collections, 2)
    assert stored(collections, 3)["_outputs"]["m"] == value
    # Counted as stored: one prediction done, one error record failed (the second record
    # was not stored: its input changed since it was read).
    assert (counters(collections)["done"], counters(collections)["failed"]) == (1, 1)
