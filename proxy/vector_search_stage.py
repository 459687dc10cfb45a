"""The `$vectorSearch` stage as text: its fields checked as mongod and mongot check them,
where the search stages may stand in a pipeline, and the pipeline the upstream runs in
place of the client's over the matches (see proxy.vector_search)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from bson.binary import Binary

from engine.errors import BadValue, ModelgateError
from engine.search.filters import VectorSearchQueryError

__all__ = [
    "HIDDEN_FIELD",
    "LIST_SEARCH_INDEXES",
    "MAX_NUM_CANDIDATES",
    "SCORE_META",
    "VECTOR_SEARCH",
    "StageNotAllowed",
    "UnknownStageField",
    "VectorSearchQuery",
    "check_stage_positions",
    "parse_vector_search",
    "rewrite_later_stages",
    "search_pipeline",
    "stage_name",
    "union_searches",
]

VECTOR_SEARCH = "$vectorSearch"
LIST_SEARCH_INDEXES = "$listSearchIndexes"
MAX_NUM_CANDIDATES = 10_000
# Where the rewritten pipeline keeps each match's rank (r) and score (s); unset at the end.
HIDDEN_FIELD = "__modelgate_vectorSearch"
_RANK = f"{HIDDEN_FIELD}.r"
_SCORE = f"{HIDDEN_FIELD}.s"
SCORE_META = "vectorSearchScore"

_STAGE_FIELDS = frozenset(
    {"index", "path", "queryVector", "query", "numCandidates", "limit", "filter", "exact", "model"}
)


class StageNotAllowed(ModelgateError):
    """A stage where MongoDB does not take it; MongoDB's code for the case (40602: only
    valid as the first stage, 40600: not within $facet, 51047: not within $lookup)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self._code = code
        self.code_name = f"Location{code}"

    @property
    def code(self) -> int:
        return self._code


class UnknownStageField(ModelgateError):
    """MongoDB's IDL refusal of a field a stage does not have (40415)."""

    code_name = "Location40415"

    @property
    def code(self) -> int:
        return 40415


# -- parsing ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VectorSearchQuery:
    index: str
    path: str
    query_vector: tuple[float, ...] | None
    query_text: str | None
    num_candidates: int
    limit: int
    filter: Mapping[str, Any] | None
    exact: bool
    model: str | None = None


def _int_field(spec: Mapping[str, Any], name: str) -> int | None:
    value = spec.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VectorSearchQueryError(f'"{name}" must be an integer')
    if isinstance(value, float) and not value.is_integer():
        raise VectorSearchQueryError(f'"{name}" must be an integer, got {value}')
    return int(value)


def _query_vector(value: Any) -> tuple[float, ...]:
    if isinstance(value, Binary) and value.subtype == 9:
        try:
            value = list(value.as_vector().data)
        except (ValueError, AttributeError) as exc:
            raise VectorSearchQueryError(
                f'"queryVector" is not a valid BSON vector: {exc}'
            ) from None
    if not isinstance(value, list | tuple) or not value:
        raise VectorSearchQueryError('"queryVector" must be a nonempty array of numbers')
    vector = []
    for position, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise VectorSearchQueryError(
                f'"queryVector" must be an array of numbers: position [{position}] is not'
            )
        number = float(item)
        if not math.isfinite(number):
            raise VectorSearchQueryError(
                f"'queryVector' contains a non-finite value (Infinity or NaN) at position "
                f'[{position}]. All values in "queryVector" must be finite.'
            )
        vector.append(number)
    return tuple(vector)


def _query_text(value: Any) -> str:
    # Automated embedding takes `query: "<text>"`, or `query: {text: "<text>"}`.
    if isinstance(value, Mapping) and set(value) == {"text"}:
        value = value["text"]
    if not isinstance(value, str) or not value:
        raise VectorSearchQueryError('"query" must be a nonempty string, or {text: <string>}')
    return value


