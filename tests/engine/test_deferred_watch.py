"""One change stream per namespace among all modelgate processes (engine/deferred_watch.py),
against a real SecantusDB: two followers stand for two processes. Leases that expire are
made with a negative lease time, so no test waits for a clock."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
import trio

from engine.deferred import DeferredSettings
from engine.deferred_watch import WATCHERS, WatchLease, follow_namespace
from engine.registry import DATABASE
from proxy.embedded import EmbeddedUpstream

NAMESPACE = "db.items"
# Lease long enough that a follower holding it never loses it during a test, however
# slow the machine; a follower that does not hold it looks again only after 10 s.
SETTINGS = DeferredSettings(lease_seconds=30.0, sweep_interval=0.2)


@pytest.fixture
def client(own_upstream: EmbeddedUpstream) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    with pymongo.MongoClient(own_upstream.uri) as created:  # type: ignore[var-annotated]
        created.db.items.insert_one({"_id": "first"})  # the collection exists
        yield created


def watch_record(client: pymongo.MongoClient[dict[str, Any]]) -> dict[str, Any]:
    return client[DATABASE][WATCHERS].find_one({"_id": NAMESPACE}) or {}


class Follower:
    """A process's follower of NAMESPACE: the documents of the events it handled."""

    def __init__(self, client: pymongo.MongoClient[dict[str, Any]], owner: str) -> None:
        self.client = client
        self.owner = owner
        self.seen: list[Any] = []
        self.kicks = 0
        self.busy = False
        self.scope = trio.CancelScope()

    def on_change(self, change: dict[str, Any]) -> tuple[list[Any], bool]:
        self.seen.append(change["documentKey"]["_id"])
        return [], True

    def kick(self) -> None:
        self.kicks += 1

    async def run(self) -> None:
        with self.scope:
            await follow_namespace(
                self.client,
                NAMESPACE,
                self.owner,
                SETTINGS,
                self.on_change,
                self.kick,
                lambda: self.busy,
            )


async def until(
    check: Callable[[], Any], what: str, *, act: Callable[[], Any] = lambda: None
) -> None:
    """Wait for `check()` (calling `act()` before each look), for at most 60 s."""
    with trio.move_on_after(60):
        while True:
            act()
            if check():
                return
            await trio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def inserter(client: pymongo.MongoClient[dict[str, Any]], prefix: str) -> Callable[[], None]:
    """Inserts a new document each call (until a follower's stream is open, the first
    writes may come before it)."""
    count = iter(range(10_000))

    def insert() -> None:
        client.db.items.insert_one({"_id": f"{prefix}{next(count)}"})

    return insert


async def test_of_two_processes_one_follows_the_stream(
    client: pymongo.MongoClient[dict[str, Any]],
) -> None:
    a, b = Follower(client, "a"), Follower(client, "b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        await until(lambda: a.seen or b.seen, "a follower's stream", act=inserter(client, "w"))
        holder, other = (a, b) if a.seen else (b, a)
        assert watch_record(client)["owner"] == holder.owner
        client.db.items.insert_many([{"_id": f"n{i}"} for i in range(20)])
        await until(lambda: {f"n{i}" for i in range(20)} <= set(holder.seen), "20 events")
        assert holder.kicks >= 20
        # The other process follows nothing: every event cost the upstream once.
        assert other.seen == [] and other.kicks == 0
        nursery.cancel_scope.cancel()
    # The holder released the watch when it stopped, where its stream was.
    record = watch_record(client)
    assert record["owner"] == holder.owner
    assert record["expires"] < datetime.datetime(1971, 1, 1)
    assert record["token"] is not None


async def test_a_takeover_resumes_where_the_last_watcher_stopped(
    client: pymongo.MongoClient[dict[str, Any]],
) -> None:
    first = Follower(client, "first")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.run)
        await until(lambda: first.seen, "the first follower's stream", act=inserter(client, "w"))
        first.scope.cancel()
    # Written while nobody follows the namespace: an input changed around modelgate.
    client.db.items.insert_one({"_id": "unwatched"})
    client.db.items.update_one({"_id": "first"}, {"$set": {"x": 1}})
    second = Follower(client, "second")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.run)
        await until(lambda: "first" in second.seen, "the events written in between")
        nursery.cancel_scope.cancel()
    # Both, in order (after any event the first follower had not handled yet).
    assert second.seen.index("unwatched") < second.seen.index("first")
    assert set(second.seen) - {"unwatched", "first"} <= {f"w{i}" for i in range(10_000)}


def test_a_watch_lease_is_held_by_one_owner_until_it_expires_or_is_released(
    client: pymongo.MongoClient[dict[str, Any]],
) -> None:
    a, b, c = (WatchLease.on(client, NAMESPACE, owner) for owner in "abc")
    assert a.acquire(30) == (True, None)
    assert b.acquire(30) == (False, None)
    assert a.acquire(30) == (True, None)  # its own: held still
    assert a.renew(30, {"_data": "t1"})
    assert b.acquire(30) == (False, None)
    # a dies: its lease expires with the token of its last renewal.
    assert a.renew(-1, {"_data": "t2"})
    assert b.acquire(30) == (True, {"_data": "t2"})
    assert not a.renew(30, {"_data": "t3"})  # taken over: a stops following
    assert c.acquire(30) == (False, None)
    b.release({"_data": "t4"})
    a.release({"_data": "t5"})  # not its own any more: changes nothing
    assert c.acquire(30) == (True, {"_data": "t4"})
    assert watch_record(client)["owner"] == "c"


async def test_events_written_while_the_workers_are_busy_are_all_seen_after(
    client: pymongo.MongoClient[dict[str, Any]],
) -> None:
    """While the namespace's workers work off a backlog the stream pauses (their claims
    find new documents anyway), then resumes after the last event it handled."""
    follower = Follower(client, "a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.run)
        await until(lambda: follower.seen, "the stream", act=inserter(client, "w"))
        follower.busy = True
        for i in range(30):
            client.db.items.insert_one({"_id": f"p{i}"})
            await trio.sleep(0.02)  # written over a while, as a backlog comes in
        follower.busy = False
        written = [f"p{i}" for i in range(30)]
        await until(lambda: set(written) <= set(follower.seen), "the events of the pause")
        nursery.cancel_scope.cancel()
    seen = [key for key in follower.seen if key in set(written)]
    assert seen == written  # each once, in order
