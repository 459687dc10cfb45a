"""The reads that find a deferred model's pending documents (engine.leases claims them).

A document is pending when it has the model's input and lacks an output of the model's
version: the output is missing, made stale (its version renamed away: no version), of an
older version, or of a newer one (a model registered again starts its versions anew).

Most pending documents have no output version at all (new documents, stale outputs), so
a claim asks for those alone: `{out.version: null, _id: {$gt: after}}` (`$gte: MinKey`
from the beginning), without a sort, answered from the index {out.version: 1, _id: 1}
in `_id` order, and checks the input's presence itself. SecantusDB's planner uses an
index only for such a filter (equalities, then one range): the whole pending filter
(`$and` of input, version `$ne`, `_id`) is a collection scan and a sort there, and even
an index-backed query pays a sort of every match in Python, so at 2,000 documents the
claims of a catch-up cost it about half the upstream CPU they did. An upstream that
answers from another index (another order) is asked again with the sort. A model with a
`filter`, or a collection that holds outputs of other versions (two index lookups say
so), is read with the whole pending filter and the sort instead."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from bson.min_key import MinKey
from pymongo.collection import Collection

from engine.spec import ModelSpec

__all__ = ["find_pending", "has_path", "maybe_pending", "pending_filter"]


def pending_filter(spec: ModelSpec, version: int) -> dict[str, Any]:
    """Documents that need `version`'s prediction: the output is missing, of another
    version, or set aside by backfillModel; and the input is there (no $or: the
    upstream must be able to answer this from the index)."""
    clauses: list[dict[str, Any]] = [
        {spec.input_field: {"$exists": True}},
        {f"{spec.output_field}.version": {"$ne": version}},
    ]
    if spec.filter:
        clauses.append(spec.filter)
    return {"$and": clauses}


def _versioned_elsewhere(version: int, field: str) -> list[dict[str, Any]]:
    """Index lookups for outputs of versions other than `version` (the registry's
    versions are integers from 1)."""
    older = [{field: {"$in": list(range(1, version))}}] if version > 1 else []
    return [*older, {field: {"$gt": version}}]


def maybe_pending(collection: Collection[dict[str, Any]], spec: ModelSpec, version: int) -> bool:
    """Whether any document may be pending, by index lookups: an output version missing
    (or null), older or newer than this one. A superset of pending_filter, which an
    upstream that plans several clauses as a collection scan (SecantusDB) answers in
    time that grows with the collection even when nothing is pending; these take next
    to nothing then (but SecantusDB reads every match of a find_one, so they are asked
    only where nothing is likely pending)."""
    field = f"{spec.output_field}.version"
    queries = [{field: None}, *_versioned_elsewhere(version, field)]
    return any(collection.find_one(query, {"_id": 1}) for query in queries)


def has_path(value: Any, path: str) -> bool:
    """Whether `{path: {$exists: true}}` matches `value` as MongoDB matches it: arrays
    on the way are looked into (each element that is a document, or the element a
    numeric part names)."""
    return _has(value, path.split("."))


def _has(value: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if isinstance(value, Mapping):
        return head in value and _has(value[head], rest)
    if isinstance(value, list):
        if head.isdigit() and int(head) < len(value) and _has(value[int(head)], rest):
            return True
        return any(isinstance(element, Mapping) and _has(element, parts) for element in value)
    return False


def _ascending(documents: list[dict[str, Any]]) -> bool:
    try:
        return all(a["_id"] < b["_id"] for a, b in itertools.pairwise(documents))
    except TypeError:
        return True  # _ids of several types: in the index's (BSON) order


def find_pending(
    collection: Collection[dict[str, Any]],
    spec: ModelSpec,
    version: int,
    after: Any,
    limit: int,
) -> list[dict[str, Any]]:
    """Up to `limit` pending documents past `after` (all when None), in `_id` order,
    with their input (and `_id`) only."""
    projection = {spec.input_field: 1}
    field = f"{spec.output_field}.version"
    if spec.filter or any(
        collection.find_one(query, {"_id": 1}) for query in _versioned_elsewhere(version, field)
    ):
        query = pending_filter(spec, version)
        if after is not None:
            query = {"$and": [query, {"_id": {"$gt": after}}]}
        return list(collection.find(query, projection).sort("_id", 1).limit(limit))
    found: list[dict[str, Any]] = []
    while True:
        # (From MinKey when from the beginning: two clauses, so that the compound index
        # answers, in _id order, rather than one on the version alone.)
        position = {"$gte": MinKey()} if after is None else {"$gt": after}
        query = {field: None, "_id": position}
        read = list(collection.find(query, projection).limit(limit))
        if not _ascending(read):  # the upstream walked another index: sort, then
            read = list(collection.find(query, projection).sort("_id", 1).limit(limit))
        found += [doc for doc in read if has_path(doc, spec.input_field)]
        if len(read) < limit or len(found) >= limit:
            return found[:limit]
        after = read[-1]["_id"]  # documents without the input filled the read: go on
