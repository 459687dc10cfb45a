"""Deferred work kept in MongoDB, so that no modelgate process holds state a crash
could lose.

The queue itself is the documents: a document in the model's namespace that lacks an
output of the model's current version is pending. Beside them, in database `modelgate`:
  deferred_leases    {_id: {model, claim}, model, claim, owner, expires, docs, hi}: who
                     works on which documents, one lease per claimed batch. A model's
                     claims are numbered and each is made by inserting the number after
                     the newest, so of two claims made at once one fails; the newest
                     one's `hi` is where the next claim scans from. A lease that expires
                     (its holder died) is taken over by another process. A released
                     lease (expires long past, no docs, `released_at`) stays a while, so
                     that its number is not used again by a claim that read before it
  deferred_failures  {_id: {model, doc}, attempts, retry_at, error}: failed attempts
  deferred_stats     {_id: model, done, duplicates, failed}: counters kept by all processes
  deferred_watchers  {_id: namespace, owner, expires, token}: which process follows the
                     namespace's change stream (engine.deferred_watch)

Synchronous pymongo, called from worker threads."""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pymongo
import pymongo.errors
from pymongo.collection import Collection

from engine.documents import FAITHFUL, MISSING, array_on_path, get_path
from engine.error_records import error_records_filter
from engine.lease_clock import RELEASED, utc_now
from engine.outputs import stale_update
from engine.pending import find_pending, maybe_pending, pending_filter
from engine.registry import DATABASE
from engine.spec import ModelSpec

__all__ = ["Claimed", "WorkQueue"]

log = logging.getLogger(__name__)

# Claims in a row that come second to another process's, before this one gives up
# until the next wake-up (a claim that comes second goes on without a new scan).
_CLAIM_ATTEMPTS = 8

# A claim whose lease is not inserted within this many seconds of its read of the
# leases reads them again; released leases are deleted once every _CLEANUP_EVERY claims,
# those released more than _RELEASED_KEPT seconds ago. See WorkQueue.claim for why; the
# margin between the two is for clocks that disagree.
_CLAIM_GIVES_UP = 30.0
_RELEASED_KEPT = 120.0
_CLEANUP_EVERY = 16

# Documents retried per round trip: bounds the $in lists (upstreams that scan answer
# long ones slowly) while many failed documents still take few round trips.
_RETRY_CHUNK = 1000


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
    # Documents of expired leases this claim took over: their holder died, or stopped
    # renewing in time.
    taken_over: int = 0
    # The batch's lease (its _id in deferred_leases); None when nothing was claimed.
    lease: Any = None
    # Whether other processes held live claims of the model when this one was made.
    shared: bool = False


@dataclass
class _LeaseState:
    """A model's leases and retry waits, as one claim read them."""

    read_at: float  # time.monotonic() of the read
    newest: int = 0  # the newest claim's number (0: none yet)
    cursor: Any = None  # where the newest claim ended
    busy: set[Any] = field(default_factory=set)  # documents held, or waiting for a retry
    owners: set[str] = field(default_factory=set)  # of the live claims
    failed: set[Any] = field(default_factory=set)  # documents with failed attempts
    claims: dict[int, list[Any]] = field(default_factory=dict)  # unreleased: number -> docs
    taken_over: int = 0  # documents of the expired leases this read took over


@dataclass(frozen=True)
class _Scan:
    """Pending documents one scan found free, under the newest claim it knew of."""

    candidates: list[dict[str, Any]]
    scanned_to: Any  # None: nothing pending at all
    newest: int
    wrapped: bool  # read from the beginning of the collection

    def without_claims_since(self, state: _LeaseState) -> _Scan | None:
        """The candidates that the claims made since this scan (as read in `state`)
        left free; None when one of those claims is released already (its documents
        are no longer known) or when nothing is left."""
        taken: set[Any] = set(state.busy)
        for number in range(self.newest + 1, state.newest + 1):
            if number not in state.claims:
                return None
            taken.update(state.claims[number])
        candidates = [doc for doc in self.candidates if doc["_id"] not in taken]
        if not candidates:
            return None
        return _Scan(candidates, self.scanned_to, state.newest, self.wrapped)


