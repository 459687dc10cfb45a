"""Failed predictions, seen and retried end to end: modelStatus's failures by reason and
the retryFailed command, with pymongo through a `modelgate serve` process in front of a
SecantusDB of its own (no other proxy takes these models' deferred work), and images
served by a real local HTTP server. Outputs are read straight from the upstream."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pymongo
import pymongo.errors
import pytest

import modelgate
from bench.support import onnx_models
from bench.support.image_server import ImageServer
from proxy.embedded import EmbeddedUpstream
from tests.e2e.test_deferred import MAX_ATTEMPTS, Stack, one_hot, out_of_range_gather, wait_for

GATHER_LABELS = {"kind": "classify", "labels": ["p", "q", "r", "s"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("retry-failed")
    with EmbeddedUpstream(":memory:", log_path=log_dir / "secantus.log") as upstream:
        created = Stack(upstream.uri, log_dir)
        created.direct = pymongo.MongoClient(upstream.uri)
        created.add_proxy("--fetch-allow-private")
        try:
            yield created
        finally:
            created.close()


@pytest.fixture
def names(request: pytest.FixtureRequest, stack: Stack) -> Iterator[tuple[str, str]]:
    """(database, model name) of the test's own; models and database dropped after."""
    base = re.sub(r"\W", "_", request.node.name)[:40]
    stack.up.drop_database(base)
    yield base, f"m_{base}"
    stack.drop_models()
    stack.up.drop_database(base)


def status(stack: Stack, model: str) -> dict[str, Any]:
    return modelgate.model_status(stack.client, model)


