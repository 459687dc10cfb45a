"""An in-memory stand-in for the pymongo Collection methods engine.leases calls, for unit
tests of the lease and claim logic without a server.

Only what that code sends is understood: the query operators $and, $exists, $ne, $in,
$gt, $gte, $lte and equality (whole values, on dotted paths); the update operators $set,
$inc and $rename; inclusion projections; sorting on one field. Anything else raises
NotImplementedError, so a query the fake does not know fails the test instead of
matching wrongly. Results are pymongo's own result types, built from the counts a server
would report. Documents go in and come out as copies, as they would over the wire."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pymongo
from pymongo.errors import BulkWriteError
from pymongo.results import BulkWriteResult, DeleteResult, UpdateResult

from engine.documents import MISSING, get_path, set_path, unset_path

__all__ = ["FakeCollection"]

Document = dict[str, Any]


def _is_operator_document(condition: Any) -> bool:
    return (
        isinstance(condition, Mapping)
        and bool(condition)
        and all(key.startswith("$") for key in condition)
    )


def _test(operator: str, argument: Any, value: Any) -> bool:
    if operator == "$exists":
        return (value is not MISSING) == bool(argument)
    if operator == "$ne":
        return bool(value != argument)
    if operator == "$in":
        # As MongoDB: null in the list matches a missing field too.
        return value in argument if value is not MISSING else None in argument
    if value is MISSING:
        return False
    compare = {
        "$gt": lambda: value > argument,
        "$gte": lambda: value >= argument,
        "$lte": lambda: value <= argument,
    }.get(operator)
    if compare is None:
        raise NotImplementedError(f"query operator {operator}")
    try:
        return bool(compare())
    except TypeError:  # as MongoDB: values of other types do not compare
        return False


def matches(document: Document, query: Mapping[str, Any]) -> bool:
    for key, condition in query.items():
        if key == "$and":
            if not all(matches(document, clause) for clause in condition):
                return False
        elif key.startswith("$"):
            raise NotImplementedError(f"query operator {key}")
        elif _is_operator_document(condition):
            value = get_path(document, key)
            if not all(_test(op, arg, value) for op, arg in condition.items()):
                return False
        elif (value := get_path(document, key)) != condition and not (
            condition is None and value is MISSING  # as MongoDB: null matches a missing field
        ):
            return False
    return True


def _apply(document: Document, update: Mapping[str, Any]) -> None:
    for operator, fields in update.items():
        for path, argument in fields.items():
            if operator == "$set":
                set_path(document, path, copy.deepcopy(argument))
            elif operator == "$inc":
                current = get_path(document, path)
                set_path(document, path, (0 if current is MISSING else current) + argument)
            elif operator == "$rename":
                value = get_path(document, path)
                if value is not MISSING:
                    unset_path(document, path)
                    set_path(document, argument, value)
            else:
                raise NotImplementedError(f"update operator {operator}")


def _project(document: Document, projection: Mapping[str, Any] | None) -> Document:
    if projection is None:
        return copy.deepcopy(document)
    if not all(included == 1 for included in projection.values()):
        raise NotImplementedError("only inclusion projections")
    projected: Document = {"_id": copy.deepcopy(document["_id"])}
    for path in projection:
        value = get_path(document, path)
        if value is not MISSING:
            set_path(projected, path, copy.deepcopy(value))
    return projected


class FakeCursor:
    def __init__(self, documents: list[Document]) -> None:
        self._documents = documents

    def sort(self, key: str, direction: int = 1) -> FakeCursor:
        self._documents.sort(key=lambda doc: get_path(doc, key), reverse=direction < 0)
        return self

    def limit(self, count: int) -> FakeCursor:
        if count:  # as in pymongo, a limit of 0 is no limit
            self._documents = self._documents[:count]
        return self

    def __iter__(self) -> Iterator[Document]:
        return iter(self._documents)


class FakeCollection:
    def __init__(self) -> None:
        self.documents: list[Document] = []

    # -- reads ------------------------------------------------------------------------

    def find(
        self, filter: Mapping[str, Any], projection: Mapping[str, Any] | None = None
    ) -> FakeCursor:
        found = [_project(doc, projection) for doc in self.documents if matches(doc, filter)]
        if _is_operator_document(filter.get("_id")):
            # A range on _id (beside an equality) is read from an index that ends in
            # _id (engine.pending): in _id order, not in the order of the inserts.
            found.sort(key=lambda doc: doc["_id"])
        return FakeCursor(found)

    def find_one(
        self,
        filter: Mapping[str, Any],
        projection: Mapping[str, Any] | None = None,
        sort: list[tuple[str, int]] | None = None,
    ) -> Document | None:
        cursor = self.find(filter, projection)
        for key, direction in sort or []:
            cursor.sort(key, direction)
        return next(iter(cursor), None)

    def count_documents(self, filter: Mapping[str, Any]) -> int:
        return sum(1 for doc in self.documents if matches(doc, filter))

    # -- writes -----------------------------------------------------------------------

    def create_index(self, keys: Any, **options: Any) -> str:
        return "index"  # indexes change speed, not results

    def insert_many(self, documents: list[Document], ordered: bool = True) -> None:
        errors = []
        for index, document in enumerate(documents):
            if any(existing["_id"] == document["_id"] for existing in self.documents):
                errors.append({"index": index, "code": 11000, "errmsg": "duplicate key"})
                if ordered:
                    break
            else:
                self.documents.append(copy.deepcopy(document))
        if errors:
            raise BulkWriteError({"writeErrors": errors, "nInserted": len(documents) - len(errors)})

    def delete_many(self, filter: Mapping[str, Any]) -> DeleteResult:
        kept = [doc for doc in self.documents if not matches(doc, filter)]
        deleted = len(self.documents) - len(kept)
        self.documents = kept
        return DeleteResult({"n": deleted}, acknowledged=True)

    def _update(
        self, filter: Mapping[str, Any], update: Mapping[str, Any], *, many: bool, upsert: bool
    ) -> tuple[int, int, Document | None]:
        """(matched, modified, the last document updated or inserted)"""
        matched = modified = 0
        touched = None
        for document in self.documents:
            if not matches(document, filter):
                continue
            before = copy.deepcopy(document)
            _apply(document, update)
            matched += 1
            modified += document != before
            touched = document
            if not many:
                break
        if not matched and upsert:
            touched = {
                key: copy.deepcopy(value)
                for key, value in filter.items()
                if not key.startswith("$") and not _is_operator_document(value)
            }
            _apply(touched, update)
            self.documents.append(touched)
        return matched, modified, touched

    def update_one(
        self, filter: Mapping[str, Any], update: Mapping[str, Any], upsert: bool = False
    ) -> UpdateResult:
        matched, modified, _ = self._update(filter, update, many=False, upsert=upsert)
        return UpdateResult({"n": matched, "nModified": modified}, acknowledged=True)

    def update_many(self, filter: Mapping[str, Any], update: Mapping[str, Any]) -> UpdateResult:
        matched, modified, _ = self._update(filter, update, many=True, upsert=False)
        return UpdateResult({"n": matched, "nModified": modified}, acknowledged=True)

    def find_one_and_update(
        self,
        filter: Mapping[str, Any],
        update: Mapping[str, Any],
        upsert: bool = False,
        return_document: bool = pymongo.ReturnDocument.BEFORE,
    ) -> Document | None:
        if return_document != pymongo.ReturnDocument.AFTER:
            raise NotImplementedError("only ReturnDocument.AFTER")
        _, _, touched = self._update(filter, update, many=False, upsert=upsert)
        return copy.deepcopy(touched)

    def bulk_write(
        self, requests: list[pymongo.UpdateOne], ordered: bool = True
    ) -> BulkWriteResult:
        matched = modified = 0
        for request in requests:
            if not isinstance(request, pymongo.UpdateOne):
                raise NotImplementedError(f"bulk operation {type(request).__name__}")
            # pymongo has no public accessors for an operation's filter and update.
            one_matched, one_modified, _ = self._update(
                request._filter, request._doc, many=False, upsert=request._upsert or False
            )
            matched += one_matched
            modified += one_modified
        return BulkWriteResult(
            {
                "nMatched": matched,
                "nModified": modified,
                "nInserted": 0,
                "nUpserted": 0,
                "nRemoved": 0,
                "upserted": [],
                "writeErrors": [],
                "writeConcernErrors": [],
            },
            acknowledged=True,
        )
