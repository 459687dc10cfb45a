"""Deferred models end to end: real pymongo through `modelgate serve` subprocesses in front
of a SecantusDB of their own (so that no other proxy of the test session works off these
models). The core tests run twice: with change streams (the default) and with the sweep
only (`--no-change-streams`), each against its own proxy process.

Outputs are read back straight from the upstream, so what is checked is what was stored."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import bson
import numpy as np
import pymongo
import pymongo.errors
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.support import onnx_models
from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream

T = TypeVar("T")

LABELS = ["a", "b", "c"]
CLASSIFY = {"kind": "classify", "labels": LABELS}
# Fast settings, so that retries, sweeps and lease expiry happen within a test.
FAST = (
    "--sweep-interval",
    "0.5",
    "--lease-seconds",
    "3",
    "--retry-backoff",
    "0.2",
    "--registry-refresh",
    "0.5",
    "--max-attempts",
    "3",
    "--progress-interval",
    "4",
)
MAX_ATTEMPTS = 3
PATHS = {"streams": (), "sweep": ("--no-change-streams",)}


def one_hot(i: int) -> list[float]:
    """The linear classifier's input that scores class i % 4 (feature 3 scores "a")."""
    return [1.0 if k == i % 4 else 0.0 for k in range(4)]


def expected_label(x: list[float]) -> str:
    return LABELS[int(np.argmax(onnx_models.linear_logits(np.array([x]))[0]))]


def wait_for(
    check: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.5, what: str = ""
) -> T:
    """Poll until `check()` is truthy; fail with its last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}: last {value!r}")
        time.sleep(interval)


@dataclass
class Stack:
    """A SecantusDB, modelgate processes in front of it, and clients of both."""

    upstream_uri: str
    log_dir: Path
    proxies: list[ProxyProcess] = field(default_factory=list)
    clients: list[pymongo.MongoClient[dict[str, Any]]] = field(default_factory=list)
    direct: pymongo.MongoClient[dict[str, Any]] | None = None
    models: set[str] = field(default_factory=set)

    @property
    def client(self) -> pymongo.MongoClient[dict[str, Any]]:
        return self.clients[0]

    @property
    def up(self) -> pymongo.MongoClient[dict[str, Any]]:
        assert self.direct is not None
        return self.direct

    def add_proxy(self, *args: str) -> ProxyProcess:
        index = len(self.proxies)
        process = ProxyProcess(
            self.upstream_uri,
            self.log_dir / f"modelgate-{index}.log",
            args=(*FAST, *args, "--data-dir", str(self.log_dir / f"data-{index}")),
        ).start()
        self.proxies.append(process)
        self.clients.append(pymongo.MongoClient(process.uri))
        return process

    def register(
        self, name: str, namespace: str, onnx: bytes, client_index: int = 0, **fields: Any
    ) -> dict[str, Any]:
        command: dict[str, Any] = {
            "registerModel": name,
            "collection": namespace,
            "input": fields.pop("input", "x"),
            "mode": fields.pop("mode", "deferred"),
            "onnx": bson.Binary(onnx),
            "postprocess": fields.pop("postprocess", CLASSIFY),
        }
        command.update(fields)
        self.models.add(name)
        return dict(self.clients[client_index].admin.command(command))

    def drop_models(self) -> None:
        for name in sorted(self.models):
            with contextlib.suppress(pymongo.errors.OperationFailure):
                self.client.admin.command({"dropModel": name})
        self.models.clear()

    def status(self, name: str, client_index: int = 0) -> dict[str, Any]:
        return dict(self.clients[client_index].admin.command({"modelStatus": name})["deferred"])

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for process in self.proxies:
            process.stop()
        if self.direct is not None:
            self.direct.close()


@contextlib.contextmanager
def own_upstream(log_dir: Path) -> Iterator[Stack]:
    """A Stack on a SecantusDB of its own (no proxy yet), for tests of what several
    processes share through the upstream; its models are dropped and all stopped after."""
    with EmbeddedUpstream(":memory:", log_path=log_dir / "secantus.log") as upstream:
        created = Stack(upstream.uri, log_dir)
        created.direct = pymongo.MongoClient(upstream.uri)
        try:
            yield created
        finally:
            created.drop_models()
            created.close()


@pytest.fixture(scope="module")
def upstream_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Stack]]:
    """Starts a dedicated SecantusDB per call; all are stopped at the module's end."""
    started: list[tuple[EmbeddedUpstream, Stack]] = []

    def start() -> Stack:
        log_dir = tmp_path_factory.mktemp("deferred")
        upstream = EmbeddedUpstream(":memory:", log_path=log_dir / "secantus.log")
        upstream.start()
        stack = Stack(upstream.uri, log_dir)
        stack.direct = pymongo.MongoClient(upstream.uri)
        started.append((upstream, stack))
        return stack

    yield start
    for upstream, stack in started:
        stack.close()
        upstream.stop()


