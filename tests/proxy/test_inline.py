"""Inline predictions on every write shape, with a real onnxruntime model: what is
forwarded, what is refused, and how the reply the client gets is put back together."""

from __future__ import annotations

from typing import Any

import bson
import pytest
import trio
import trio.testing

from bench.support import onnx_models
from engine.batching import ModelServer
from engine.documents import FAITHFUL
from engine.inputs import ImageSource
from engine.runtime import RuntimeSettings, load_model
from engine.spec import ClassifyPostprocess, ModelSpec, OnError, TensorPreprocess
from proxy.framed import FramedStream
from proxy.inline import REGISTRY_WAIT_S, InlineWrites
from proxy.session import (
    AnswerLocally,
    CommandContext,
    ForwardRewritten,
    ForwardUnchanged,
    Session,
    WriteDecision,
)
from proxy.wire.opmsg import DocumentSequence, OpMsg
from tests.proxy.wired_session import services

NAMESPACE = "db.coll"
OUTPUT = "_outputs.m"
# linear_classifier scores class i highest for an input one-hot at feature i.
A = [1.0, 0.0, 0.0, 0.0]
B = [0.0, 1.0, 0.0, 0.0]
BAD = [1.0, 2.0]  # four features expected: the model cannot predict this one
CPU = RuntimeSettings(providers=("CPUExecutionProvider",))


def _server(on_error: OnError = "reject", mode: str = "inline") -> ModelServer:
    spec = ModelSpec(
        name="m",
        namespace=NAMESPACE,
        input_field="x",
        output_field=OUTPUT,
        mode=mode,  # type: ignore[arg-type]
        preprocess=TensorPreprocess(),
        postprocess=ClassifyPostprocess(labels=("a", "b", "c"), top_k=1),
        on_error=on_error,
    )
    model = load_model(spec, 1, onnx_models.linear_classifier(features=4, classes=3), CPU)
    return ModelServer(model, trio.CapacityLimiter(1))


class _Served:
    """The served models as InlineWrites reads them (engine.models.ModelSet's lookups)."""

    image_source: ImageSource | None = None

    def __init__(self, *servers: ModelServer) -> None:
        self.servers = servers
        self.answered = trio.Event()
        self.answered.set()

    @property
    def registry_answered(self) -> bool:
        return self.answered.is_set()

    async def wait_until_answered(self) -> None:
        await self.answered.wait()

    def _of(self, namespace: str, mode: str) -> list[ModelServer]:
        return [
            s
            for s in self.servers
            if s.model.spec.namespace == namespace and s.model.spec.mode == mode
        ]

    @property
    def has_inline(self) -> bool:
        return any(s.model.spec.mode == "inline" for s in self.servers)

    @property
    def has_deferred(self) -> bool:
        return any(s.model.spec.mode == "deferred" for s in self.servers)

    def inline_for(self, namespace: str) -> list[ModelServer]:
        return self._of(namespace, "inline")

    def deferred_for(self, namespace: str) -> list[ModelServer]:
        return self._of(namespace, "deferred")

    def has_deferred_on(self, namespace: str) -> bool:
        return bool(self.deferred_for(namespace))


def _context() -> CommandContext:
    # The interceptor only logs through its context; the session is never served.
    client, _ = trio.testing.memory_stream_pair()
    return CommandContext(Session(1, FramedStream(client), services()))


async def _intercept(
    command: str,
    body: dict[str, Any],
    sequences: tuple[DocumentSequence, ...] = (),
    *,
    on_error: OnError = "reject",
) -> WriteDecision:
    writes = InlineWrites(_Served(_server(on_error)))  # type: ignore[arg-type]
    assert writes.wants(command)
    message = OpMsg(0, bson.encode({command: "coll", **body, "$db": "db"}), sequences)
    return await writes.intercept(_context(), command, message)


def _forwarded(decision: WriteDecision) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The body and the document sequences of the message forwarded in place of the client's."""
    assert isinstance(decision, ForwardRewritten)
    body = bson.decode(decision.message.body, codec_options=FAITHFUL)
    sequences = {
        s.identifier: [bson.decode(doc, codec_options=FAITHFUL) for doc in s.documents]
        for s in decision.message.sequences
    }
    return body, sequences


def _label(document: dict[str, Any]) -> str:
    return str(document["_outputs"]["m"]["label"])


