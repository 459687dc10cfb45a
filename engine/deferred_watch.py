"""Change streams for deferred models: one per namespace among all modelgate processes.

A namespace's change stream wakes its deferred workers on writes that went around this
proxy, and makes an output pending again when its input was changed there. Each event
costs the upstream once per stream that follows it (it decodes the oplog entry and
encodes the event: on SecantusDB about 0.12 ms of CPU per event and stream, as much as
the predictions' own bookkeeping when three processes each watched), so of the processes
serving a namespace only one follows it: the holder of the namespace's watch lease,

  modelgate.deferred_watchers  {_id: namespace, owner, expires, token}

The holder renews it every third of the lease time and stores the stream's resume token
with it. When the holder dies its lease expires and another process takes the watch
over, resuming from the stored token, so that an input changed meanwhile is still seen
(events since the last renewal are seen twice: an output made pending twice is predicted
twice, never lost). A holder that stops (its namespace no longer served, the process
shutting down) releases the watch with its token at once. The other processes find
documents written around them by their sweep (every sweep interval), and writes through
themselves by their own kick, as before.

While the namespace's workers in the holder work off a backlog, its stream pauses, then
resumes after the last event it handled: the workers' claims find new documents anyway,
and events read in one go after a pause cost the upstream a third of what they cost read
one by one while the same writes come in (SecantusDB, 4,000 events: 0.5 to 0.65 CPU-s
followed live, 0.15 to 0.25 read after). An input changed around modelgate during a
backlog is seen when the backlog ends, or at the latest after _PAUSE_AT_MOST seconds.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pymongo
import pymongo.errors
import trio
from pymongo.collection import Collection

from engine.lease_clock import RELEASED, utc_now
from engine.registry import DATABASE

if TYPE_CHECKING:
    from engine.deferred import DeferredSettings
    from engine.leases import WorkQueue

__all__ = ["WATCHERS", "WatchLease", "follow_namespace"]

log = logging.getLogger(__name__)

WATCHERS = "deferred_watchers"

# How long a getMore of the stream waits for events, in milliseconds: also how soon the
# watching thread sees that it was asked to stop.
_AWAIT_MS = 500

# While the workers are busy, the stream pauses for at most this long before it reads
# what came meanwhile; the watching thread asks whether they are busy this often.
_PAUSE_AT_MOST = 10.0
_BUSY_CHECK = 0.2
# Once the stream has caught up after events, it pauses this long (then reads what came
# meanwhile in one go): writes come in bursts, and a stream followed live costs the
# upstream a getMore for every write of the database, the bookkeeping's included.
_SETTLE = 0.5


class WatchLease:
    """Which process follows a namespace's change stream. Synchronous pymongo, called
    from worker threads; every query is by `_id`."""

    def __init__(self, collection: Collection[dict[str, Any]], namespace: str, owner: str) -> None:
        self.collection = collection
        self.namespace = namespace
        self.owner = owner

    @classmethod
    def on(
        cls, client: pymongo.MongoClient[dict[str, Any]], namespace: str, owner: str
    ) -> WatchLease:
        return cls(client[DATABASE][WATCHERS], namespace, owner)

    def acquire(self, seconds: float) -> tuple[bool, Any]:
        """Take the watch for `seconds` if nobody holds it (never held, released, or
        expired: its holder died) or this owner does. Returns whether it is held now,
        and the resume token its last holder stored (None: follow from now)."""
        now = utc_now()
        expires = now + datetime.timedelta(seconds=seconds)
        try:
            self.collection.insert_one(
                {"_id": self.namespace, "owner": self.owner, "expires": expires, "token": None}
            )
            return True, None
        except pymongo.errors.DuplicateKeyError:
            pass
        before = self.collection.find_one_and_update(
            {"_id": self.namespace, "$or": [{"owner": self.owner}, {"expires": {"$lte": now}}]},
            {"$set": {"owner": self.owner, "expires": expires}},
        )
        if before is None:
            return False, None
        return True, before.get("token")

    def renew(self, seconds: float, token: Any) -> bool:
        """Extend the watch from now and store where the stream is; False when another
        process holds it (this one's expired and was taken over)."""
        expires = utc_now() + datetime.timedelta(seconds=seconds)
        result = self.collection.update_one(
            {"_id": self.namespace, "owner": self.owner},
            {"$set": {"expires": expires, "token": token}},
        )
        return bool(result.matched_count)

    def release(self, token: Any) -> None:
        """Give the watch up now (if still held), leaving where the stream was."""
        self.collection.update_one(
            {"_id": self.namespace, "owner": self.owner},
            {"$set": {"expires": RELEASED, "token": token}},
        )


class _Position:
    """Where this process's stream of a namespace is: the resume token of the last
    event it handled (or of the last empty batch), None to start from now."""

    def __init__(self, token: Any = None) -> None:
        self.token = token


async def follow_namespace(
    client: pymongo.MongoClient[dict[str, Any]],
    namespace: str,
    owner: str,
    settings: DeferredSettings,
    on_change: Callable[[dict[str, Any]], tuple[list[WorkQueue], bool]],
    kick: Callable[[], None],
    busy: Callable[[], bool],
) -> None:
    """Follow the namespace's change stream whenever this process holds its watch lease,
    until cancelled. For each event, `on_change(event)` (in the event loop) names the
    work queues whose input it may have changed (their document is made pending again)
    and whether to `kick()` the namespace's workers; while `busy()`, the stream pauses.
    If the upstream has no change streams, the sweep still finds everything."""
    lease = WatchLease.on(client, namespace, owner)
    seconds = settings.lease_seconds
    position = _Position()
    try:
        while True:
            try:
                held, token = await trio.to_thread.run_sync(lease.acquire, seconds)
            except pymongo.errors.PyMongoError as exc:
                log.info("cannot take the watch of %s (%s); sweeping only", namespace, exc)
                await trio.sleep(settings.sweep_interval * 4)
                continue
            if not held:
                # Another process watches: look again once its lease could have expired.
                await trio.sleep(seconds / 3)
                continue
            position.token = token
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keep, lease, position, nursery.cancel_scope, seconds)
                await _follow(client, namespace, settings, position, (on_change, kick, busy))
    finally:
        # Whoever comes next starts where this stream stopped, without waiting for the
        # lease to expire. (A no-op when another process holds the watch.)
        with trio.move_on_after(5) as cleanup:
            cleanup.shield = True
            try:
                await trio.to_thread.run_sync(lease.release, position.token, abandon_on_cancel=True)
            except pymongo.errors.PyMongoError as exc:
                log.info("cannot release the watch of %s: %s", namespace, exc)


