"""Several modelgate processes in one connection string, as drivers use several mongos.

pymongo spreads operations over the processes it is given, and when one dies it retries
what was in flight there (retryable writes and reads) on another, with the same lsid and
txnNumber, which modelgate forwards unchanged so that the upstream recognises the retry.

The upstream is a SecantusDB of the module's own, with fail points. Writes that may be
retried here are idempotent ($set) or checked after the fact: SecantusDB does not make a
retry wait for its first attempt still running on another connection (mongod does), so a
retried insert that meets its own first attempt mid-way there fails with a duplicate key
error (README, "Scaling out"); that is the upstream's, not what these tests are about."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.server_description import ServerDescription

from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream, free_port

Client = pymongo.MongoClient  # type: ignore[type-arg]
THREADS = 8
# The application name that the fail points of the in-flight test match.
IN_FLIGHT_APP = "two-processes-in-flight"


class Monitored(ProxyProcess):
    """A modelgate process with its /metrics listener on a port of its own."""

    def __init__(self, upstream_uri: str, folder: Path) -> None:
        self.metrics_port = free_port()
        folder.mkdir()
        flags = ("--data-dir", str(folder), "--metrics-listen", f"127.0.0.1:{self.metrics_port}")
        super().__init__(upstream_uri, folder / "modelgate.log", args=flags)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def requests(self, command: str) -> float:
        """modelgate_requests_total for `command`, scraped now."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "modelgate_requests_total" and sample.labels["command"] == command
        )


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def seed_list(*processes: Monitored, **options: Any) -> Client:
    hosts = ",".join(f"{host}:{port}" for host, port in (p.address for p in processes))
    # Both processes are on this machine: a wide latency window keeps both eligible even
    # when one answers its monitor's hello late on a busy machine.
    return pymongo.MongoClient(f"mongodb://{hosts}/", localThresholdMS=10_000, **options)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedUpstream]:
    folder = tmp_path_factory.mktemp("two-processes")
    with EmbeddedUpstream(
        ":memory:", extra_args=("--enable-test-commands",), log_path=folder / "secantus.log"
    ) as started:
        yield started


@pytest.fixture(scope="module")
def direct(upstream: EmbeddedUpstream) -> Iterator[Client]:
    with pymongo.MongoClient(upstream.uri) as client:
        yield client


@pytest.fixture
def pair(upstream: EmbeddedUpstream, tmp_path: Path) -> Iterator[tuple[Monitored, Monitored]]:
    with Monitored(upstream.uri, tmp_path / "a") as a, Monitored(upstream.uri, tmp_path / "b") as b:
        yield a, b


def test_a_driver_spreads_operations_over_both_processes(
    pair: tuple[Monitored, Monitored], direct: Client
) -> None:
    a, b = pair
    direct.spread.c.drop()
    with seed_list(a, b) as client:
        collection = client.spread.c

        def work(thread: int) -> None:
            for n in range(25):
                collection.insert_one({"_id": f"{thread}-{n}"})
                assert collection.find_one({"_id": f"{thread}-{n}"}) is not None

        run_threads(work, range(THREADS))
    for process in pair:
        assert process.requests("insert") > 0, process.log_tail()
        assert process.requests("find") > 0, process.log_tail()
    assert a.requests("insert") + b.requests("insert") == THREADS * 25
    assert direct.spread.c.count_documents({}) == THREADS * 25


