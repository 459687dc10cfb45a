"""`$vectorSearch` filters: the MQL subset MongoDB Vector Search allows, compiled once per
query into a predicate over a document's filter-field values.

Operators: $eq $ne $gt $gte $lt $lte $in $nin $exists $not on fields, $and $or $nor above
them, and implicit equality (`{field: value}`). Values: booleans, dates, ObjectIds,
numbers (not decimals), strings, UUIDs and null. Every field named must be indexed as a
`filter` field of the index. Matching follows MQL: comparisons hold only between values of
the same type bracket (numbers with numbers whatever their BSON type, ...), a field that
holds an array matches when any element does, `{field: null}` also matches a missing
field, and $ne/$nin/$not match where their positive form does not (missing fields too).

Errors are mongot's, as MongoDB relays them: code 8 (UnknownError), "PlanExecutor error
during aggregation :: caused by :: <mongot's message>"."""

from __future__ import annotations

import datetime
import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bson.binary import Binary
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.decimal128 import Decimal128
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

from engine.documents import MISSING
from engine.errors import ModelgateError

__all__ = [
    "FIELD_OPERATORS",
    "LOGICAL_OPERATORS",
    "VectorFilter",
    "VectorSearchQueryError",
    "compile_filter",
    "filter_values",
]

FIELD_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$not")
LOGICAL_OPERATORS = ("$and", "$or", "$nor")

_PLAN_EXECUTOR = "PlanExecutor error during aggregation :: caused by :: "


class VectorSearchQueryError(ModelgateError):
    """A `$vectorSearch` query mongot refuses; MongoDB relays mongot's message under code 8
    (UnknownError), prefixed as a failed aggregation."""

    code_name = "UnknownError"

    def __init__(self, message: str) -> None:
        super().__init__(_PLAN_EXECUTOR + message)


Values = Mapping[str, Any]
Predicate = Callable[[Values], bool]

_MISSING: Any = MISSING  # engine.documents' marker, or no key at all

