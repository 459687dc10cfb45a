"""`$vectorSearch` filters (engine.search.filters): checked against the upstream's own
`find` for the same filter on the same documents (SecantusDB's MQL is the oracle), and
refused as mongot refuses them."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.regex import Regex

from engine.documents import FAITHFUL, MISSING
from engine.search.filters import (
    VectorSearchQueryError,
    compile_filter,
    filter_values,
)

OID_A = ObjectId("65a000000000000000000001")
OID_B = ObjectId("65a000000000000000000002")
UUID_A = uuid.UUID("12345678-1234-5678-1234-567812345678")
DAY = datetime.datetime(2024, 5, 1, 12, 0, 0)

VALUES: list[Any] = [
    1,
    2.5,
    Int64(3),
    -1,
    0,
    1.0,
    10**12,
    float("nan"),
    True,
    False,
    "a",
    "b",
    "",
    "é",
    None,
    MISSING,
    DAY,
    DAY + datetime.timedelta(days=1),
    OID_A,
    OID_B,
    Binary(UUID_A.bytes, 4),
    [1, "a"],
    [],
    [None],
    [3, 7],
    [True],
    {"x": 1},
]

FILTERS: list[dict[str, Any]] = [
    {"f": 1},
    {"f": 1.0},
    {"f": Int64(3)},
    {"f": 3},
    {"f": "a"},
    {"f": ""},
    {"f": True},
    {"f": False},
    {"f": None},
    {"f": DAY},
    {"f": OID_A},
    {"f": Binary(UUID_A.bytes, 4)},
    {"f": {"$eq": 2.5}},
    {"f": {"$ne": 1}},
    {"f": {"$ne": None}},
    {"f": {"$ne": "a"}},
    {"f": {"$gt": 1}},
    {"f": {"$gte": 1}},
    {"f": {"$lt": 1}},
    {"f": {"$lte": 0}},
    {"f": float("nan")},
    {"f": {"$gte": float("nan")}},
    {"f": {"$lt": float("nan")}},
    {"f": {"$gt": 0, "$lt": 5}},
    {"f": {"$gt": "a"}},
    {"f": {"$gte": ""}},
    {"f": {"$lt": "b"}},
    {"f": {"$gt": False}},
    {"f": {"$gte": DAY}},
    {"f": {"$lt": DAY + datetime.timedelta(hours=1)}},
    {"f": {"$gt": OID_A}},
    {"f": {"$gte": None}},
    {"f": {"$lt": None}},
    {"f": {"$in": [1, "b", None]}},
    {"f": {"$in": []}},
    {"f": {"$in": [7, False]}},
    {"f": {"$nin": [1, "a"]}},
    {"f": {"$nin": [None]}},
    {"f": {"$exists": True}},
    {"f": {"$exists": False}},
    {"f": {"$not": {"$gt": 1}}},
    {"f": {"$not": {"$eq": None}}},
    {"f": {"$not": {"$in": [1, 3]}}},
    {"$and": [{"f": {"$gte": 0}}, {"f": {"$lt": 3}}]},
    {"$or": [{"f": "a"}, {"f": {"$gt": 2}}]},
    {"$nor": [{"f": "a"}, {"f": {"$gt": 2}}]},
    {"$or": [{"f": True}, {"k": {"$gte": 10}}]},
    {"f": {"$gte": 1}, "k": {"$lt": 15}},
    {"g.h": 2},
    {"g.h": {"$gt": 1}},
    {"g.h": {"$exists": True}},
    {"g.h": {"$ne": 2}},
]


@pytest.fixture
def documents(direct: Any, db_name: str) -> list[dict[str, Any]]:
    """The same documents in the upstream and here, as the upstream gives them back."""
    collection = direct[db_name]["docs"]
    docs: list[dict[str, Any]] = []
    for index, value in enumerate(VALUES):
        doc: dict[str, Any] = {"_id": index, "k": index}
        if value is not MISSING:
            doc["f"] = value
        docs.append(doc)
    nested = [{"h": 1}, [{"h": 2}, {"h": 3}], [{"k": 1}], 5, {"h": [2, 9]}, [{"h": None}]]
    for offset, value in enumerate(nested):
        docs.append({"_id": 100 + offset, "k": 100 + offset, "g": value})
    collection.insert_many(docs)
    options = CodecOptions(document_class=dict, uuid_representation=UuidRepresentation.UNSPECIFIED)
    return list(collection.with_options(codec_options=options).find())


@pytest.mark.parametrize("filter_doc", FILTERS, ids=[repr(f) for f in FILTERS])
def test_matches_what_the_upstream_finds(
    direct: Any, db_name: str, documents: list[dict[str, Any]], filter_doc: dict[str, Any]
) -> None:
    compiled = compile_filter(filter_doc, frozenset({"f", "k", "g.h"}))
    expected = {doc["_id"] for doc in direct[db_name]["docs"].find(filter_doc, {"_id": 1})}
    got = {doc["_id"] for doc in documents if compiled.matches(filter_values(doc, compiled.paths))}
    assert got == expected


def test_paths_are_those_the_filter_names() -> None:
    compiled = compile_filter(
        {"$or": [{"a": 1}, {"b.c": {"$gt": 2}}]}, frozenset({"a", "b.c", "unused"})
    )
    assert compiled.paths == frozenset({"a", "b.c"})
    assert compile_filter({}, frozenset()).matches({})


def test_values_read_through_arrays_of_documents() -> None:
    doc = {"a": [{"b": 1}, {"b": [2, 3]}, {"c": 4}], "x": {"y": None}, "z": 5}
    assert filter_values(doc, ["a.b", "x.y", "z", "nope", "z.w"]) == {
        "a.b": [1, 2, 3],
        "x.y": None,
        "z": 5,
    }


def test_faithful_decoding_matches_too() -> None:
    """The index reads documents with engine.documents.FAITHFUL (UUIDs as Binary, dates
    outside Python's range as DatetimeMS): their values compare like any other."""
    import bson

    raw = bson.encode({"u": Binary(UUID_A.bytes, 4), "d": DAY})
    doc = bson.decode(raw, codec_options=FAITHFUL)
    compiled = compile_filter({"u": UUID_A, "d": {"$lte": DAY}}, frozenset({"u", "d"}))
    assert compiled.matches(filter_values(doc, compiled.paths))
    assert compiled.matches({"u": UUID_A, "d": bson.DatetimeMS(0)})
    assert not compiled.matches({"u": UUID_A, "d": bson.DatetimeMS(10**15)})


def test_decimals_are_not_indexed() -> None:
    """mongot indexes no decimals: a Decimal128 value is like no value to a comparison
    (where MQL would find {f: 1} equal to Decimal128("1"))."""
    assert not compile_filter({"f": 1}, frozenset({"f"})).matches({"f": Decimal128("1")})
    assert not compile_filter({"f": {"$gte": 0}}, frozenset({"f"})).matches({"f": Decimal128("1")})


def test_missing_marker_counts_as_missing() -> None:
    compiled = compile_filter({"f": None, "g": {"$exists": False}}, frozenset({"f", "g"}))
    assert compiled.matches({"f": MISSING, "g": MISSING})
    assert compiled.matches({})


@pytest.mark.parametrize(
    ("filter_doc", "message"),
    [
        ({"nope": 1}, "Path 'nope' needs to be indexed as filter"),
        ({"$or": [{"f": 1}, {"nope": 2}]}, "Path 'nope' needs to be indexed as filter"),
        ({"f": {"$regex": "a"}}, 'Operator "$regex" is not supported'),
        ({"f": {"$elemMatch": {"$gt": 1}}}, 'Operator "$elemMatch" is not supported'),
        ({"f": {"$size": 1}}, 'Operator "$size" is not supported'),
        ({"$where": "1"}, 'Operator "$where" is not supported'),
        ({"$not": {"f": 1}}, 'Operator "$not" is not supported'),
        ({"f": {"$gt": 1, "x": 2}}, "mixes operators and fields"),
        ({"f": {"x": 1}}, "of type document"),
        ({"f": [1, 2]}, "of type array"),
        ({"f": Decimal128("1")}, "of type decimal"),
        ({"f": Regex("a")}, "of type regex"),
        ({"f": Binary(b"xyz", 0)}, "of type Binary"),
        ({"f": {"$in": 1}}, '"filter.f.$in" must be an array'),
        ({"f": {"$in": [{"a": 1}]}}, "of type document"),
        ({"f": {"$exists": "yes"}}, '"filter.f.$exists" must be a boolean'),
        ({"f": {"$not": 1}}, '"filter.f.$not" must be a document of operators'),
        ({"$and": []}, '"filter.$and" must be a nonempty array'),
        ({"$or": {"f": 1}}, '"filter.$or" must be a nonempty array'),
        ({"$and": [1]}, '"filter.$and" must be a document'),
    ],
)
def test_refused_as_mongot_refuses(filter_doc: dict[str, Any], message: str) -> None:
    with pytest.raises(VectorSearchQueryError) as caught:
        compile_filter(filter_doc, frozenset({"f"}))
    error = caught.value
    assert message in error.message
    assert error.message.startswith("PlanExecutor error during aggregation :: caused by :: ")
    assert (error.code, error.code_name) == (8, "UnknownError")