def test_killing_one_process_mid_run_loses_no_acknowledged_write_and_fails_no_operation(
    pair: tuple[Monitored, Monitored], direct: Client
) -> None:
    a, b = pair
    direct.killed.c.drop()
    direct.killed.c.insert_many([{"_id": thread} for thread in range(THREADS)])
    acknowledged: dict[int, list[int]] = {thread: [] for thread in range(THREADS)}
    failures: list[BaseException] = []
    killed = threading.Event()
    after_kill = [0] * THREADS
    with seed_list(a, b) as client:
        collection = client.killed.c

        def work(thread: int) -> None:
            n = 0
            while after_kill[thread] < 30:
                n += 1
                try:
                    collection.update_one({"_id": thread}, {"$set": {f"w{n}": n}})
                    acknowledged[thread].append(n)
                    # Read back through whichever process the driver picks: the write is
                    # there, whichever process took it.
                    document = collection.find_one({"_id": thread})
                    assert document is not None and document[f"w{n}"] == n
                except Exception as exc:  # a driver error or a failed read-back
                    failures.append(exc)
                    return
                if killed.is_set():
                    after_kill[thread] += 1

        workers = start_threads(work, range(THREADS))
        # Mid-run: once both processes have taken writes.
        wait_until(lambda: min(a.requests("update"), b.requests("update")) >= 20, "traffic")
        a.kill()
        killed.set()
        for worker in workers:
            worker.join()
    assert failures == []
    assert min(after_kill) == 30
    for thread, numbers in acknowledged.items():
        stored = direct.killed.c.find_one({"_id": thread})
        assert stored is not None
        assert [n for n in numbers if stored.get(f"w{n}") != n] == []


def test_operations_in_flight_on_a_killed_process_are_retried_on_the_other(
    pair: tuple[Monitored, Monitored], direct: Client
) -> None:
    a, b = pair
    direct.in_flight.c.drop()
    direct.in_flight.c.insert_one({"_id": 1, "n": 0})
    # The first update and the first find of this client wait upstream, so that both are
    # in flight through `a` when it is killed; their retries are not held.
    data = {
        "failCommands": ["update", "find"],
        "appName": IN_FLIGHT_APP,
        "blockConnection": True,
        "blockTimeMS": 3000,
    }
    direct.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 2}, "data": data})

    def prefer_a(servers: Sequence[ServerDescription]) -> list[ServerDescription]:
        return [server for server in servers if server.address == a.address] or list(servers)

    results: dict[str, Any] = {}
    try:
        with seed_list(a, b, appname=IN_FLIGHT_APP, server_selector=prefer_a) as client:
            collection = client.in_flight.c
            client.admin.command("ping")
            held = upstream_connections(direct, "update")
            operations = {
                "update": lambda: collection.update_one({"_id": 1}, {"$inc": {"n": 1}}),
                "find": lambda: collection.find_one({"_id": 1}),
            }
            workers = start_threads(lambda name: results.update({name: operations[name]()}),
                                    operations)  # fmt: skip
            wait_until(lambda: a.requests("update") == 1 and a.requests("find") == 1, "sent")
            # Which upstream connection holds the first update: it closes once that
            # attempt, released after the retry, has run there.
            wait_until(lambda: upstream_connections(direct, "update") - held, "update upstream")
            first_attempt = upstream_connections(direct, "update") - held
            a.kill()
            for worker in workers:
                worker.join()
    finally:
        direct.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert results["update"].modified_count == 1
    assert results["find"] is not None
    assert b.requests("update") == 1 and b.requests("find") == 1
    # The killed process's attempt ran after its retry, and the upstream knew it for one.
    wait_until(lambda: not first_attempt & upstream_connections(direct, "update"), "first run")
    assert direct.in_flight.c.find_one({"_id": 1}) == {"_id": 1, "n": 1}


def upstream_connections(direct: Client, last_command: str) -> set[int]:
    """The upstream's connections from IN_FLIGHT_APP whose last command is `last_command`
    (SecantusDB's currentOp lists each connection with its last command)."""
    return {
        int(op["connectionId"])
        for op in direct.admin.command("currentOp")["inprog"]
        if op.get("op") == last_command
        and op.get("clientMetadata", {}).get("application", {}).get("name") == IN_FLIGHT_APP
    }


def start_threads(target: Callable[[Any], None], arguments: Any) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    return threads


def run_threads(target: Callable[[Any], None], arguments: Any) -> None:
    """Run `target` once per argument on threads of its own; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(argument: Any) -> None:
        try:
            target(argument)
        except BaseException as exc:
            errors.append(exc)

    for thread in start_threads(guarded, arguments):
        thread.join()
    if errors:
        raise errors[0]