def _later(first: Any, second: Any) -> Any:
    """The later of two _ids (`first` when they do not compare, or `second` is None)."""
    try:
        return second if second is not None and second > first else first
    except TypeError:
        return first


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
        """Documents that need this version's prediction (engine.pending)."""
        return pending_filter(self.spec, self.version)

    def ensure_index(self) -> None:
        # Claims ask for documents by their output's version, in _id order (engine.pending);
        # the index serves lookups by the version alone too.
        self.collection.create_index([(f"{self.spec.output_field}.version", 1), ("_id", 1)])
        self.leases.create_index([("model", 1), ("expires", 1)])
        self.leases.create_index([("model", 1), ("claim", -1)])
        self.failures.create_index("model")

    def claim(
        self, limit: int, lease_seconds: float, after: Any = None, *, idle: bool = False
    ) -> Claimed:
        """Lease up to `limit` pending documents that nobody else holds, in `_id` order:
        past `after` when given, else from where the model's newest claim (of any
        process) ended, starting over from the beginning of the collection when nothing
        is pending past it or when expired leases were just taken over.

        Written for few round trips, since each costs (SecantusDB, which plans a
        filter of several clauses as a collection scan, answers any query on the model's
        collection in time that grows with the collection): the model's leases (one per
        batch in flight) and retry waits are read whole and skipped here rather than in
        the query; the one read of the model's collection takes the input too; the lease
        is one insert, of the claim number after the newest one read. Its duplicate-key
        error says that other claims were made since that read: their documents are
        left to them and the rest is claimed without scanning again (when a claim made
        meanwhile was released already, the scan is made again). So two live processes
        do not work on the same document: one that another process finished between our
        scan and our lease was claimed by a claim made meanwhile.

        That holds because a number, once used, is not free again while a claim that
        read before it was used can still insert it: a claim gives its insert up 30 s
        after its read (and reads again), and released leases are deleted only two
        minutes after their release."""
        name = self.spec.name
        if idle and not self._maybe_pending():
            return Claimed(uuid.uuid4().hex, [])  # (the last claim found nothing either)
        taken_over = 0
        scan: _Scan | None = None
        for _ in range(_CLAIM_ATTEMPTS):
            state = self._read_leases()
            taken_over += state.taken_over
            if scan is not None:
                scan = scan.without_claims_since(state)
            if scan is None:
                scan = self._scan(state, limit, after)
            if not scan.candidates:
                return Claimed(
                    uuid.uuid4().hex, [], scanned_to=scan.scanned_to, taken_over=taken_over
                )
            if time.monotonic() - state.read_at > _CLAIM_GIVES_UP:
                scan = None  # too long since the read (see above): read and scan again
                continue
            taking = scan.candidates[:limit]
            # Where the next claim starts: after this one's documents when the scan found
            # more, after the whole scan when not (after a wrap, back where this ended).
            end = taking[-1]["_id"] if len(scan.candidates) > limit else scan.scanned_to
            number = state.newest + 1
            lease_id = {"model": name, "claim": number}
            batch = uuid.uuid4().hex
            # From now, not from the start of the claim: its reads may have taken a while.
            now = utc_now()
            lease = {
                "_id": lease_id,
                "model": name,
                "claim": number,
                "owner": self.owner,
                "batch": batch,
                "expires": now + datetime.timedelta(seconds=lease_seconds),
                "docs": [doc["_id"] for doc in taking],
                "hi": end if scan.wrapped else _later(end, state.cursor),
            }
            try:
                self.leases.insert_many([lease])
            except pymongo.errors.BulkWriteError as exc:
                if any(error.get("code") != 11000 for error in exc.details["writeErrors"]):
                    raise
                continue  # another claim came first: see what it took
            if number % _CLEANUP_EVERY == 0:
                self.leases.delete_many(
                    {
                        "model": name,
                        "released_at": {"$lte": now - datetime.timedelta(seconds=_RELEASED_KEPT)},
                    }
                )
            retried = frozenset(state.failed & {doc["_id"] for doc in taking})
            shared = bool(state.owners - {self.owner})
            return Claimed(batch, taking, retried, end, taken_over, lease_id, shared)
        log.info("deferred model '%s': %d claims in a row came second", name, _CLAIM_ATTEMPTS)
        scanned_to = scan.scanned_to if scan is not None else after
        return Claimed(uuid.uuid4().hex, [], scanned_to=scanned_to, taken_over=taken_over)

    def _maybe_pending(self) -> bool:
        return maybe_pending(self.collection, self.spec, self.version)

    def _read_leases(self) -> _LeaseState:
        """The model's leases and retry waits as they are now, expired leases taken over."""
        state = _LeaseState(read_at=time.monotonic())
        now = utc_now()
        name = self.spec.name
        newest = self.leases.find_one(
            {"model": name, "claim": {"$gt": 0}}, {"claim": 1, "hi": 1}, sort=[("claim", -1)]
        )
        if newest is not None:
            state.newest, state.cursor = int(newest["claim"]), newest.get("hi")
        legacy_expired = []
        # Unreleased leases: live, or expired and not yet taken over.
        for lease in self.leases.find({"model": name, "expires": {"$gt": RELEASED}}):
            if "claim" not in lease:
                # A lease of one document, as modelgate wrote them before leases by batch.
                if _aware(lease["expires"]) > now:
                    state.busy.add(lease["doc"])
                else:
                    legacy_expired.append(lease["_id"])
                continue
            number = int(lease["claim"])
            state.claims[number] = list(lease["docs"])
            if number > state.newest:  # inserted between the two reads
                state.newest, state.cursor = number, lease.get("hi")
            if _aware(lease["expires"]) > now:
                state.busy.update(lease["docs"])
                state.owners.add(lease["owner"])
            elif self._release(lease["_id"], expired_by=now):
                state.taken_over += len(lease["docs"])
                del state.claims[number]
            else:
                state.busy.update(lease["docs"])  # renewed since it was read: still held
        if legacy_expired:
            # By _id and expiry both: a lease renewed since it was read stays.
            state.taken_over += self.leases.delete_many(
                {"_id": {"$in": legacy_expired}, "expires": {"$lte": now}}
            ).deleted_count
        for failure in self.failures.find({"model": name}, {"doc": 1, "retry_at": 1}):
            state.failed.add(failure["doc"])
            if failure.get("retry_at") and _aware(failure["retry_at"]) > now:
                state.busy.add(failure["doc"])
        return state

    def _scan(self, state: _LeaseState, limit: int, after: Any) -> _Scan:
        """Read the next pending documents that `state` leaves free (with their input):
        up to twice `limit`, so that a claim that comes second to another made from the
        same read takes the next batch instead of scanning again (on SecantusDB a read
        fetches every pending document past its start however many it returns; 512 cost
        a fifth more than 256 at 2,000 documents). engine.pending says how it reads."""
        want = 2 * limit
        start = after
        if after is None and not state.taken_over:
            start = state.cursor  # else from the beginning: the expired leases' documents
        while True:
            # Enough to fill the batch even when the documents others hold come first.
            scanned = find_pending(
                self.collection, self.spec, self.version, start, want + len(state.busy)
            )
            candidates = [doc for doc in scanned if doc["_id"] not in state.busy][:want]
            if candidates or after is not None or start is None:
                break
            # Past the newest claim, others hold all that is pending (the next claim
            # after they finish starts over), or nothing is pending before it either.
            if scanned or not self._maybe_pending():
                break
            start = None  # nothing free past the newest claim: from the beginning again
        if not scanned:
            return _Scan([], None, state.newest, wrapped=start is None)
        last = candidates[-1] if len(candidates) == want else scanned[-1]
        return _Scan(candidates, last["_id"], state.newest, wrapped=start is None)

    def renew(self, claimed: Claimed, lease_seconds: float) -> None:
        """Extend the batch's lease (if it is still ours: not taken over) from now."""
        if claimed.lease is None:
            return
        expires = utc_now() + datetime.timedelta(seconds=lease_seconds)
        self.leases.update_one(
            {"_id": claimed.lease, "owner": self.owner, "expires": {"$gt": RELEASED}},
            {"$set": {"expires": expires}},
        )

    def release(self, claimed: Claimed) -> None:
        if claimed.lease is not None:
            self._release(claimed.lease)

    def _release(self, lease_id: Any, expired_by: datetime.datetime | None = None) -> bool:
        """Release a lease unless released already (or, with `expired_by`, unless it
        was renewed to a later time): its documents are free. Whether this released it."""
        expires: dict[str, Any] = {"$gt": RELEASED}
        if expired_by is not None:
            expires["$lte"] = expired_by
        result = self.leases.update_one(
            {"_id": lease_id, "expires": expires},
            {"$set": {"expires": RELEASED, "docs": [], "released_at": utc_now()}},
        )
        return bool(result.modified_count)

    # -- results -----------------------------------------------------------------------

    def write_outputs(
        self, claimed: Claimed, results: list[tuple[dict[str, Any], dict[str, Any]]]
    ) -> int:
        """Store (document as read, output value) pairs with one bulk write, each
        conditioned on the input being unchanged since it was read, then release the
        batch. Returns how many were already done by someone else (duplicate work)."""
        out = self.spec.output_field
        duplicates = 0
        # Predictions and error records in two writes (the second only when there are
        # errors), so that each counter takes only what was stored.
        stored = {False: 0, True: 0}
        matched = 0
        for is_error in (False, True):
            pairs = [(doc, value) for doc, value in results if ("error" in value) == is_error]
            if not pairs:
                continue
            updates = [
                pymongo.UpdateOne(
                    {
                        "_id": doc["_id"],
                        **self._input_as_read(doc),
                        f"{out}.version": {"$ne": self.version},
                    },
                    {"$set": {out: value}},
                )
                for doc, value in pairs
            ]
            result = self.collection.bulk_write(updates, ordered=False)
            stored[is_error] = result.modified_count
            matched += result.matched_count
        if matched < len(results):
            # Not matched: the input changed (it is pending again), or another process
            # stored this version first: that is duplicate work.
            done_elsewhere = self.collection.count_documents(
                {
                    "_id": {"$in": [doc["_id"] for doc, _ in results]},
                    f"{out}.version": self.version,
                }
            )
            duplicates = max(done_elsewhere - matched, 0)
        done = {doc["_id"] for doc, _ in results} & claimed.retried
        if done:
            self.failures.delete_many({"model": self.spec.name, "doc": {"$in": list(done)}})
        self.release(claimed)
        self.stats.update_one(
            {"_id": self.spec.name},
            {"$inc": {"done": stored[False], "failed": stored[True], "duplicates": duplicates}},
            upsert=True,
        )
        return duplicates

    def _input_as_read(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The condition that the document's input is still as `doc` (as claimed) has it."""
        field = self.spec.input_field
        through = array_on_path(doc, field)
        if through is not None:
            # One value per element, which the error record is about: still so while
            # that array is there (whatever its elements).
            return {through: {"$type": "array"}}
        value = get_path(doc, field)
        if value is MISSING:  # not claimed so (the pending filter wants the input)
            return {field: {"$exists": False}}
        return {field: value}

    def record_failures(
        self, failed: list[tuple[dict[str, Any], str]], backoff: float, max_attempts: int
    ) -> list[tuple[dict[str, Any], str, int]]:
        """Count a failed attempt for each document; returns those that reached the
        limit (document, error, attempts) so they get an error record instead. The
        others wait for their retry time (exponential backoff) before being claimed."""
        exhausted = []
        now = utc_now()
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
        now = utc_now()
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
        """The documents of live leases ({owner, doc}) that still wait for this version's
        output. A leased document that is finished is not work in progress: its batch
        was written and is about to be released, or its holder died after writing (the
        lease lingers until it expires)."""
        live = [
            {"owner": lease["owner"], "doc": doc}
            for lease in self.leases.find(
                {"model": self.spec.name, "expires": {"$gt": now}},
                {"owner": 1, "doc": 1, "docs": 1},
            )
            for doc in (lease["docs"] if "docs" in lease else [lease["doc"]])
        ]
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
