"""Deferred models across process deaths and several processes: a proxy killed with
SIGKILL mid-work and restarted loses nothing, and three proxies sharing one collection
split the work through their leases with little duplicate work; a batch that outlasts its
lease is not done twice (leases are renewed while it runs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.support import onnx_models
from bench.support.image_server import ImageServer
from tests.e2e.test_deferred import (
    Stack,
    expected_label,
    one_hot,
    output_of,
    own_upstream,
    wait_for,
)

MODEL = "cluster_m"
OUT = f"_outputs.{MODEL}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A SecantusDB of the test's own (the leases and counters are per upstream)."""
    with own_upstream(tmp_path) as created:
        yield created


def check_all_predicted(stack: Stack, total: int) -> None:
    """Every document has exactly one output, of the current version, with its label."""
    docs = list(stack.up.db.items.find({}, {"x": 1, "_outputs": 1}))
    assert len(docs) == total
    missing = [doc["_id"] for doc in docs if output_of(doc, OUT) is None]
    assert not missing, f"{len(missing)} documents without a prediction"
    for doc in docs:
        value = output_of(doc, OUT)
        assert value["version"] == 1, doc
        assert value["label"] == expected_label(doc["x"]), doc
        assert set(doc["_outputs"]) == {MODEL}


def test_sigkill_mid_work_then_restart_loses_nothing(stack: Stack) -> None:
    total = 800
    process = stack.add_proxy()
    stack.up.db.items.insert_many([{"i": i, "x": one_hot(i)} for i in range(total)])
    stack.register(MODEL, "db.items", onnx_models.linear_classifier())
    raw = stack.up.db.items
    wait_for(
        lambda: raw.count_documents({f"{OUT}.version": 1}) >= 256,
        interval=0.3,
        what="the first batch",
    )
    process.kill()
    done_at_kill = raw.count_documents({f"{OUT}.version": 1})
    assert done_at_kill < total, "all done before the kill: make the test bigger"
    # Leases the dead process held stay until they expire (--lease-seconds 3).
    process.start()
    wait_for(
        lambda: raw.count_documents({f"{OUT}.version": 1}) == total,
        timeout=120,
        interval=1,
        what="all predictions after the restart",
    )
    check_all_predicted(stack, total)
    stats = stack.up.modelgate.deferred_stats.find_one({"_id": MODEL}) or {}
    assert stats.get("duplicates", 0) <= 256  # at most the batch in flight at the kill
    status = stack.status(MODEL)
    assert status["pending"] == 0
    assert status["done"] == total
    assert status["inProgress"] == 0


def test_three_proxies_share_the_work(stack: Stack) -> None:
    total = 900
    stack.up.db.items.insert_many([{"i": i, "x": one_hot(i)} for i in range(total)])
    # The default test leases (3 s), renewed while a batch runs.
    for _ in range(3):
        stack.add_proxy()
    stack.register(MODEL, "db.items", onnx_models.linear_classifier())
    raw = stack.up.db.items

    holders: set[str] = set()
    deadline = time.monotonic() + 150
    while True:
        status = stack.status(MODEL)
        holders.update(status["leaseHolders"])
        if status["pending"] == 0 and raw.count_documents({f"{OUT}.version": 1}) == total:
            break
        assert time.monotonic() < deadline, f"not done: {status}"
        time.sleep(1)  # modelStatus costs the upstream several counts

    check_all_predicted(stack, total)
    statuses = [stack.status(MODEL, index) for index in range(3)]
    processed = [s["processedHere"] for s in statuses]
    duplicates = statuses[0]["duplicates"]
    assert duplicates == sum(s["duplicatesHere"] for s in statuses)
    assert duplicates < 0.05 * total, statuses
    assert sum(processed) >= total
    # Several processes did the work: seen holding leases at once, or by their counts.
    workers = sum(1 for n in processed if n > 0)
    assert len(holders) > 1 or workers >= 2, (holders, processed)
    assert workers >= 2, processed


def test_a_batch_that_outlasts_its_lease_is_not_done_twice(stack: Stack) -> None:
    """Leases are renewed while their batch runs: with 2 s leases and one claim's worth of
    documents whose images take longer than three leases to come, the second process
    waits instead of taking the batch over and predicting it again.

    The slowness is the image server's, not the model's: every image answers after a
    fixed delay, however fast the machine."""
    lease = 2.0
    count = 16  # one claim (256) takes them all: the first process to look has the batch
    with ImageServer(slow_seconds=3.5 * lease) as images:
        raw = stack.up.db.items
        raw.insert_many([{"i": i, "img": images.url(f"/slow?i={i}")} for i in range(count)])
        for _ in range(2):
            stack.add_proxy(
                "--lease-seconds",
                str(lease),
                "--fetch-allow-private",
                # The wait is the point; the fetch must not give up on it.
                "--fetch-read-timeout",
                "60",
                "--fetch-timeout",
                "60",
            )
        started = time.monotonic()
        stack.register(
            MODEL,
            "db.items",
            onnx_models.image_classifier(channels=1, size=(28, 28)),
            input="img",
            preprocess={"kind": "image", "size": [28, 28], "mode": "L"},
            postprocess={"kind": "classify", "labels": ["black", "white"]},
        )
        wait_for(
            lambda: raw.count_documents({f"{OUT}.version": 1}) == count,
            timeout=120,
            what=f"{count} slow predictions",
        )
        assert time.monotonic() - started > 3 * lease, "the batch did not outlast its lease"
        # Each image was fetched once: no second process fetched it again to redo it.
        assert images.count("/slow") == count
    for proxy in stack.proxies:
        assert "expired leases taken over" not in proxy.log_text()
    assert stack.status(MODEL)["duplicates"] == 0
