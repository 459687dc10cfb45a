"""Chaos with nothing lost: eight client threads write through two modelgate processes
(one connection string, retryable writes) to a collection with an inline model and one
with a deferred model, while the upstream (its data on disk) is restarted three times
and one modelgate process is killed with SIGKILL and started again on the same port.

Afterwards every acknowledged document is there once with a current prediction, the
clients saw only errors the driver calls retryable (each thread sends such a write
again, as an application does), and nothing is stuck: no live lease outlives its
expiry, the deferred counters add up, no model is paused.

The writes are idempotent upserts by `_id`, so that "exactly once" is what is checked:
SecantusDB does not make a retry wait for its first attempt still running on another
connection (README, "Scaling out"), so a retried *insert* racing its first attempt on
the killed process's connection can fail with a duplicate key error although the
document was stored once. An upsert retried that way stores the same document."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pymongo
import pytest

from bench.support import onnx_models
from bench.support.processes import ProxyProcess
from bench.support.writers import RetryingWriters
from proxy.embedded import EmbeddedUpstream
from tests.e2e.test_deferred import wait_for

pytestmark = pytest.mark.slow

Client = pymongo.MongoClient[dict[str, Any]]
THREADS = 8
INLINE = "chaos_inline"
DEFERRED = "chaos_deferred"
LABELS = ["a", "b", "c"]
LEASE_SECONDS = 3
# Quick sweeps, leases and registry refreshes, so that recovery happens within the test.
FAST = (
    "--sweep-interval", "0.5", "--lease-seconds", str(LEASE_SECONDS),
    "--registry-refresh", "0.5", "--retry-backoff", "0.2", "--connect-timeout", "2",
    "--grace-period", "2",
)  # fmt: skip
# Acknowledged writes between two blows: each one lands on a system under load, and
# the system shows it has recovered from the last before the next.
PROGRESS = 150
# Generous: these catch hangs, they do not measure speed.
DEADLINE = 90.0


def x_of(n: int) -> list[float]:
    return [1.0 if k == n % 4 else 0.0 for k in range(4)]


def expected_label(x: list[float]) -> str:
    return LABELS[int(np.argmax(onnx_models.linear_logits(np.array([x]))[0]))]


@dataclass
class Cluster:
    upstream: EmbeddedUpstream
    proxies: tuple[ProxyProcess, ProxyProcess]
    direct: Client

    @property
    def seed_list(self) -> str:
        hosts = ",".join(f"127.0.0.1:{proxy.port}" for proxy in self.proxies)
        return f"mongodb://{hosts}/?retryWrites=true"

    def restart_upstream(self) -> None:
        self.upstream.stop()
        self.upstream.start()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    upstream = EmbeddedUpstream(tmp_path / "data", log_path=tmp_path / "secantus.log")
    with upstream, pymongo.MongoClient(upstream.uri) as direct:
        proxies = tuple(
            ProxyProcess(
                upstream.uri,
                tmp_path / f"modelgate-{name}.log",
                args=(*FAST, "--data-dir", str(tmp_path / name)),
            )
            for name in "ab"
        )
        with proxies[0], proxies[1]:
            yield Cluster(upstream, (proxies[0], proxies[1]), direct)


def register(client: Client, name: str, collection: str, mode: str) -> None:
    client.admin.command(
        {
            "registerModel": name,
            "collection": f"chaos.{collection}",
            "input": "x",
            "mode": mode,
            "onnx": bson.Binary(onnx_models.linear_classifier()),
            "postprocess": {"kind": "classify", "labels": LABELS},
        }
    )


def test_restarts_and_a_killed_process_lose_nothing(cluster: Cluster) -> None:
    killed = cluster.proxies[0]
    # A wide latency window keeps both processes eligible on a busy machine.
    with pymongo.MongoClient(cluster.seed_list, localThresholdMS=10_000) as client:
        register(client, INLINE, "inline", "inline")
        register(client, DEFERRED, "deferred", "deferred")
        # A model registered through one process reaches the other at its next registry
        # refresh; writes through it before then would go unpredicted, by design.
        wait_for(
            lambda: all(map(serves_both, cluster.proxies)),
            timeout=DEADLINE,
            interval=0.2,
            what="both models on both",
        )
        writers = RetryingWriters(
            [client.chaos.inline, client.chaos.deferred], lambda n: {"x": x_of(n)}, THREADS
        ).start()
        blows = [
            ("upstream restarted", cluster.restart_upstream),
            ("modelgate killed", killed.kill),
            ("upstream restarted", cluster.restart_upstream),
            ("modelgate started again", killed.start),
            ("upstream restarted", cluster.restart_upstream),
        ]
        try:
            for what, blow in [("writes started", lambda: None), *blows]:
                blow()
                wait_for_writes(writers, PROGRESS, what)
        finally:
            stuck = writers.stop()
        assert stuck == [], f"writes that never got through: {stuck}"
        assert writers.unexpected == [], writers.unexpected
        inline = writers.acknowledged["inline"]
        deferred = writers.acknowledged["deferred"]
        print(f"\nacknowledged: {len(inline)} inline, {len(deferred)} deferred;", end=" ")
        print(f"retried: {dict(writers.retried)}; blows: {[what for what, _ in blows]}")

        check_predictions(cluster.direct.chaos.inline, INLINE, inline)
        wait_for(
            lambda: caught_up(client, len(deferred)),
            timeout=DEADLINE,
            interval=0.2,
            what="the deferred model caught up",
        )
        check_predictions(cluster.direct.chaos.deferred, DEFERRED, deferred)
        check_nothing_stuck(client, cluster.direct, len(deferred))


def wait_for_writes(writers: RetryingWriters, more: int, after: str) -> None:
    target = writers.count() + more
    wait_for(
        lambda: writers.count() >= target,
        timeout=DEADLINE,
        interval=0.2,
        what=f"{more} writes after: {after}",
    )


def serves_both(proxy: ProxyProcess) -> bool:
    with pymongo.MongoClient(proxy.uri) as client:
        listed = {model["name"] for model in client.admin.command("listModels")["models"]}
    return listed >= {INLINE, DEFERRED}


def check_predictions(collection: Any, model: str, acknowledged: set[str]) -> None:
    """Each acknowledged document once, with its model's current prediction, and none
    that was not acknowledged (every thread saw each of its writes through)."""
    stored = list(collection.find({}, {"x": 1, "_outputs": 1}))
    ids = [doc["_id"] for doc in stored]
    assert len(ids) == len(set(ids)) == len(acknowledged)
    assert set(ids) == acknowledged
    wrong = [
        doc
        for doc in stored
        if doc.get("_outputs", {}).get(model, {}).get("label") != expected_label(doc["x"])
        or doc["_outputs"][model].get("version") != 1
    ]
    missing = sorted(doc["_id"] for doc in wrong)
    assert missing == [], f"{len(missing)} without their current prediction: {missing}"


def caught_up(client: Client, total: int) -> bool:
    status = client.admin.command({"modelStatus": DEFERRED})["deferred"]
    return bool(status["pending"] == 0 and status["done"] == total)


def check_nothing_stuck(client: Client, direct: Client, total: int) -> None:
    # Leases of the killed process linger until they expire; then none is live.
    leases = direct.modelgate.deferred_leases

    def live_leases() -> int:
        now = datetime.datetime.now(datetime.UTC)
        return int(leases.count_documents({"expires": {"$gt": now}}))

    wait_for(lambda: live_leases() == 0, timeout=DEADLINE, interval=0.2, what="no live lease")
    status = client.admin.command({"modelStatus": DEFERRED})
    deferred = status["deferred"]
    assert deferred["pending"] + deferred["done"] + deferred["failed"] == total
    assert (deferred["pending"], deferred["inProgress"], deferred["failed"]) == (0, 0, 0)
    assert deferred["retrying"] == 0
    assert deferred["paused"] is False
    assert status["failuresByReason"] == []
    inline = client.admin.command({"modelStatus": INLINE})
    assert inline["errors"] == 0 and inline["failedBatches"] == 0
    print(f"deferred: {deferred['done']} done, {deferred['duplicates']} duplicates")
