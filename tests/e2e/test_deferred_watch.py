"""One change stream per namespace among several modelgate processes, end to end: a process
that does not watch still predicts documents written around it (its sweep finds them),
and when the watching process is SIGKILLed another takes the watch over and resumes the
stream where it was, so that an input changed around modelgate meanwhile is recomputed."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.support import onnx_models
from engine.deferred_watch import WATCHERS
from tests.e2e.test_deferred import (
    Stack,
    expected_label,
    one_hot,
    output_of,
    own_upstream,
    wait_for,
)

MODEL = "watch_m"
OUT = f"_outputs.{MODEL}"
NAMESPACE = "db.items"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A SecantusDB of the test's own (the watch leases are per upstream)."""
    with own_upstream(tmp_path) as created:
        yield created


def watcher(stack: Stack) -> dict[str, Any]:
    return stack.up.modelgate[WATCHERS].find_one({"_id": NAMESPACE}) or {}


def label(stack: Stack, doc_id: int) -> Any:
    return (output_of(stack.up.db.items.find_one({"_id": doc_id}) or {}, OUT) or {}).get("label")


def test_a_process_that_does_not_watch_still_predicts_writes_around_it(stack: Stack) -> None:
    # Another process (say, one that serves the namespace from another host) holds the
    # watch for the whole test: this one never follows the stream.
    far = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    stack.up.modelgate[WATCHERS].insert_one(
        {"_id": NAMESPACE, "owner": "elsewhere", "expires": far, "token": None}
    )
    stack.add_proxy()
    stack.register(MODEL, NAMESPACE, onnx_models.linear_classifier())
    raw = stack.up.db.items
    raw.insert_many([{"_id": i, "x": one_hot(i)} for i in range(300)])  # around the proxy
    wait_for(
        lambda: raw.count_documents({f"{OUT}.version": 1}) == 300,
        timeout=120,
        what="300 predictions found by the sweep",
    )
    for doc in raw.find({}, {"x": 1, "_outputs": 1}):
        assert output_of(doc, OUT)["label"] == expected_label(doc["x"])
    assert watcher(stack)["owner"] == "elsewhere"


def test_the_watch_is_taken_over_and_resumed_when_its_process_dies(stack: Stack) -> None:
    proxies = [stack.add_proxy() for _ in range(2)]
    stack.register(MODEL, NAMESPACE, onnx_models.linear_classifier())
    raw = stack.up.db.items
    raw.insert_many([{"_id": i, "x": one_hot(i)} for i in range(8)])
    wait_for(lambda: raw.count_documents({f"{OUT}.version": 1}) == 8, what="8 predictions")
    # Through the stream: an input changed around the proxies is recomputed ("a" -> "b").
    raw.update_one({"_id": 0}, {"$set": {"x": one_hot(1)}})
    wait_for(lambda: label(stack, 0) == "b", what="the label after the first change")
    owner = watcher(stack)["owner"]
    (holder,) = [p for p in proxies if p.process and f":{p.process.pid}:" in owner]
    # The watch stored where its stream was (renewed every third of the 3 s lease).
    wait_for(lambda: watcher(stack).get("token"), what="a stored resume token")
    holder.kill()
    # Changed while nobody follows the stream: seen once the other process takes the
    # watch over (its lease expired), as it resumes after the stored token.
    raw.update_one({"_id": 4}, {"$set": {"x": one_hot(2)}})
    wait_for(lambda: label(stack, 4) == "c", timeout=90, what="the label after the kill")
    assert watcher(stack)["owner"] != owner
    (survivor,) = [p for p in proxies if p is not holder]
    assert survivor.process is not None and f":{survivor.process.pid}:" in watcher(stack)["owner"]
    # Back again, the restarted process leaves the watch to the one that holds it.
    holder.start()
    raw.update_one({"_id": 5}, {"$set": {"x": one_hot(3)}})
    wait_for(lambda: label(stack, 5) == expected_label(one_hot(3)), what="a label after restart")
    assert f":{survivor.process.pid}:" in watcher(stack)["owner"]