@pytest.fixture(scope="module", params=list(PATHS))
def stack(request: pytest.FixtureRequest, upstream_factory: Callable[[], Stack]) -> Stack:
    """One proxy per path: `streams` (change streams on) or `sweep` (sweep only)."""
    created = upstream_factory()
    created.add_proxy(*PATHS[request.param])
    created.path = request.param  # type: ignore[attr-defined]
    return created


@pytest.fixture
def names(request: pytest.FixtureRequest, stack: Stack) -> Iterator[tuple[str, str]]:
    """(database, model name) of the test's own; models dropped, database dropped after."""
    base = re.sub(r"\W", "_", request.node.name)[:40]
    stack.up.drop_database(base)
    yield base, f"m_{base}"
    stack.drop_models()
    stack.up.drop_database(base)


STREAMS_ONLY = pytest.mark.parametrize("stack", ["streams"], indirect=True)


def outputs(coll: Any, out: str = "_outputs.m") -> list[dict[str, Any]]:
    return list(coll.find({}, {"x": 1, "i": 1, out: 1}))


def output_of(doc: dict[str, Any], out: str) -> Any:
    value: Any = doc
    for part in out.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def all_current(coll: Any, out: str, version: int, total: int) -> bool:
    return coll.count_documents({f"{out}.version": version}) == total


# -- the core: everything written gets a prediction ----------------------------------------


def test_inserts_through_proxy_and_direct_all_predicted(
    stack: Stack, names: tuple[str, str]
) -> None:
    db, model = names
    out = f"_outputs.{model}"
    reply = stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    assert reply["version"] == 1
    proxied = stack.client[db].items
    for start in range(0, 2000, 250):
        proxied.insert_many([{"i": i, "x": one_hot(i)} for i in range(start, start + 250)])
    stack.up[db].items.insert_many([{"i": i, "x": one_hot(i)} for i in range(2000, 2500)])

    raw = stack.up[db].items
    wait_for(
        lambda: all_current(raw, out, 1, 2500), timeout=150, interval=2, what="2500 predictions"
    )
    docs = outputs(raw, out)
    assert len(docs) == 2500
    for doc in docs:
        value = output_of(doc, out)
        assert value["version"] == 1
        assert value["label"] == expected_label(doc["x"]), doc
    status = stack.status(model)
    assert status["pending"] == 0
    assert status["done"] == 2500
    assert status["failed"] == 0
    assert status["processedHere"] >= 2500
    assert status["duplicates"] == 0