async def _keep(
    lease: WatchLease, position: _Position, scope: trio.CancelScope, seconds: float
) -> None:
    """Renew the watch while it is followed; stop following when it was lost."""
    while True:
        await trio.sleep(seconds / 3)
        try:
            held = await trio.to_thread.run_sync(lease.renew, seconds, position.token)
        except pymongo.errors.PyMongoError as exc:
            log.warning("cannot renew the watch of %s: %s", lease.namespace, exc)
            continue
        if not held:
            log.warning("the watch of %s was taken over by another process", lease.namespace)
            scope.cancel()
            return


async def _follow(
    client: pymongo.MongoClient[dict[str, Any]],
    namespace: str,
    settings: DeferredSettings,
    position: _Position,
    calls: tuple[
        Callable[[dict[str, Any]], tuple[list[WorkQueue], bool]],
        Callable[[], None],
        Callable[[], bool],
    ],
) -> None:
    """Follow the stream from `position` until cancelled (through collection drops and
    upstream errors), pausing while the workers are busy."""
    on_change, kick, busy = calls
    db, _, collection = namespace.partition(".")
    stop = threading.Event()
    trio_token = trio.lowlevel.current_trio_token()

    def open_stream() -> Any:
        resume = position.token
        if resume is None:
            return client[db][collection].watch(max_await_time_ms=_AWAIT_MS)
        try:
            return client[db][collection].watch(max_await_time_ms=_AWAIT_MS, resume_after=resume)
        except pymongo.errors.OperationFailure as exc:
            log.warning(
                "change stream on %s cannot resume where it was left (%s); following it "
                "from now: an input changed around modelgate since then is not seen",
                namespace,
                exc,
            )
            position.token = None
            return client[db][collection].watch(max_await_time_ms=_AWAIT_MS)

    def watch() -> bool:
        """Follow the stream; True when it paused (the workers are busy), False when
        it ended (its collection was dropped)."""
        checked = time.monotonic()
        # After a pause, what came meanwhile is read whole before the next pause, so
        # that the stream never falls further behind than one pause.
        caught_up = False
        handled = 0
        with open_stream() as stream:
            # A stream ends when its collection is dropped or renamed (an invalidate
            # event); try_next would then return None at once, for ever.
            while not stop.is_set() and stream.alive:
                change = stream.try_next()
                if change is not None:
                    # An input changed (through the proxy or around it): its output is
                    # stale, so make the document pending again before the kick.
                    queues, wake = trio.from_thread.run_sync(
                        on_change, change, trio_token=trio_token
                    )
                    key = (change.get("documentKey") or {}).get("_id")
                    for queue in queues if key is not None else []:
                        queue.mark_changed(key)
                    if wake:
                        trio.from_thread.run_sync(kick, trio_token=trio_token)
                    handled += 1
                # Only once the event is handled: a takeover resumes after it.
                position.token = stream.resume_token
                caught_up = caught_up or change is None
                if caught_up and handled and change is None:
                    return True  # a burst of writes: read the rest of it in one go
                if caught_up and (change is None or time.monotonic() - checked >= _BUSY_CHECK):
                    checked = time.monotonic()
                    if trio.from_thread.run_sync(busy, trio_token=trio_token):
                        return True
            if not stream.alive:
                position.token = None  # an invalidate's token cannot be resumed after
        return False

    try:
        while True:
            try:
                if await trio.to_thread.run_sync(watch, abandon_on_cancel=True):
                    # Paused: resume once the workers are idle (their claims find the
                    # new documents meanwhile), or read what came at the latest then.
                    await trio.sleep(_SETTLE)
                    with trio.move_on_after(_PAUSE_AT_MOST):
                        while busy():
                            await trio.sleep(_BUSY_CHECK / 2)
                    continue
                # Ended by a drop: watch again (the namespace may be filled anew),
                # after a pause, as a dropped collection's new stream may end at once.
                await trio.sleep(settings.sweep_interval)
            except pymongo.errors.PyMongoError as exc:
                log.info("change stream on %s unavailable (%s); sweeping only", namespace, exc)
                await trio.sleep(settings.sweep_interval * 4)
    finally:
        stop.set()