# MQL's canonical type brackets, for the types a filter may compare.
_NULL, _NUMBER, _STRING, _BINARY, _OBJECT_ID, _BOOL, _DATE = 1, 2, 3, 6, 7, 8, 9
_NAN = (0, 0)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _date_ms(value: datetime.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _key(value: Any) -> tuple[int, Any] | None:
    """(bracket, comparable key) of a BSON value of a filterable type; None for others
    (documents, arrays, decimals, regexes, ...), which nothing in a filter equals."""
    if value is None:
        return (_NULL, None)
    if isinstance(value, bool):
        return (_BOOL, value)
    if isinstance(value, int):
        return (_NUMBER, (1, int(value)))
    if isinstance(value, float):
        # MQL: NaN equals NaN (and no number is greater or less than it).
        return (_NUMBER, _NAN if math.isnan(value) else (1, value))
    if isinstance(value, str):
        return (_STRING, value)  # code point order is UTF-8 byte order: MQL's
    if isinstance(value, ObjectId):
        return (_OBJECT_ID, value.binary)
    if isinstance(value, datetime.datetime):
        return (_DATE, _date_ms(value))
    if isinstance(value, DatetimeMS):
        return (_DATE, int(value))
    if isinstance(value, uuid.UUID):
        return (_BINARY, (16, 4, value.bytes))
    if isinstance(value, Binary):
        return (_BINARY, (len(value), value.subtype, bytes(value)))
    return None


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "document"
    if isinstance(value, list | tuple):
        return "array"
    return {
        Decimal128: "decimal",
        Regex: "regex",
        Timestamp: "timestamp",
        MinKey: "minKey",
        MaxKey: "maxKey",
        Code: "javascript",
    }.get(type(value), type(value).__name__)


def _operand(operator: str, path: str, value: Any) -> tuple[int, Any]:
    """The key of a filter's operand, refused unless of a type vector search filters on."""
    key = _key(value)
    is_uuid = isinstance(value, uuid.UUID) or (
        isinstance(value, Binary) and value.subtype in (3, 4) and len(value) == 16
    )
    if key is None or (key[0] == _BINARY and not is_uuid):
        raise VectorSearchQueryError(
            f'"filter.{path}.{operator}" has a value of type {_type_name(value)}: vector '
            "search filters take booleans, dates, objectIds, numbers, strings, UUIDs and null"
        )
    return key


def _candidates(value: Any) -> Iterable[Any]:
    """What a field's value offers to a comparison: itself, or each element of an array."""
    if isinstance(value, list | tuple):
        return value
    return (value,)


def _equals(key: tuple[int, Any]) -> Callable[[Any], bool]:
    if key[0] == _NULL:
        # {field: null} matches a missing field, a null, and an array holding a null.
        def match_null(value: Any) -> bool:
            return value is _MISSING or any(v is None for v in _candidates(value))

        return match_null

    def match(value: Any) -> bool:
        return value is not _MISSING and any(_key(v) == key for v in _candidates(value))

    return match


_RANGES: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _range(operator: str, key: tuple[int, Any]) -> Callable[[Any], bool]:
    bracket, bound = key
    compare = _RANGES[operator]
    inclusive = operator in ("$gte", "$lte")

    def match(value: Any) -> bool:
        if value is _MISSING:
            # $gte/$lte null match a missing field as they match a null.
            return inclusive and bracket == _NULL
        for v in _candidates(value):
            k = _key(v)
            if k is None or k[0] != bracket:
                continue
            if k[1] == _NAN or bound == _NAN:
                # NaN is in no range: $gte/$lte NaN match NaN only.
                if inclusive and k[1] == bound:
                    return True
            elif compare(k[1], bound):
                return True
        return False

    if bracket == _NULL:
        # Only null equals null; nothing is greater or less than it.
        return _equals(key) if inclusive else (lambda value: False)
    return match


def _in(path: str, operator: str, operand: Any) -> Callable[[Any], bool]:
    if not isinstance(operand, list | tuple):
        raise VectorSearchQueryError(f'"filter.{path}.{operator}" must be an array')
    tests = [_equals(_operand(operator, path, item)) for item in operand]
    return lambda value: any(test(value) for test in tests)


def _field_test(path: str, operator: str, operand: Any) -> Callable[[Any], bool]:
    if operator == "$eq":
        return _equals(_operand(operator, path, operand))
    if operator == "$ne":
        equal = _equals(_operand(operator, path, operand))
        return lambda value: not equal(value)
    if operator in _RANGES:
        return _range(operator, _operand(operator, path, operand))
    if operator == "$in":
        return _in(path, operator, operand)
    if operator == "$nin":
        within = _in(path, operator, operand)
        return lambda value: not within(value)
    if operator == "$exists":
        if not isinstance(operand, bool | int | float):
            raise VectorSearchQueryError(f'"filter.{path}.$exists" must be a boolean')
        wanted = bool(operand)
        return lambda value: (value is not _MISSING) == wanted
    if operator == "$not":
        if not isinstance(operand, Mapping) or not operand:
            raise VectorSearchQueryError(
                f'"filter.{path}.$not" must be a document of operators, e.g. {{$gt: 5}}'
            )
        inner = _operators(path, operand)
        return lambda value: not inner(value)
    raise VectorSearchQueryError(
        f'Operator "{operator}" is not supported in a $vectorSearch filter (at "filter.{path}"); '
        "supported: " + ", ".join(FIELD_OPERATORS + LOGICAL_OPERATORS)
    )


def _operators(path: str, spec: Mapping[str, Any]) -> Callable[[Any], bool]:
    tests: list[Callable[[Any], bool]] = []
    for operator, operand in spec.items():
        if not str(operator).startswith("$"):
            raise VectorSearchQueryError(
                f'"filter.{path}" mixes operators and fields: a filter compares a field '
                "with values, never with a document"
            )
        tests.append(_field_test(path, operator, operand))
    if len(tests) == 1:
        return tests[0]
    return lambda value: all(test(value) for test in tests)


class _Compiler:
    def __init__(self, filter_paths: frozenset[str]) -> None:
        self.filter_paths = filter_paths
        self.paths: set[str] = set()

    def document(self, spec: Any, where: str) -> Predicate:
        if not isinstance(spec, Mapping):
            raise VectorSearchQueryError(f'"{where}" must be a document')
        tests = [self.clause(str(key), value, where) for key, value in spec.items()]
        if len(tests) == 1:
            return tests[0]
        return lambda values: all(test(values) for test in tests)

    def clause(self, key: str, value: Any, where: str) -> Predicate:
        if key in LOGICAL_OPERATORS:
            if not isinstance(value, list | tuple) or not value:
                raise VectorSearchQueryError(f'"{where}.{key}" must be a nonempty array')
            tests = [self.document(item, f"{where}.{key}") for item in value]
            if key == "$and":
                return lambda values: all(test(values) for test in tests)
            if key == "$or":
                return lambda values: any(test(values) for test in tests)
            return lambda values: not any(test(values) for test in tests)
        if key.startswith("$"):
            raise VectorSearchQueryError(
                f'Operator "{key}" is not supported at the top of a $vectorSearch filter; '
                "supported: " + ", ".join(LOGICAL_OPERATORS) + " and field conditions"
            )
        if key not in self.filter_paths:
            raise VectorSearchQueryError(f"Path '{key}' needs to be indexed as filter")
        self.paths.add(key)
        if isinstance(value, Mapping) and value and str(next(iter(value))).startswith("$"):
            test = _operators(key, value)
        else:
            test = _field_test(key, "$eq", value)
        return lambda values: test(values.get(key, _MISSING))


class VectorFilter:
    """A compiled `$vectorSearch` filter: `matches` takes {path: value as found in the
    document} for the filter's `paths` (a missing path: no key), as `filter_values` gives."""

    __slots__ = ("_predicate", "document", "paths")

    def __init__(self, predicate: Predicate, paths: frozenset[str], document: Mapping[str, Any]):
        self._predicate = predicate
        self.paths = paths
        self.document = document

    def matches(self, values: Values) -> bool:
        return self._predicate(values)

    def __repr__(self) -> str:
        return f"VectorFilter({dict(self.document)!r})"


def compile_filter(filter_doc: Mapping[str, Any], filter_paths: frozenset[str]) -> VectorFilter:
    """The filter, checked as mongot checks it: operators it takes, values of the types
    it takes, fields indexed as `filter`."""
    compiler = _Compiler(filter_paths)
    if not isinstance(filter_doc, Mapping):
        raise VectorSearchQueryError('"filter" must be a document')
    predicate = compiler.document(filter_doc, "filter") if filter_doc else (lambda values: True)
    return VectorFilter(predicate, frozenset(compiler.paths), filter_doc)


def _traverse(value: Any, parts: list[str], found: list[Any]) -> None:
    if not parts:
        found.append(value)
        return
    if isinstance(value, Mapping):
        if parts[0] in value:
            _traverse(value[parts[0]], parts[1:], found)
    elif isinstance(value, list | tuple):
        # MQL: a path goes through an array of documents into each of them.
        for element in value:
            if isinstance(element, Mapping):
                _traverse(element, parts, found)


def filter_values(document: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """{path: value} of a document for `VectorFilter.matches`, read as MQL reads a dotted
    path: through arrays of documents (whose values then count as an array). A path
    found nowhere has no key."""
    values: dict[str, Any] = {}
    for path in paths:
        found: list[Any] = []
        _traverse(document, path.split("."), found)
        if len(found) == 1 and not _through_array(document, path):
            values[path] = found[0]
        elif found:
            flat: list[Any] = []
            for item in found:
                flat.extend(item if isinstance(item, list | tuple) else (item,))
            values[path] = flat
    return values


def _through_array(document: Mapping[str, Any], path: str) -> bool:
    value: Any = document
    for part in path.split(".")[:-1]:
        if isinstance(value, list | tuple):
            return True
        value = value.get(part) if isinstance(value, Mapping) else None
    return isinstance(value, list | tuple)
