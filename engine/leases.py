"""Deferred work kept in MongoDB, so that no modelgate process holds state a crash
could lose.

The queue itself is the documents: a document in the model's namespace that lacks an
output of the model's current version is pending. Beside them, in database `modelgate`:
  deferred_leases    {_id: {model, doc}, owner, expires}: who is working on a document;
                     a lease that expires (its holder died) is taken over by another
  deferred_failures  {_id: {model, doc}, attempts, retry_at, error}: failed attempts
  deferred_stats     {_id: model, done, duplicates, failed}: counters kept by all processes

Synchronous pymongo, called from worker threads."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import pymongo
import pymongo.errors
from pymongo.collection import Collection

from engine.documents import FAITHFUL, get_path
from engine.registry import DATABASE
from engine.spec import ModelSpec

__all__ = ["Claimed", "WorkQueue"]

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Claimed:
    """Documents this process leased, with the input values it read."""

    documents: list[dict[str, Any]]


class WorkQueue:
    """The pending work of one deferred model (one spec and version)."""

    def __init__(
        self,
        client: pymongo.MongoClient[dict[str, Any]],
        spec: ModelSpec,
        version: int,
        owner: str,
    ) -> None:
        self.spec = spec
        self.version = version
        self.owner = owner
        self.collection: Collection[dict[str, Any]] = client[spec.db].get_collection(
            spec.collection, codec_options=FAITHFUL
        )
        meta = client[DATABASE]
        self.leases = meta.deferred_leases
        self.failures = meta.deferred_failures
        self.stats = meta.deferred_stats

    # -- what is pending ---------------------------------------------------------------

    def pending_filter(self) -> dict[str, Any]:
        """Documents that need this version's prediction: the output is missing, of an
        older version, or marked stale by backfillModel; and the input is there."""
        out = self.spec.output_field
        clauses: list[dict[str, Any]] = [
            {self.spec.input_field: {"$exists": True}},
            {"$or": [{f"{out}.version": {"$ne": self.version}}, {f"{out}.stale": True}]},
        ]
        if self.spec.filter:
            clauses.append(self.spec.filter)
        return {"$and": clauses}

    def ensure_index(self) -> None:
        # The sweep asks for documents by their output's version: keep that cheap.
        self.collection.create_index(f"{self.spec.output_field}.version")
        self.leases.create_index("expires")

    def _busy_ids(self) -> list[Any]:
        """Documents someone holds a live lease on, or that wait for a retry."""
        now = _now()
        leased = self.leases.find(
            {"_id.model": self.spec.name, "expires": {"$gt": now}}, {"_id": 1}
        )
        waiting = self.failures.find(
            {"_id.model": self.spec.name, "retry_at": {"$gt": now}}, {"_id": 1}
        )
        return [doc["_id"]["doc"] for doc in leased] + [doc["_id"]["doc"] for doc in waiting]

    def claim(self, limit: int, lease_seconds: float) -> Claimed:
        """Lease up to `limit` pending documents that nobody else holds."""
        busy = self._busy_ids()
        query = self.pending_filter()
        if busy:
            query = {"$and": [query, {"_id": {"$nin": busy}}]}
        candidates = list(self.collection.find(query, {"_id": 1}).sort("_id", 1).limit(limit))
        if not candidates:
            return Claimed([])
        now = _now()
        expires = now + datetime.timedelta(seconds=lease_seconds)
        # Expired leases of these documents are taken over (their holder died).
        self.leases.delete_many(
            {
                "_id": {"$in": [{"model": self.spec.name, "doc": c["_id"]} for c in candidates]},
                "expires": {"$lte": now},
            }
        )
        leases = [
            {
                "_id": {"model": self.spec.name, "doc": c["_id"]},
                "owner": self.owner,
                "expires": expires,
            }
            for c in candidates
        ]
        won: list[Any]
        try:
            self.leases.insert_many(leases, ordered=False)
            won = [c["_id"] for c in candidates]
        except pymongo.errors.BulkWriteError as exc:
            lost = {leases[e["index"]]["_id"]["doc"] for e in exc.details["writeErrors"]}
            won = [c["_id"] for c in candidates if c["_id"] not in lost]
        if not won:
            return Claimed([])
        # Read the documents after leasing them: the input we predict from is the one we
        # condition the write on, so a concurrent update is never overwritten.
        projection = {self.spec.input_field: 1}
        documents = list(
            self.collection.find(
                {"$and": [{"_id": {"$in": won}}, self.pending_filter()]}, projection
            )
        )
        found = {doc["_id"] for doc in documents}
        self.release([doc_id for doc_id in won if doc_id not in found])
        return Claimed(documents)

    def release(self, doc_ids: list[Any]) -> None:
        if doc_ids:
            self.leases.delete_many(
                {
                    "_id": {"$in": [{"model": self.spec.name, "doc": d} for d in doc_ids]},
                    "owner": self.owner,
                }
            )

    # -- results -----------------------------------------------------------------------

    def write_outputs(self, results: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
        """Store (document as read, output value) pairs with one bulk write, each
        conditioned on the input being unchanged since it was read. Returns how many
        were already done by someone else (duplicate work)."""
        if not results:
            return 0
        out = self.spec.output_field
        updates = [
            pymongo.UpdateOne(
                {
                    "_id": doc["_id"],
                    self.spec.input_field: get_path(doc, self.spec.input_field),
                    "$or": [{f"{out}.version": {"$ne": self.version}}, {f"{out}.stale": True}],
                },
                {"$set": {out: value}},
            )
            for doc, value in results
        ]
        result = self.collection.bulk_write(updates, ordered=False)
        skipped = len(results) - result.matched_count
        duplicates = 0
        if skipped:
            duplicates = (
                self.collection.count_documents(
                    {
                        "_id": {"$in": [doc["_id"] for doc, _ in results]},
                        f"{out}.version": self.version,
                        f"{out}.stale": {"$ne": True},
                    }
                )
                - result.matched_count
            )
        done_ids = [doc["_id"] for doc, _ in results]
        self.failures.delete_many(
            {"_id": {"$in": [{"model": self.spec.name, "doc": d} for d in done_ids]}}
        )
        self.release(done_ids)
        errors = sum(1 for _, value in results if "error" in value)
        self.stats.update_one(
            {"_id": self.spec.name},
            {
                "$inc": {
                    "done": result.modified_count - errors,
                    "failed": errors,
                    "duplicates": max(duplicates, 0),
                }
            },
            upsert=True,
        )
        return max(duplicates, 0)

    def record_failures(
        self, failed: list[tuple[dict[str, Any], str]], backoff: float, max_attempts: int
    ) -> list[tuple[dict[str, Any], str, int]]:
        """Count a failed attempt for each document; returns those that reached the
        limit (document, error, attempts) so they get an error record instead."""
        exhausted = []
        now = _now()
        for doc, message in failed:
            record = self.failures.find_one_and_update(
                {"_id": {"model": self.spec.name, "doc": doc["_id"]}},
                {"$inc": {"attempts": 1}, "$set": {"error": message}},
                upsert=True,
                return_document=pymongo.ReturnDocument.AFTER,
            )
            attempts = int(record["attempts"])
            if attempts >= max_attempts:
                exhausted.append((doc, message, attempts))
            else:
                retry_at = now + datetime.timedelta(seconds=backoff * 2 ** (attempts - 1))
                self.failures.update_one({"_id": record["_id"]}, {"$set": {"retry_at": retry_at}})
        self.release([doc["_id"] for doc, _ in failed])
        return exhausted

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = self.spec.output_field
        now = _now()
        pending = self.collection.count_documents(self.pending_filter())
        scope = [self.spec.filter] if self.spec.filter else []
        done = self.collection.count_documents(
            {
                "$and": [
                    *scope,
                    {f"{out}.version": self.version},
                    {f"{out}.error": {"$exists": False}},
                ]
            }
        )
        failed = self.collection.count_documents(
            {
                "$and": [
                    *scope,
                    {f"{out}.version": self.version},
                    {f"{out}.error": {"$exists": True}},
                ]
            }
        )
        live = list(
            self.leases.find({"_id.model": self.spec.name, "expires": {"$gt": now}}, {"owner": 1})
        )
        oldest = self.collection.find_one(self.pending_filter(), {"_id": 1}, sort=[("_id", 1)])
        lag = None
        if oldest is not None and hasattr(oldest["_id"], "generation_time"):
            # The oldest pending write's age, from its ObjectId (the insert time).
            lag = max(0.0, (now - oldest["_id"].generation_time).total_seconds())
        counters = self.stats.find_one({"_id": self.spec.name}) or {}
        return {
            "pending": pending,
            "inProgress": len(live),
            "done": done,
            "failed": failed,
            "retrying": self.failures.count_documents({"_id.model": self.spec.name}),
            "lagSeconds": lag,
            "leaseHolders": sorted({lease["owner"] for lease in live}),
            "duplicates": int(counters.get("duplicates", 0)),
        }

    def mark_stale(self, extra_filter: dict[str, Any] | None) -> int:
        """backfillModel: recompute outputs that exist (pending ones are already due)."""
        out = self.spec.output_field
        clauses: list[dict[str, Any]] = [{f"{out}.version": {"$exists": True}}]
        if self.spec.filter:
            clauses.append(self.spec.filter)
        if extra_filter:
            clauses.append(extra_filter)
        result = self.collection.update_many({"$and": clauses}, {"$set": {f"{out}.stale": True}})
        return int(result.modified_count)