def parse_vector_search(spec: Any) -> VectorSearchQuery:
    """The stage's fields, checked as mongod and mongot check them (mongot's messages)."""
    if not isinstance(spec, Mapping):
        raise VectorSearchQueryError(f"{VECTOR_SEARCH} value must be a document")
    for key in spec:
        if key not in _STAGE_FIELDS:
            raise UnknownStageField(f"BSON field '{VECTOR_SEARCH}.{key}' is an unknown field.")
    index = spec.get("index", "default")
    if not isinstance(index, str):
        raise VectorSearchQueryError('"index" must be a string')
    path = spec.get("path")
    if path is None:
        raise VectorSearchQueryError('"path" is required')
    if not isinstance(path, str) or not path:
        raise VectorSearchQueryError('"path" must be a nonempty string')
    limit = _int_field(spec, "limit")
    if limit is None:
        raise VectorSearchQueryError('"limit" is required')
    if limit < 1:
        raise VectorSearchQueryError('"limit" must be positive')
    exact = spec.get("exact", False)
    if not isinstance(exact, bool):
        raise VectorSearchQueryError('"exact" must be a boolean')
    num_candidates = _int_field(spec, "numCandidates")
    if num_candidates is not None and not 1 <= num_candidates <= MAX_NUM_CANDIDATES:
        raise VectorSearchQueryError(
            f'"numCandidates" must be within the bounds [1, {MAX_NUM_CANDIDATES}]'
        )
    if exact and num_candidates is not None:
        raise VectorSearchQueryError('"numCandidates" must be omitted when "exact" is set to true')
    if not exact:
        if num_candidates is None:
            raise VectorSearchQueryError("numCandidates is required for approximate vector search")
        if limit > num_candidates:
            raise VectorSearchQueryError("limit should be less than or equal to numCandidates")
    if ("queryVector" in spec) == ("query" in spec):
        raise VectorSearchQueryError(
            "Exactly one and only one of query and queryVector can be present"
        )
    vector = _query_vector(spec["queryVector"]) if "queryVector" in spec else None
    text = _query_text(spec["query"]) if "query" in spec else None
    filter_doc = spec.get("filter")
    if filter_doc is not None and not isinstance(filter_doc, Mapping):
        raise VectorSearchQueryError('"filter" must be a document')
    model = spec.get("model")
    if model is not None and not isinstance(model, str):
        raise VectorSearchQueryError('"model" must be a string')
    return VectorSearchQuery(
        index=index,
        path=path,
        query_vector=vector,
        query_text=text,
        num_candidates=num_candidates if num_candidates is not None else limit,
        limit=limit,
        filter=filter_doc or None,
        exact=exact,
        model=model,
    )


def stage_name(stage: Any) -> str | None:
    """The name of a stage document ({$name: spec}); None for anything else."""
    if isinstance(stage, Mapping) and len(stage) == 1:
        return str(next(iter(stage)))
    return None


def check_stage_positions(pipeline: Sequence[Any], *, nested: str | None = None) -> None:
    """Refuse the search stages where MongoDB refuses them: anywhere but first in the
    aggregate's own pipeline or (`$vectorSearch`, MongoDB 8.0 on) in a `$unionWith`'s
    sub-pipeline; never within `$lookup` or `$facet`, however deep. `nested` is the
    sub-pipeline's container: `$lookup` or `$facet` once within one, else `$unionWith`.
    (modelgate serves `$listSearchIndexes` in the aggregate's own pipeline only.)"""
    for position, stage in enumerate(pipeline):
        name = stage_name(stage)
        if name is None:
            continue
        if name in (VECTOR_SEARCH, LIST_SEARCH_INDEXES):
            if nested == "$facet":
                raise StageNotAllowed(
                    f"{name} is not allowed to be used within a $facet stage", 40600
                )
            if nested == "$lookup":
                raise StageNotAllowed(
                    f"{name} is not allowed within a $lookup's sub-pipeline", 51047
                )
            if nested is not None and name == LIST_SEARCH_INDEXES:
                raise BadValue(
                    f"modelgate serves {name} as the first stage of an aggregate's own "
                    f"pipeline only, not within {nested}"
                )
            if position != 0:
                raise StageNotAllowed(
                    f"{name} is only valid as the first stage in a pipeline.", 40602
                )
        spec = stage[name]
        if name in ("$lookup", "$unionWith") and isinstance(spec, Mapping):
            inner = spec.get("pipeline")
            if isinstance(inner, list):
                within = (
                    nested if name == "$unionWith" and nested in ("$lookup", "$facet") else name
                )
                check_stage_positions(inner, nested=within)
        elif name == "$facet" and isinstance(spec, Mapping):
            for inner in spec.values():
                if isinstance(inner, list):
                    check_stage_positions(inner, nested=name)


