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
import uuid
from dataclasses import dataclass
from typing import Any

import pymongo
import pymongo.errors
from pymongo.collection import Collection

from engine.documents import FAITHFUL, get_path
from engine.error_records import error_records_filter
from engine.outputs import stale_update
from engine.registry import DATABASE
from engine.spec import ModelSpec

__all__ = ["Claimed", "WorkQueue"]

log = logging.getLogger(__name__)

# Documents retried per round trip: bounds the $in lists (upstreams that scan answer
# long ones slowly) while many failed documents still take few round trips.
_RETRY_CHUNK = 1000


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _aware(moment: datetime.datetime) -> datetime.datetime:
    # pymongo decodes dates as naive UTC unless asked otherwise.
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Claimed:
    """Documents this process leased (with the input it read), under one batch id."""

    batch: str
    documents: list[dict[str, Any]]
    # Documents of the batch with earlier failed attempts, whose records go once done.
    retried: frozenset[Any] = frozenset()
    # The last _id the claim looked at (None: it found no candidates at all).
    scanned_to: Any = None
    # Expired leases this claim removed: a holder died, or stopped renewing in time.
    taken_over: int = 0


class WorkQueue:
    """The pending work of one deferred model (one spec and version): over the model's
    collection and the bookkeeping collections above, which `on` opens on a client."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        owner: str,
        *,
        collection: Collection[dict[str, Any]],
        leases: Collection[dict[str, Any]],
        failures: Collection[dict[str, Any]],
        stats: Collection[dict[str, Any]],
    ) -> None:
        self.spec = spec
        self.version = version
        self.owner = owner
        self.collection = collection
        self.leases = leases
        self.failures = failures
        self.stats = stats

    @classmethod
    def on(
        cls,
        client: pymongo.MongoClient[dict[str, Any]],
        spec: ModelSpec,
        version: int,
        owner: str,
    ) -> WorkQueue:
        """The queue of `spec` (at `version`) on the upstream `client` talks to."""
        meta = client[DATABASE]
        return cls(
            spec,
            version,
            owner,
            collection=client[spec.db].get_collection(spec.collection, codec_options=FAITHFUL),
            leases=meta.deferred_leases,
            failures=meta.deferred_failures,
            stats=meta.deferred_stats,
        )

    # -- what is pending ---------------------------------------------------------------

    def pending_filter(self) -> dict[str, Any]:
        """Documents that need this version's prediction: the output is missing, of an
        older version, or set aside by backfillModel; and the input is there.

        (No $or here: the upstream must be able to answer this from the index.)"""
        clauses: list[dict[str, Any]] = [
            {self.spec.input_field: {"$exists": True}},
            {f"{self.spec.output_field}.version": {"$ne": self.version}},
        ]
        if self.spec.filter:
            clauses.append(self.spec.filter)
        return {"$and": clauses}

    def ensure_index(self) -> None:
        # The sweep asks for documents by their output's version: keep that cheap.
        self.collection.create_index(f"{self.spec.output_field}.version")
        self.leases.create_index([("model", 1), ("expires", 1)])
        self.leases.create_index("batch")
        self.failures.create_index("model")

    def claim(self, limit: int, lease_seconds: float, after: Any = None) -> Claimed:
        """Lease up to `limit` pending documents that nobody else holds (with `_id`
        greater than `after`, when given: a drain moves forward through the collection
        instead of rescanning the documents it has already done).

        Written for few round trips, since each costs (SecantusDB, which plans a
        filter of several clauses as a collection scan, answers any query on the model's
        collection in time that grows with the collection): live leases and retry waits
        are read whole (they are small) and skipped here rather than in the query; the
        one read of the model's collection takes the input too; leases are inserted in
        one unordered batch whose duplicate-key errors are the documents others hold.
        A document another process finished between that read and our lease is done
        twice (at-least-once): the write is conditioned on the version, so it is counted
        as a duplicate and never overwrites; it needs a whole batch of theirs to fit
        between two of our round trips."""
        now = _now()
        name = self.spec.name
        leases = list(self.leases.find({"model": name}, {"doc": 1, "expires": 1}))
        expired = [lease["_id"] for lease in leases if _aware(lease["expires"]) <= now]
        taken_over = 0
        if expired:
            # By _id and expiry both: a lease renewed since it was read stays.
            taken_over = self.leases.delete_many(
                {"_id": {"$in": expired}, "expires": {"$lte": now}}
            ).deleted_count
        busy = {lease["doc"] for lease in leases if _aware(lease["expires"]) > now}
        failures = list(self.failures.find({"model": name}, {"doc": 1, "retry_at": 1}))
        busy |= {f["doc"] for f in failures if f.get("retry_at") and _aware(f["retry_at"]) > now}
        query = self.pending_filter()
        if after is not None:
            query = {"$and": [query, {"_id": {"$gt": after}}]}
        scanned = list(
            self.collection.find(query, {self.spec.input_field: 1})
            .sort("_id", 1)
            .limit(limit + len(busy))
        )
        batch = uuid.uuid4().hex
        if not scanned:
            return Claimed(batch, [], taken_over=taken_over)
        candidates = [doc for doc in scanned if doc["_id"] not in busy][:limit]
        scanned_to = candidates[-1]["_id"] if len(candidates) == limit else scanned[-1]["_id"]
        if not candidates:
            return Claimed(batch, [], scanned_to=scanned_to, taken_over=taken_over)
        # From now, not from the start of the claim: its reads may have taken a while.
        expires = _now() + datetime.timedelta(seconds=lease_seconds)
        documents = candidates
        try:
            self.leases.insert_many(
                [
                    {
                        "_id": {"model": name, "doc": doc["_id"]},
                        "model": name,
                        "doc": doc["_id"],
                        "owner": self.owner,
                        "batch": batch,
                        "expires": expires,
                    }
                    for doc in candidates
                ],
                ordered=False,
            )
        except pymongo.errors.BulkWriteError as exc:
            lost = {e["index"] for e in exc.details["writeErrors"]}
            documents = [doc for index, doc in enumerate(candidates) if index not in lost]
        retried = frozenset(f["doc"] for f in failures) & {doc["_id"] for doc in documents}
        return Claimed(batch, documents, retried, scanned_to, taken_over)

    def renew(self, claimed: Claimed, lease_seconds: float) -> None:
        """Extend the batch's leases (those still ours) from now."""
        expires = _now() + datetime.timedelta(seconds=lease_seconds)
        self.leases.update_many({"batch": claimed.batch}, {"$set": {"expires": expires}})

    def release(self, claimed: Claimed) -> None:
        self.leases.delete_many({"batch": claimed.batch})

    # -- results -----------------------------------------------------------------------

    def write_outputs(
        self, claimed: Claimed, results: list[tuple[dict[str, Any], dict[str, Any]]]
    ) -> int:
        """Store (document as read, output value) pairs with one bulk write, each
        conditioned on the input being unchanged since it was read, then release the
        batch. Returns how many were already done by someone else (duplicate work)."""
        out = self.spec.output_field
        duplicates = 0
        modified = 0
        if results:
            updates = [
                pymongo.UpdateOne(
                    {
                        "_id": doc["_id"],
                        self.spec.input_field: get_path(doc, self.spec.input_field),
                        f"{out}.version": {"$ne": self.version},
                    },
                    {"$set": {out: value}},
                )
                for doc, value in results
            ]
            result = self.collection.bulk_write(updates, ordered=False)
            modified = result.modified_count
            if result.matched_count < len(results):
                # Not matched: the input changed (it is pending again), or another
                # process stored this version first: that is duplicate work.
                done_elsewhere = self.collection.count_documents(
                    {
                        "_id": {"$in": [doc["_id"] for doc, _ in results]},
                        f"{out}.version": self.version,
                    }
                )
                duplicates = max(done_elsewhere - result.matched_count, 0)
        done = {doc["_id"] for doc, _ in results} & claimed.retried
        if done:
            self.failures.delete_many({"model": self.spec.name, "doc": {"$in": list(done)}})
        self.release(claimed)
        errors = sum(1 for _, value in results if "error" in value)
        self.stats.update_one(
            {"_id": self.spec.name},
            {"$inc": {"done": modified - errors, "failed": errors, "duplicates": duplicates}},
            upsert=True,
        )
        return duplicates

    def record_failures(
        self, failed: list[tuple[dict[str, Any], str]], backoff: float, max_attempts: int
    ) -> list[tuple[dict[str, Any], str, int]]:
        """Count a failed attempt for each document; returns those that reached the
        limit (document, error, attempts) so they get an error record instead. The
        others wait for their retry time (exponential backoff) before being claimed."""
        exhausted = []
        now = _now()
        for doc, message in failed:
            record = self.failures.find_one_and_update(
                {"_id": {"model": self.spec.name, "doc": doc["_id"]}},
                {
                    "$inc": {"attempts": 1},
                    "$set": {"model": self.spec.name, "doc": doc["_id"], "error": message},
                },
                upsert=True,
                return_document=pymongo.ReturnDocument.AFTER,
            )
            assert record is not None  # upsert with ReturnDocument.AFTER always returns one
            attempts = int(record["attempts"])
            if attempts >= max_attempts:
                exhausted.append((doc, message, attempts))
            else:
                retry_at = now + datetime.timedelta(seconds=backoff * 2 ** (attempts - 1))
                self.failures.update_one({"_id": record["_id"]}, {"$set": {"retry_at": retry_at}})
        return exhausted

    # -- status ------------------------------------------------------------------------

    def count_pending(self) -> int:
        return self.collection.count_documents(self.pending_filter())

    def count_outputs(self, *, failed: bool) -> int:
        """Documents with this version's output: its error records, or its predictions."""
        out = self.spec.output_field
        scope = [self.spec.filter] if self.spec.filter else []
        return self.collection.count_documents(
            {
                "$and": [
                    *scope,
                    {f"{out}.version": self.version},
                    {f"{out}.error": {"$exists": failed}},
                ]
            }
        )

    def status(self) -> dict[str, Any]:
        now = _now()
        pending = self.count_pending()
        done = self.count_outputs(failed=False)
        failed = self.count_outputs(failed=True)
        live = self._in_progress(now)
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
            "retrying": self.failures.count_documents({"model": self.spec.name}),
            "lagSeconds": lag,
            "leaseHolders": sorted({lease["owner"] for lease in live}),
            "duplicates": int(counters.get("duplicates", 0)),
        }

    def _in_progress(self, now: datetime.datetime) -> list[dict[str, Any]]:
        """The live leases whose document still waits for this version's output. A lease
        on a finished document is not work in progress: its batch was written and is
        about to be released, or its holder died after writing (it lingers until it
        expires)."""
        live = list(
            self.leases.find(
                {"model": self.spec.name, "expires": {"$gt": now}}, {"owner": 1, "doc": 1}
            )
        )
        if not live:
            return []
        finished = {
            doc["_id"]
            for doc in self.collection.find(
                {
                    "_id": {"$in": [lease["doc"] for lease in live]},
                    f"{self.spec.output_field}.version": self.version,
                },
                {"_id": 1},
            )
        }
        return [lease for lease in live if lease["doc"] not in finished]

    def mark_changed(self, doc_id: Any) -> None:
        """A document's input changed: its output (if any) is pending again."""
        out = self.spec.output_field
        self.collection.update_one(
            {"_id": doc_id, f"{out}.version": {"$exists": True}},
            stale_update(out),
        )

    def mark_stale(self, extra_filter: dict[str, Any] | None) -> int:
        """backfillModel: recompute outputs that exist (pending ones are already due).

        The output is made stale (engine.outputs), so the document is pending again."""
        out = self.spec.output_field
        clauses: list[dict[str, Any]] = [{f"{out}.version": {"$exists": True}}]
        if self.spec.filter:
            clauses.append(self.spec.filter)
        if extra_filter:
            clauses.append(extra_filter)
        result = self.collection.update_many({"$and": clauses}, stale_update(out))
        return int(result.modified_count)

    def retry_failed(self, extra_filter: dict[str, Any] | None) -> int:
        """retryFailed: the documents whose output is an error record (those matching
        `extra_filter`, when given) are pending again, their output made stale, with
        their failed attempts forgotten: each gets its attempts anew. Returns how many."""
        query = error_records_filter(self.spec, extra_filter)
        ids = [doc["_id"] for doc in self.collection.find(query, {"_id": 1})]
        marked = 0
        for start in range(0, len(ids), _RETRY_CHUNK):
            chunk = ids[start : start + _RETRY_CHUNK]
            # Attempts first: until its output is made stale no worker claims a document,
            # so none is retried against the attempts of its earlier failure.
            self.failures.delete_many({"model": self.spec.name, "doc": {"$in": chunk}})
            result = self.collection.update_many(
                {"$and": [query, {"_id": {"$in": chunk}}]}, stale_update(self.spec.output_field)
            )
            marked += int(result.modified_count)
        return marked
