"""The `$vectorSearch` stage as text (proxy.vector_search_stage): its fields checked as
mongod and mongot check them, where search stages may stand, and the pipeline the upstream
runs in its place (run here on a real SecantusDB over real documents)."""

from __future__ import annotations

from typing import Any

import pytest
from bson.binary import Binary, BinaryVectorDtype

from engine.errors import BadValue, ModelgateError
from engine.search.filters import VectorSearchQueryError
from proxy.vector_search_stage import (
    HIDDEN_FIELD,
    StageNotAllowed,
    UnknownStageField,
    check_stage_positions,
    parse_vector_search,
    rewrite_later_stages,
    search_pipeline,
    union_searches,
)

SCORE = {"$meta": "vectorSearchScore"}
HIDDEN_SCORE = f"${HIDDEN_FIELD}.s"


def stage(**fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "index": "vi",
        "path": "v",
        "queryVector": [1, 0.5],
        "numCandidates": 20,
        "limit": 5,
    }
    spec.update(fields)
    return {key: value for key, value in spec.items() if value is not None}


def test_a_stage_parses() -> None:
    query = parse_vector_search(stage(filter={"a": 1}))
    assert (query.index, query.path, query.query_vector) == ("vi", "v", (1.0, 0.5))
    assert (query.num_candidates, query.limit, query.exact) == (20, 5, False)
    assert query.filter == {"a": 1} and query.query_text is None


def test_exact_takes_no_num_candidates_and_index_defaults() -> None:
    query = parse_vector_search(stage(numCandidates=None, exact=True, index=None, limit=7.0))
    assert (query.index, query.exact, query.limit, query.num_candidates) == ("default", True, 7, 7)


@pytest.mark.parametrize("text", ["red shoes", {"text": "red shoes"}])
def test_query_text_in_both_shapes(text: Any) -> None:
    query = parse_vector_search(stage(queryVector=None, query=text))
    assert query.query_text == "red shoes" and query.query_vector is None