def union_searches(pipeline: Sequence[Any]) -> Iterator[tuple[MutableMapping[str, Any], str]]:
    """The `$unionWith` stages of `pipeline` (and of their sub-pipelines, innermost first)
    whose sub-pipeline begins with `$vectorSearch`, with the collection each reads: the
    spec to give a pipeline of the matches (search_pipeline). A `$unionWith` without a
    collection needs `$documents` first, which the upstream says."""
    for stage in pipeline:
        if stage_name(stage) != "$unionWith":
            continue
        spec = stage["$unionWith"]
        if not isinstance(spec, MutableMapping) or not isinstance(spec.get("pipeline"), list):
            continue
        inner = spec["pipeline"]
        yield from union_searches(inner)
        if isinstance(spec.get("coll"), str) and inner and stage_name(inner[0]) == VECTOR_SEARCH:
            yield spec, spec["coll"]


# -- the rewritten pipeline -------------------------------------------------------------


def _is_score_meta(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and value.get("$meta") == SCORE_META


class _Rewriter:
    def __init__(self) -> None:
        self.uses_score = False

    def expression(self, value: Any) -> Any:
        if _is_score_meta(value):
            self.uses_score = True
            return f"${_SCORE}"
        if isinstance(value, Mapping):
            if len(value) == 1 and "$literal" in value:
                return value
            return {key: self.expression(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.expression(item) for item in value]
        return value

    def stage(self, stage: Any) -> Any:
        name = stage_name(stage)
        if name is None:
            return self.expression(stage)
        spec = stage[name]
        if name == "$sort" and isinstance(spec, Mapping):
            # {field: {$meta: "vectorSearchScore"}} sorts by the score, best first.
            sort = {}
            for key, order in spec.items():
                if _is_score_meta(order):
                    self.uses_score = True
                    sort[_SCORE] = -1
                else:
                    sort[key] = order
            return {name: sort}
        if name == "$project" and isinstance(spec, Mapping):
            spec = self.expression(spec)
            if _is_inclusion(spec):
                # The score must outlive an inclusion projection, for the stages after it.
                spec = {**spec, HIDDEN_FIELD: 1}
            return {name: spec}
        if name == "$facet" and isinstance(spec, Mapping):
            # Each facet's documents come from here: they carry the hidden field, which
            # each facet drops at its end (the final $unset does not reach into them).
            return {
                name: {
                    key: [*(self.stage(s) for s in inner), {"$unset": HIDDEN_FIELD}]
                    if isinstance(inner, list)
                    else inner
                    for key, inner in spec.items()
                }
            }
        if name in ("$lookup", "$unionWith") and isinstance(spec, Mapping):
            # Their sub-pipelines read other documents: no score there.
            return stage
        return {name: self.expression(spec)}


def _is_inclusion(projection: Mapping[str, Any], top: bool = True) -> bool:
    """Whether a $project keeps only what it names (MongoDB's inclusion mode): a field
    set to true/1 or to an expression; a sub-document of 0s alone excludes."""
    for key, value in projection.items():
        if top and key == "_id":
            continue
        if isinstance(value, bool | int | float):
            if value:
                return True
        elif isinstance(value, Mapping) and value and not str(next(iter(value))).startswith("$"):
            if _is_inclusion(value, top=False):
                return True
        else:
            return True  # an expression: a computed field
    return False


def rewrite_later_stages(stages: Sequence[Any]) -> tuple[list[Any], bool]:
    """The stages after `$vectorSearch` with the score read from the hidden field; and
    whether any of them reads it."""
    rewriter = _Rewriter()
    rewritten = [rewriter.stage(stage) for stage in stages]
    return rewritten, rewriter.uses_score


def search_pipeline(matches: Sequence[tuple[Any, float]], later: Sequence[Any]) -> list[Any]:
    """The pipeline the upstream runs in place of the client's: the matches, best first,
    then the later stages (see the module's docstring)."""
    ids = [doc_id for doc_id, _ in matches]
    stages, uses_score = rewrite_later_stages(later)
    pipeline: list[Any] = [
        {"$match": {"_id": {"$in": ids}}},
        {"$addFields": {_RANK: {"$indexOfArray": [{"$literal": ids}, "$_id"]}}},
    ]
    if uses_score:
        scores = [float(score) for _, score in matches]
        pipeline.append(
            {"$addFields": {_SCORE: {"$arrayElemAt": [{"$literal": scores}, f"${_RANK}"]}}}
        )
    pipeline.append({"$sort": {_RANK: 1}})
    pipeline.extend(stages)
    unset = {"$unset": HIDDEN_FIELD}
    if stages and stage_name(stages[-1]) in ("$out", "$merge"):
        pipeline.insert(len(pipeline) - 1, unset)
    else:
        pipeline.append(unset)
    return pipeline