def test_update_of_input_retriggers_prediction(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    proxied, raw = stack.client[db].items, stack.up[db].items
    proxied.insert_many([{"_id": i, "x": one_hot(i)} for i in range(4)])
    wait_for(lambda: all_current(raw, out, 1, 4), what="first predictions")
    label = lambda i: output_of(raw.find_one({"_id": i}), out)  # noqa: E731

    # Through the proxy: "a" -> "b" (the proxy marks the output stale in the same
    # write, so this works without change streams too).
    proxied.update_one({"_id": 0}, {"$set": {"x": one_hot(1)}})
    wait_for(lambda: label(0)["label"] == "b", what="new label after proxied update")
    if getattr(stack, "path", "") == "sweep":
        # Around the proxy, only a change stream can tell that an input changed under
        # an existing output; the sweep sees documents without one.
        return
    # Around the proxy: "b" -> "c" (the change stream sees it).
    raw.update_one({"_id": 1}, {"$set": {"x": one_hot(2)}})
    wait_for(lambda: label(1)["label"] == "c", what="new label after direct update")
    # A replacement around the proxy as well.
    raw.replace_one({"_id": 2}, {"_id": 2, "x": one_hot(0)})
    wait_for(lambda: (label(2) or {}).get("label") == "a", what="label after replacement")
    # Untouched documents keep their prediction.
    assert label(3) == {**label(3), "label": "a", "version": 1}


def test_new_version_reprocesses_old_outputs(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    stack.up[db].items.insert_many([{"i": i, "x": one_hot(i)} for i in range(300)])
    raw = stack.up[db].items
    wait_for(lambda: all_current(raw, out, 1, 300), what="v1 predictions")
    # Version 2: the weights route feature i to class (i + 1) % 3 ("a"->"b" and so on).
    reply = stack.register(
        model,
        f"{db}.items",
        shifted_classifier(),
        postprocess={"kind": "classify", "labels": LABELS},
    )
    assert reply["version"] == 2
    wait_for(lambda: all_current(raw, out, 2, 300), timeout=90, what="v2 predictions")
    for doc in outputs(raw, out):
        value = output_of(doc, out)
        assert value["version"] == 2
        assert value["label"] == LABELS[(LABELS.index(expected_label(doc["x"])) + 1) % 3]


def shifted_classifier() -> bytes:
    """Like linear_classifier(4, 3) but feature i scores class (i + 1) % 3."""
    w = np.zeros((4, 3), dtype=np.float32)
    for i in range(4):
        w[i, (i % 3 + 1) % 3] = 1.0
    b = np.zeros(3, dtype=np.float32)
    return _graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
        outputs=3,
    )


def out_of_range_gather() -> bytes:
    """x [N, 4] -> Gather(table[3], int64(x)) [N, 4]: fine for zeros (the load-time smoke
    test) and for inputs in 0..2, a run-time error for any input >= 3."""
    table = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    return _graph(
        [
            helper.make_node("Cast", ["x"], ["indices"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "indices"], ["y"], axis=0),
        ],
        [numpy_helper.from_array(table, "table")],
        outputs=4,
    )


def _graph(nodes: list[Any], initializers: list[Any], outputs: int) -> bytes:
    graph = helper.make_graph(
        nodes,
        "test_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        initializer=initializers,
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    return bytes(built.SerializeToString())


# -- failures --------------------------------------------------------------------------------


@STREAMS_ONLY
def test_failing_documents_retry_then_get_error_records(
    stack: Stack, names: tuple[str, str]
) -> None:
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    raw = stack.up[db].items
    good = [{"_id": i, "x": one_hot(i)} for i in range(20)]
    bad = [{"_id": 100 + i, "x": [1.0, 2.0, 3.0]} for i in range(5)]  # 3 values, not 4
    stack.client[db].items.insert_many(good + bad)

    seen_retrying = 0
    deadline = time.monotonic() + 60
    while raw.count_documents({f"{out}.version": 1}) < 25:
        seen_retrying = max(seen_retrying, stack.status(model)["retrying"])
        assert time.monotonic() < deadline, "failing documents never settled"
        time.sleep(0.05)
    assert seen_retrying >= 1, "no retry was ever pending"
    for doc in raw.find({"_id": {"$lt": 100}}):
        assert output_of(doc, out)["label"] == expected_label(doc["x"])
    for doc in raw.find({"_id": {"$gte": 100}}):
        record = output_of(doc, out)
        assert set(record) == {"error", "attempts", "version"}, record
        assert record["attempts"] == MAX_ATTEMPTS
        assert record["version"] == 1
        assert record["error"]
    status = stack.status(model)
    assert status["failed"] == 5
    assert status["done"] == 20
    assert status["retrying"] == 0
    stats = stack.up.modelgate.deferred_stats.find_one({"_id": model})
    assert stats is not None and stats["failed"] == 5


@STREAMS_ONLY
def test_model_failing_for_every_document_pauses(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    out = f"_outputs.{model}"
    labels = {"kind": "classify", "labels": ["p", "q", "r", "s"]}
    stack.register(model, f"{db}.items", out_of_range_gather(), postprocess=labels)
    stack.client[db].items.insert_many([{"_id": i, "x": [5.0, 6.0, 7.0, 8.0]} for i in range(10)])

    status = wait_for(lambda: (s := stack.status(model))["paused"] and s, what="the model to pause")
    assert status["pausedReason"], status
    assert status["failed"] == 0
    raw = stack.up[db].items
    time.sleep(1.5)  # a few sweeps later, still nothing is marked failed
    assert raw.count_documents({out: {"$exists": True}}) == 0
    assert stack.up.modelgate.deferred_failures.count_documents({"model": model}) == 0
    status = stack.status(model)
    assert status["paused"] is True
    assert status["pending"] == 10
    assert status["failed"] == 0


# -- backfill, chains, inline beside deferred ---------------------------------------------------


@STREAMS_ONLY
def test_backfill_with_filter_recomputes_only_matching(
    stack: Stack, names: tuple[str, str]
) -> None:
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    raw = stack.up[db].items
    raw.insert_many([{"_id": i, "group": i % 2, "x": one_hot(i)} for i in range(300)])
    wait_for(lambda: all_current(raw, out, 1, 300), timeout=60, what="first predictions")
    before = {doc["_id"]: output_of(doc, out) for doc in raw.find({"group": 1})}

    reply = stack.client.admin.command({"backfillModel": model, "filter": {"group": 0}})
    assert reply["ok"] == 1.0
    assert reply["marked"] == 150
    assert reply["version"] == 1
    # Right after the command the matching outputs are pending again (`backfillOf` says
    # which version made them); 150 documents take the worker a moment.
    assert raw.count_documents({"group": 0, f"{out}.backfillOf": 1}) > 0
    assert raw.count_documents({"group": 1, f"{out}.backfillOf": {"$exists": True}}) == 0
    wait_for(lambda: all_current(raw, out, 1, 300), timeout=60, what="recomputed predictions")
    for doc in raw.find({"group": 0}):
        value = output_of(doc, out)
        assert value["version"] == 1 and "backfillOf" not in value
        assert value["label"] == expected_label(doc["x"])
    # Non-matching documents are untouched.
    assert {doc["_id"]: output_of(doc, out) for doc in raw.find({"group": 1})} == before

    with pytest.raises(pymongo.errors.OperationFailure, match="no model"):
        stack.client.admin.command({"backfillModel": f"{model}_missing"})
    with pytest.raises(pymongo.errors.OperationFailure, match="filter must be a document"):
        stack.client.admin.command({"backfillModel": model, "filter": "group"})
    stack.register(f"{model}_inline", f"{db}.items", onnx_models.linear_classifier(), mode="inline")
    with pytest.raises(pymongo.errors.OperationFailure, match="inline"):
        stack.client.admin.command({"backfillModel": f"{model}_inline"})


@STREAMS_ONLY
def test_chain_of_two_deferred_models(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    a, b = f"{model}_a", f"{model}_b"
    stack.register(
        a,
        f"{db}.items",
        onnx_models.embedding_model(dim=4, factor=2.0),
        postprocess={"kind": "embedding"},
    )
    stack.register(b, f"{db}.items", onnx_models.linear_classifier(), input=f"_outputs.{a}.vector")
    raw = stack.up[db].items
    stack.client[db].items.insert_many([{"_id": i, "x": one_hot(i)} for i in range(30)])
    wait_for(lambda: all_current(raw, f"_outputs.{b}", 1, 30), what="the chain's end")
    for doc in raw.find():
        vector = doc["_outputs"][a]["vector"]
        assert vector == pytest.approx([2.0 * v for v in doc["x"]])
        assert doc["_outputs"][b]["label"] == expected_label(doc["x"])


@STREAMS_ONLY
def test_inline_and_deferred_models_on_one_collection(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    inline, deferred = f"{model}_inline", f"{model}_deferred"
    stack.register(inline, f"{db}.items", onnx_models.linear_classifier(), mode="inline")
    stack.register(deferred, f"{db}.items", shifted_classifier())
    stack.client[db].items.insert_many([{"_id": i, "x": one_hot(i)} for i in range(50)])
    raw = stack.up[db].items
    # Inline: stored with the write itself.
    assert raw.count_documents({f"_outputs.{inline}.version": 1}) == 50
    wait_for(lambda: all_current(raw, f"_outputs.{deferred}", 1, 50), what="deferred outputs")
    for doc in raw.find():
        label = expected_label(doc["x"])
        assert doc["_outputs"][inline]["label"] == label
        assert doc["_outputs"][deferred]["label"] == LABELS[(LABELS.index(label) + 1) % 3]
    assert "deferred" not in stack.client.admin.command({"modelStatus": inline})


def test_long_backfill_logs_progress(upstream_factory: Callable[[], Stack]) -> None:
    """Progress lines while a backfill runs, and one when it has caught up. Its own stack:
    a proxy that reports after every batch, so that the lines do not depend on speed."""
    own = upstream_factory()
    proxy = own.add_proxy("--progress-interval", "0.001")
    model = "progress"
    raw = own.up.backfill.items
    raw.insert_many([{"i": i, "x": one_hot(i)} for i in range(600)])
    own.register(model, "backfill.items", onnx_models.linear_classifier())
    wait_for(lambda: all_current(raw, f"_outputs.{model}", 1, 600), timeout=90, what="backfill")
    rate = r"(\d+) done in \d+s \([\d.]+/s\)"
    progress = re.findall(rf"deferred model '{model}' v1: {rate}, (\d+) pending", proxy.log_text())
    assert progress, "no progress line in the proxy log"
    assert [int(done) for done, _ in progress] == sorted(int(done) for done, _ in progress)
    assert all(int(done) + int(pending) <= 600 for done, pending in progress)
    caught_up = wait_for(
        lambda: re.search(rf"deferred model '{model}' v1: caught up, {rate}", proxy.log_text()),
        timeout=10,
        what="the caught-up line",
    )
    assert int(caught_up.group(1)) == 600


# -- an input path that goes through an array ---------------------------------------------------


def test_input_through_an_array_gets_an_error_record(stack: Stack, names: tuple[str, str]) -> None:
    """`items.x` where `items` is an array of sub-documents names no one value (MongoDB
    would match each element's x): such a document gets an error record that says so,
    and the documents beside it, the worker and the process carry on."""
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", onnx_models.linear_classifier(), input="items.x")
    raw = stack.up[db].items
    good = [{"_id": i, "items": {"x": one_hot(i)}} for i in range(6)]
    through = [
        {"_id": 100 + i, "items": [{"x": one_hot(i)}, {"x": one_hot(i + 1)}]} for i in range(3)
    ]
    stack.client[db].items.insert_many(good[:3] + through + good[3:])

    wait_for(lambda: all_current(raw, out, 1, 9), timeout=60, what="outputs for all 9")
    for doc in raw.find({"_id": {"$lt": 100}}):
        assert output_of(doc, out)["label"] == expected_label(doc["items"]["x"])
    for doc in raw.find({"_id": {"$gte": 100}}):
        record = output_of(doc, out)
        assert set(record) == {"error", "attempts", "version"}, record
        assert "through an array" in record["error"] and "'items'" in record["error"], record
        assert record["version"] == 1
    status = stack.status(model)
    assert (status["done"], status["failed"], status["pending"]) == (6, 3, 0), status
    process = stack.proxies[0].process
    assert process is not None and process.poll() is None, "the proxy process died"

    # The worker is still at work: later writes are predicted, and a document whose input
    # becomes one value is predicted in place of its error record.
    stack.client[db].items.insert_one({"_id": 50, "items": {"x": one_hot(2)}})
    stack.client[db].items.update_one({"_id": 100}, {"$set": {"items": {"x": one_hot(1)}}})
    wait_for(
        lambda: (
            (output_of(raw.find_one({"_id": 50}), out) or {}).get("label") == "c"
            and (output_of(raw.find_one({"_id": 100}), out) or {}).get("label") == "b"
        ),
        what="predictions after the error records",
    )


@STREAMS_ONLY
@pytest.mark.parametrize("on_error", ["reject", "record"])
def test_inline_input_through_an_array_is_refused_or_recorded(
    stack: Stack, names: tuple[str, str], on_error: str
) -> None:
    """An inline model whose input goes through an array in one of a write's documents:
    that document is refused or gets an error record, as the model says; the others are
    predicted."""
    db, model = names
    out = f"_outputs.{model}"
    stack.register(
        model,
        f"{db}.items",
        onnx_models.linear_classifier(),
        input="items.x",
        mode="inline",
        onError=on_error,
    )
    docs = [
        {"_id": 0, "items": {"x": one_hot(0)}},
        {"_id": 1, "items": [{"x": one_hot(1)}, {"x": one_hot(2)}]},
        {"_id": 2, "items": {"x": one_hot(2)}},
    ]
    raw = stack.up[db].items
    if on_error == "reject":
        with pytest.raises(pymongo.errors.BulkWriteError) as caught:
            stack.client[db].items.insert_many(docs, ordered=False)
        [error] = caught.value.details["writeErrors"]
        assert error["index"] == 1 and error["codeName"] == "DocumentValidationFailure"
        assert "through an array at 'items'" in error["errmsg"], error
        assert raw.find_one({"_id": 1}) is None
    else:
        stack.client[db].items.insert_many(docs)
        record = output_of(raw.find_one({"_id": 1}), out)
        assert "through an array at 'items'" in record["error"], record
    assert output_of(raw.find_one({"_id": 0}), out)["label"] == "a"
    assert output_of(raw.find_one({"_id": 2}), out)["label"] == "c"