def test_a_bson_vector_is_a_query_vector() -> None:
    vector = Binary.from_vector([0.25, -1.0], BinaryVectorDtype.FLOAT32)
    assert parse_vector_search(stage(queryVector=vector)).query_vector == (0.25, -1.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": None}, '"path" is required'),
        ({"limit": None}, '"limit" is required'),
        ({"limit": 0}, '"limit" must be positive'),
        ({"limit": 2.5}, '"limit" must be an integer'),
        ({"limit": "5"}, '"limit" must be an integer'),
        ({"numCandidates": None}, "numCandidates is required for approximate vector search"),
        ({"numCandidates": 10_001}, '"numCandidates" must be within the bounds [1, 10000]'),
        ({"numCandidates": 4}, "limit should be less than or equal to numCandidates"),
        ({"exact": True}, '"numCandidates" must be omitted when "exact" is set to true'),
        ({"exact": "yes"}, '"exact" must be a boolean'),
        ({"queryVector": None}, "Exactly one and only one of query and queryVector"),
        ({"query": "x"}, "Exactly one and only one of query and queryVector"),
        ({"queryVector": [1, float("nan")]}, "non-finite value (Infinity or NaN) at position [1]"),
        ({"queryVector": [1, "a"]}, "position [1] is not"),
        ({"queryVector": []}, '"queryVector" must be a nonempty array of numbers'),
        ({"queryVector": None, "query": ""}, '"query" must be a nonempty string'),
        ({"filter": [1]}, '"filter" must be a document'),
        ({"index": 3}, '"index" must be a string'),
    ],
)
def test_refused_as_mongot_refuses(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(VectorSearchQueryError) as caught:
        parse_vector_search(stage(**fields))
    assert message in caught.value.message
    assert caught.value.message.startswith("PlanExecutor error during aggregation :: caused by ::")
    assert caught.value.code == 8


def test_an_unknown_field_is_refused_as_mongod_refuses_it() -> None:
    with pytest.raises(UnknownStageField) as caught:
        parse_vector_search(stage(foo=1))
    assert caught.value.message == "BSON field '$vectorSearch.foo' is an unknown field."
    assert (caught.value.code, caught.value.code_name) == (40415, "Location40415")


VS = {"$vectorSearch": {}}


@pytest.mark.parametrize(
    ("pipeline", "code", "message"),
    [
        (
            [{"$match": {}}, VS],
            40602,
            "$vectorSearch is only valid as the first stage in a pipeline.",
        ),
        (
            [{"$match": {}}, {"$listSearchIndexes": {}}],
            40602,
            "$listSearchIndexes is only valid as the first stage in a pipeline.",
        ),
        (
            [{"$facet": {"a": [VS]}}],
            40600,
            "$vectorSearch is not allowed to be used within a $facet stage",
        ),
        (
            [{"$lookup": {"from": "x", "as": "y", "pipeline": [VS]}}],
            51047,
            "$vectorSearch is not allowed within a $lookup's sub-pipeline",
        ),
        (
            [VS, {"$lookup": {"from": "x", "as": "y", "pipeline": [{"$match": {}}, VS]}}],
            51047,
            "$vectorSearch is not allowed within a $lookup's sub-pipeline",
        ),
    ],
)
def test_stages_out_of_place(pipeline: list[Any], code: int, message: str) -> None:
    with pytest.raises(StageNotAllowed) as caught:
        check_stage_positions(pipeline)
    assert (caught.value.code, caught.value.code_name) == (code, f"Location{code}")
    assert caught.value.message == message


def union(*pipeline: Any, coll: str | None = "x") -> dict[str, Any]:
    spec: dict[str, Any] = {"pipeline": list(pipeline)}
    if coll is not None:
        spec["coll"] = coll
    return {"$unionWith": spec}


def test_vector_search_first_in_a_union_with_is_fine() -> None:
    """MongoDB 8.0 takes $vectorSearch as the first stage of a $unionWith's sub-pipeline,
    at any depth of $unionWith."""
    check_stage_positions([union(VS, {"$project": {"a": 1}})])
    check_stage_positions([VS, union(VS), union({"$match": {}}, union(VS, coll="y"))])


@pytest.mark.parametrize(
    ("pipeline", "code", "message"),
    [
        (
            [union({"$match": {}}, VS)],
            40602,
            "$vectorSearch is only valid as the first stage in a pipeline.",
        ),
        (
            [{"$lookup": {"from": "x", "as": "y", "pipeline": [union(VS)]}}],
            51047,
            "$vectorSearch is not allowed within a $lookup's sub-pipeline",
        ),
        (
            [{"$facet": {"a": [union(union(VS))]}}],
            40600,
            "$vectorSearch is not allowed to be used within a $facet stage",
        ),
    ],
)
def test_vector_search_in_a_union_with_out_of_place(
    pipeline: list[Any], code: int, message: str
) -> None:
    with pytest.raises(StageNotAllowed) as caught:
        check_stage_positions(pipeline)
    assert (caught.value.code, caught.value.message) == (code, message)


def test_list_search_indexes_in_a_union_with_is_refused_with_a_reason() -> None:
    with pytest.raises(BadValue, match="not within \\$unionWith"):
        check_stage_positions([union({"$listSearchIndexes": {}})])


def test_union_searches_innermost_first_with_their_collections() -> None:
    inner = union(VS, coll="b")
    outer = union(VS, inner, coll="a")
    no_coll = union(VS, coll=None)  # the upstream wants $documents first there
    pipeline = [VS, outer, union({"$match": {}}), no_coll, {"$unionWith": "c"}]
    found = [(spec, coll) for spec, coll in union_searches(pipeline)]
    assert found == [(inner["$unionWith"], "b"), (outer["$unionWith"], "a")]
    assert found[0][0] is inner["$unionWith"]  # the spec itself, to rewrite in place


def test_first_is_fine() -> None:
    check_stage_positions([VS, {"$match": {"$vectorSearch": 1}}, {"$project": {"a": 1}}])


def test_meta_is_rewritten_wherever_it_is() -> None:
    stages, uses = rewrite_later_stages(
        [
            {"$project": {"title": 1, "score": SCORE}},
            {"$addFields": {"x": {"$multiply": [SCORE, {"$add": [1, SCORE]}]}}},
            {"$match": {"$expr": {"$gt": [SCORE, 0.5]}}},
            {"$sort": {"score": -1, "s2": SCORE}},
            {"$set": {"lit": {"$literal": SCORE}}},
            {"$lookup": {"from": "o", "as": "o", "pipeline": [{"$set": {"s": SCORE}}]}},
            {"$facet": {"a": [{"$project": {"s": SCORE}}]}},
        ]
    )
    assert uses
    assert stages == [
        {"$project": {"title": 1, "score": HIDDEN_SCORE, HIDDEN_FIELD: 1}},
        {"$addFields": {"x": {"$multiply": [HIDDEN_SCORE, {"$add": [1, HIDDEN_SCORE]}]}}},
        {"$match": {"$expr": {"$gt": [HIDDEN_SCORE, 0.5]}}},
        {"$sort": {"score": -1, f"{HIDDEN_FIELD}.s": -1}},
        {"$set": {"lit": {"$literal": SCORE}}},
        {"$lookup": {"from": "o", "as": "o", "pipeline": [{"$set": {"s": SCORE}}]}},
        {
            "$facet": {
                "a": [{"$project": {"s": HIDDEN_SCORE, HIDDEN_FIELD: 1}}, {"$unset": HIDDEN_FIELD}]
            }
        },
    ]


@pytest.mark.parametrize(
    ("projection", "kept"),
    [
        ({"a": 1}, True),
        ({"a": True, "_id": 0}, True),
        ({"a": "$b"}, True),
        ({"a": {"b": 1}}, True),
        ({"a": 0}, False),
        ({"_id": 0}, False),
        ({"a": {"b": 0}}, False),
    ],
)
def test_inclusion_projections_keep_the_score(projection: dict[str, Any], kept: bool) -> None:
    (rewritten,), _ = rewrite_later_stages([{"$project": projection}])
    assert (HIDDEN_FIELD in rewritten["$project"]) is kept


def test_no_score_asked_no_score_computed() -> None:
    pipeline = search_pipeline([(1, 0.9)], [{"$limit": 1}])
    assert all(f"{HIDDEN_FIELD}.s" not in str(stage) for stage in pipeline)
    assert pipeline[-1] == {"$unset": HIDDEN_FIELD}


@pytest.mark.parametrize("last", [{"$out": "o"}, {"$merge": {"into": "m"}}])
def test_the_score_is_unset_before_out_and_merge(last: dict[str, Any]) -> None:
    pipeline = search_pipeline([(1, 0.9)], [{"$project": {"s": SCORE}}, last])
    assert pipeline[-2:] == [{"$unset": HIDDEN_FIELD}, last]


@pytest.fixture
def docs(direct: Any, db_name: str) -> Any:
    collection = direct[db_name]["docs"]
    collection.insert_many(
        [{"_id": i, "n": i, "tag": "even" if i % 2 == 0 else "odd"} for i in range(10)]
    )
    return collection


# Ties on purpose: the order is the index's, not the score's alone.
MATCHES = [(7, 0.9), (2, 0.8), (5, 0.8), (0, 0.5), (42, 0.4)]


def run(docs: Any, later: list[Any]) -> list[dict[str, Any]]:
    return list(docs.aggregate(search_pipeline(MATCHES, later)))


def test_matches_come_back_in_the_index_order_without_a_score(docs: Any) -> None:
    got = run(docs, [])
    assert [doc["_id"] for doc in got] == [7, 2, 5, 0]  # 42 is no document
    assert got[0] == {"_id": 7, "n": 7, "tag": "odd"}


def test_later_stages_see_the_score(docs: Any) -> None:
    got = run(
        docs,
        [
            {"$project": {"n": 1, "score": SCORE}},
            {"$match": {"n": {"$gt": 0}}},
            {"$addFields": {"again": SCORE, "double": {"$multiply": [2, SCORE]}}},
            {"$limit": 2},
        ],
    )
    assert got == [
        {"_id": 7, "n": 7, "score": 0.9, "again": 0.9, "double": 1.8},
        {"_id": 2, "n": 2, "score": 0.8, "again": 0.8, "double": 1.6},
    ]


def test_sort_by_score_and_group(docs: Any) -> None:
    got = run(
        docs,
        [
            {"$sort": {"tag": 1, "s": SCORE}},
            {"$group": {"_id": "$tag", "best": {"$first": "$_id"}, "top": {"$max": SCORE}}},
            {"$sort": {"_id": 1}},
        ],
    )
    assert got == [{"_id": "even", "best": 2, "top": 0.8}, {"_id": "odd", "best": 7, "top": 0.9}]


def test_facets_see_the_score_and_drop_it(docs: Any) -> None:
    got = run(docs, [{"$facet": {"top": [{"$limit": 2}, {"$set": {"s": SCORE}}], "all": []}}])
    assert got == [
        {
            "top": [
                {"_id": 7, "n": 7, "tag": "odd", "s": 0.9},
                {"_id": 2, "n": 2, "tag": "even", "s": 0.8},
            ],
            "all": [{"_id": i, "n": i, "tag": "odd" if i % 2 else "even"} for i in (7, 2, 5, 0)],
        }
    ]


def test_out_writes_the_documents_without_the_score(docs: Any, direct: Any, db_name: str) -> None:
    assert run(docs, [{"$set": {"score": SCORE}}, {"$out": "best"}]) == []
    written = sorted(direct[db_name]["best"].find(), key=lambda d: d["_id"])
    assert [doc["_id"] for doc in written] == [0, 2, 5, 7]
    assert all(HIDDEN_FIELD not in doc and "score" in doc for doc in written)


def test_no_matches_no_documents(docs: Any) -> None:
    assert list(docs.aggregate(search_pipeline([], [{"$project": {"s": SCORE}}]))) == []


def test_errors_are_modelgate_errors() -> None:
    assert issubclass(StageNotAllowed, ModelgateError)
    assert issubclass(UnknownStageField, ModelgateError)