def _hooked(decision: WriteDecision, reply: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(decision, ForwardRewritten) and decision.reply_hook is not None
    return decision.reply_hook(reply)


# -- the write shapes ----------------------------------------------------------------------


async def test_insert_with_body_array() -> None:
    decision = await _intercept("insert", {"documents": [{"_id": 1, "x": A}, {"_id": 2, "x": B}]})
    body, _ = _forwarded(decision)
    assert [_label(doc) for doc in body["documents"]] == ["a", "b"]
    assert body["documents"][0]["_outputs"]["m"]["version"] == 1
    assert decision.reply_hook is None  # type: ignore[union-attr]


async def test_insert_with_document_sequence() -> None:
    documents = tuple(bson.encode({"_id": i, "x": x}) for i, x in enumerate([B, A]))
    decision = await _intercept("insert", {}, (DocumentSequence("documents", documents),))
    body, sequences = _forwarded(decision)
    assert "documents" not in body
    assert [_label(doc) for doc in sequences["documents"]] == ["b", "a"]


async def test_upsert_predicts_from_the_query_equality_into_set_on_insert() -> None:
    update = {"q": {"x": B}, "u": {"$inc": {"seen": 1}}, "upsert": True}
    body, _ = _forwarded(await _intercept("update", {"updates": [update]}))
    (forwarded,) = body["updates"]
    assert forwarded["u"]["$setOnInsert"][OUTPUT]["label"] == "b"
    assert forwarded["u"]["$inc"] == {"seen": 1}


async def test_replacement_gets_the_prediction_in_the_document() -> None:
    update = {"q": {"_id": 1}, "u": {"x": A, "name": "n"}}
    body, _ = _forwarded(await _intercept("update", {"updates": [update]}))
    assert _label(body["updates"][0]["u"]) == "a"


async def test_set_of_the_input_sets_the_output_alongside() -> None:
    update = {"q": {"_id": 1}, "u": {"$set": {"x": B}}}
    body, _ = _forwarded(await _intercept("update", {"updates": [update]}))
    assert body["updates"][0]["u"]["$set"][OUTPUT]["label"] == "b"


async def test_find_and_modify_gets_its_prediction() -> None:
    body, _ = _forwarded(
        await _intercept("findAndModify", {"query": {"_id": 1}, "update": {"$set": {"x": A}}})
    )
    assert body["update"]["$set"][OUTPUT]["label"] == "a"


async def test_find_and_modify_refused_is_answered_with_a_validation_error() -> None:
    decision = await _intercept(
        "findAndModify", {"query": {"_id": 1}, "update": {"$set": {"x": BAD}}}
    )
    assert isinstance(decision, AnswerLocally)
    assert decision.reply["ok"] == 0.0
    assert decision.reply["code"] == 121
    assert decision.reply["codeName"] == "DocumentValidationFailure"


async def test_bulk_write_command_inserts_and_updates() -> None:
    ops = [
        {"insert": 0, "document": {"_id": 1, "x": B}},
        {"update": 0, "filter": {"_id": 2}, "updateMods": {"$set": {"x": A}}},
        {"delete": 0, "filter": {"_id": 3}},
    ]
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    body = {"bulkWrite": 1, "ops": ops, "nsInfo": [{"ns": NAMESPACE}], "$db": "admin"}
    decision = await writes.intercept(_context(), "bulkWrite", OpMsg(0, bson.encode(body)))
    forwarded, _ = _forwarded(decision)
    assert _label(forwarded["ops"][0]["document"]) == "b"
    assert forwarded["ops"][1]["updateMods"]["$set"][OUTPUT]["label"] == "a"
    assert forwarded["ops"][2] == ops[2]


# -- refusals and their indices ------------------------------------------------------------


def _inserts(*inputs: list[float]) -> dict[str, Any]:
    return {"documents": [{"_id": i, "x": x} for i, x in enumerate(inputs)]}


async def test_unordered_refusals_are_removed_and_write_errors_keep_the_clients_indices() -> None:
    decision = await _intercept("insert", {**_inserts(A, BAD, B, BAD, A), "ordered": False})
    body, _ = _forwarded(decision)
    assert [doc["_id"] for doc in body["documents"]] == [0, 2, 4]
    # The upstream refused its second statement (the client's third) as a duplicate.
    duplicate = {"index": 1, "code": 11000, "errmsg": "duplicate key"}
    reply = _hooked(decision, {"n": 2, "writeErrors": [duplicate], "ok": 1.0})
    assert [(e["index"], e["code"]) for e in reply["writeErrors"]] == [
        (1, 121),
        (2, 11000),
        (3, 121),
    ]
    assert reply["n"] == 2


async def test_ordered_refusal_stops_the_write_at_the_refused_statement() -> None:
    decision = await _intercept("insert", _inserts(A, BAD, B))
    body, _ = _forwarded(decision)
    assert [doc["_id"] for doc in body["documents"]] == [0]
    reply = _hooked(decision, {"n": 1, "ok": 1.0})
    assert [(e["index"], e["code"]) for e in reply["writeErrors"]] == [(1, 121)]
    assert "could not predict 'x'" in reply["writeErrors"][0]["errmsg"]


async def test_ordered_write_that_failed_upstream_first_reports_only_that_error() -> None:
    decision = await _intercept("insert", _inserts(A, B, BAD))
    duplicate = {"index": 0, "code": 11000, "errmsg": "duplicate key"}
    reply = _hooked(decision, {"n": 0, "writeErrors": [duplicate], "ok": 1.0})
    assert [(e["index"], e["code"]) for e in reply["writeErrors"]] == [(0, 11000)]


async def test_write_with_every_statement_refused_is_answered_here() -> None:
    decision = await _intercept("insert", {**_inserts(BAD, BAD), "ordered": False})
    assert isinstance(decision, AnswerLocally)
    assert decision.reply["n"] == 0
    assert [e["index"] for e in decision.reply["writeErrors"]] == [0, 1]


async def test_bulk_write_results_keep_the_clients_indices() -> None:
    ops = [{"insert": 0, "document": {"x": BAD}}, {"insert": 0, "document": {"x": A}}]
    writes = InlineWrites(_Served(_server()))  # type: ignore[arg-type]
    body = {"bulkWrite": 1, "ops": ops, "nsInfo": [{"ns": NAMESPACE}], "ordered": False}
    decision = await writes.intercept(
        _context(), "bulkWrite", OpMsg(0, bson.encode({**body, "$db": "admin"}))
    )
    forwarded, _ = _forwarded(decision)
    assert len(forwarded["ops"]) == 1
    upstream = {"ok": 1.0, "nErrors": 0, "cursor": {"firstBatch": [{"ok": 1.0, "idx": 0, "n": 1}]}}
    reply = _hooked(decision, upstream)
    assert [(r["idx"], r["ok"]) for r in reply["cursor"]["firstBatch"]] == [(0, 0.0), (1, 1.0)]
    assert reply["nErrors"] == 1


async def test_on_error_record_stores_the_document_with_an_error_record() -> None:
    decision = await _intercept("insert", _inserts(A, BAD), on_error="record")
    body, _ = _forwarded(decision)
    assert len(body["documents"]) == 2
    assert _label(body["documents"][0]) == "a"
    record = body["documents"][1]["_outputs"]["m"]
    assert set(record) == {"error", "version"}
    assert record["version"] == 1
    assert decision.reply_hook is None  # type: ignore[union-attr]


# -- deferred models -----------------------------------------------------------------------


async def test_acknowledged_write_nudges_the_deferred_workers_of_its_namespace() -> None:
    written: list[str] = []
    writes = InlineWrites(_Served(_server(mode="deferred")), written.append)  # type: ignore[arg-type]
    message = OpMsg(0, bson.encode({"insert": "coll", **_inserts(A), "$db": "db"}))
    decision = await writes.intercept(_context(), "insert", message)
    assert isinstance(decision, ForwardUnchanged) and decision.reply_hook is not None
    assert written == []
    assert decision.reply_hook({"n": 1, "ok": 1.0}) == {"n": 1, "ok": 1.0}
    assert written == [NAMESPACE]


@pytest.mark.parametrize("command", ["delete", "find"])
async def test_other_commands_are_not_wanted(command: str) -> None:
    assert not InlineWrites(_Served(_server())).wants(command)  # type: ignore[arg-type]


# -- before the model registry has been read -------------------------------------------


async def test_a_write_waits_for_the_upstream_to_answer_the_first_registry_read() -> None:
    served = _Served(_server())
    served.answered = trio.Event()
    writes = InlineWrites(served)  # type: ignore[arg-type]
    assert writes.wants("insert") and not writes.wants("find")
    message = OpMsg(0, bson.encode({"insert": "coll", **_inserts(A), "$db": "db"}))
    decisions: list[WriteDecision] = []

    async def write() -> None:
        decisions.append(await writes.intercept(_context(), "insert", message))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        assert decisions == []
        served.answered.set()
    body, _ = _forwarded(decisions[0])
    assert _label(body["documents"][0]) == "a"


async def test_a_write_is_refused_when_the_registry_read_stays_unanswered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    served = _Served(_server())
    served.answered = trio.Event()
    message = OpMsg(0, bson.encode({"insert": "coll", **_inserts(A), "$db": "db"}))
    started = trio.current_time()
    decision = await InlineWrites(served).intercept(_context(), "insert", message)  # type: ignore[arg-type]
    assert trio.current_time() - started == pytest.approx(REGISTRY_WAIT_S)
    assert isinstance(decision, AnswerLocally)
    assert decision.reply["code"] == 6 and decision.reply["codeName"] == "HostUnreachable"
    assert "has not answered modelgate's read of its model registry" in decision.reply["errmsg"]
    assert "nothing was written" in decision.reply["errmsg"]