def test_images_that_404_are_retried_once_served(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    out = f"_outputs.{model}"
    raw = stack.up[db].items
    with ImageServer() as server:
        white = server.add_png("white", size=(28, 28), color=(255, 255, 255))
        late = server.url("/img/late.png")  # not served yet: HTTP 404
        stack.register(
            model,
            f"{db}.items",
            onnx_models.image_classifier(channels=1, size=(28, 28)),
            input="img",
            preprocess={"kind": "image", "size": [28, 28], "mode": "L"},
            postprocess={"kind": "classify", "labels": ["black", "white"]},
        )
        stack.client[db].items.insert_many(
            [{"_id": i, "img": white} for i in range(2)]
            + [{"_id": 10 + i, "k": i, "img": late} for i in range(3)]
        )
        wait_for(lambda: raw.count_documents({f"{out}.version": 1}) == 5, what="5 outputs")
        assert raw.count_documents({f"{out}.error": {"$exists": True}}) == 3

        (reason,) = status(stack, model)["failuresByReason"]
        assert reason["count"] == 3
        assert "HTTP 404" in reason["reason"] and late in reason["reason"]
        assert len(reason["reason"]) <= 100

        server.add_png("late", size=(28, 28), color=(0, 0, 0))  # the fix
        first = modelgate.retry_failed(stack.client, model, filter={"k": 0})
        assert first == {"ok": 1.0, "name": model, "version": 1, "marked": 1}
        # The other two still hold their error records; the retried one is pending, or
        # already predicted: in neither case is it marked again.
        assert modelgate.retry_failed(stack.client, model)["marked"] == 2
        wait_for(
            lambda: raw.count_documents({f"{out}.label": "black", f"{out}.version": 1}) == 3,
            what="the retried documents' predictions",
        )
    assert raw.count_documents({f"{out}.error": {"$exists": True}}) == 0
    assert raw.count_documents({f"{out}.label": "white"}) == 2
    after = status(stack, model)
    assert after["failuresByReason"] == []
    assert after["deferred"]["failed"] == 0
    assert after["deferred"]["retrying"] == 0
    assert modelgate.retry_failed(stack.client, model)["marked"] == 0


def test_inputs_failing_a_model_are_counted_by_reason(stack: Stack, names: tuple[str, str]) -> None:
    """Two kinds of bad input: two reasons, the more frequent first; the same counts for
    an inline model's error records."""
    db, model = names
    inline = f"{model}_inline"
    stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    stack.register(
        inline, f"{db}.items", onnx_models.linear_classifier(), mode="inline", onError="record"
    )
    stack.client[db].items.insert_many(
        [{"_id": i, "x": one_hot(i)} for i in range(4)]
        + [{"_id": 10 + i, "x": [1.0, 2.0, 3.0]} for i in range(3)]  # 3 values, not 4
        + [{"_id": 20 + i, "x": "not numbers"} for i in range(2)]
    )
    raw = stack.up[db].items
    out = f"_outputs.{model}"
    wait_for(lambda: raw.count_documents({f"{out}.version": 1}) == 9, what="9 outputs")
    for name in (model, inline):
        reasons = status(stack, name)["failuresByReason"]
        assert [reason["count"] for reason in reasons] == [3, 2], reasons
        assert reasons[0]["reason"] == raw.find_one({"_id": 10})["_outputs"][name]["error"][:100]
        assert reasons[1]["reason"] == raw.find_one({"_id": 20})["_outputs"][name]["error"][:100]
    # Retried unfixed, the strings fail again: their attempts are counted anew.
    assert modelgate.retry_failed(stack.client, model, filter={"_id": {"$gte": 20}}) == {
        "ok": 1.0,
        "name": model,
        "version": 1,
        "marked": 2,
    }
    # Tried again: the counter of error records stored moves from 5 to 7.
    stats = stack.up.modelgate.deferred_stats
    wait_for(lambda: stats.find_one({"_id": model})["failed"] == 7, what="two new failures")
    assert raw.count_documents({f"{out}.version": 1}) == 9
    for doc in raw.find({"_id": {"$gte": 10}}):
        assert doc["_outputs"][model]["attempts"] == MAX_ATTEMPTS
    assert [reason["count"] for reason in status(stack, model)["failuresByReason"]] == [3, 2]


def test_a_paused_model_resumes_at_once_on_retry(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", out_of_range_gather(), postprocess=GATHER_LABELS)
    stack.client[db].items.insert_many([{"_id": i, "x": [5.0, 6.0, 7.0, 8.0]} for i in range(6)])
    wait_for(lambda: status(stack, model)["deferred"]["paused"], what="the model to pause")
    raw = stack.up[db].items
    # Inputs the model can take, written around modelgate: nothing to mark (a pause
    # stores no error records), but the pause must not wait for its end.
    raw.update_many({}, {"$set": {"x": [0.0, 1.0, 2.0, 0.0]}})
    reply = stack.client.admin.command({"retryFailed": model})
    assert reply["marked"] == 0
    resumed = status(stack, model)["deferred"]
    assert resumed["paused"] is False and resumed["pausedReason"] is None
    wait_for(lambda: raw.count_documents({f"{out}.version": 1}) == 6, what="predictions")


def test_a_paused_model_resumes_at_once_when_registered_again(
    stack: Stack, names: tuple[str, str]
) -> None:
    db, model = names
    out = f"_outputs.{model}"
    stack.register(model, f"{db}.items", out_of_range_gather(), postprocess=GATHER_LABELS)
    stack.client[db].items.insert_many([{"_id": i, "x": [5.0, 6.0, 7.0, 8.0]} for i in range(6)])
    wait_for(lambda: status(stack, model)["deferred"]["paused"], what="the model to pause")
    fixed = onnx_models.linear_classifier(features=4, classes=4)
    assert stack.register(model, f"{db}.items", fixed, postprocess=GATHER_LABELS)["version"] == 2
    assert status(stack, model)["deferred"]["paused"] is False
    raw = stack.up[db].items
    wait_for(lambda: raw.count_documents({f"{out}.version": 2}) == 6, what="v2 predictions")


def test_bad_arguments_are_refused_like_backfill(stack: Stack, names: tuple[str, str]) -> None:
    db, model = names
    stack.register(model, f"{db}.items", onnx_models.linear_classifier())
    stack.register(f"{model}_inline", f"{db}.items", onnx_models.linear_classifier(), mode="inline")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"retryFailed": model, "fliter": {}}, 2, "unknown field 'fliter'"),
        ({"retryFailed": model, "filter": "k"}, 14, "filter must be a document, got str"),
        ({"retryFailed": 7}, 14, "takes a model name"),
        ({"retryFailed": f"{model}_missing"}, 4, "no model named"),
        ({"retryFailed": f"{model}_inline"}, 2, "is inline; retryFailed applies to deferred"),
    ]
    for command, code, message in cases:
        with pytest.raises(pymongo.errors.OperationFailure, match=message) as refused:
            stack.client.admin.command(command)
        assert refused.value.code == code, command
    with pytest.raises(pymongo.errors.OperationFailure, match="admin database") as elsewhere:
        stack.client[db].command({"retryFailed": model})
    assert elsewhere.value.code == 13
    # The connection is fine after the refusals.
    assert modelgate.retry_failed(stack.client, model, filter={"k": 1})["marked"] == 0
