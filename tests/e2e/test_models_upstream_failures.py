"""When the upstream fails in the middle of an admin command, under modelgate's own work
(the registry, the deferred queues), the client gets the command's error reply on a
connection that stays usable: a refusal keeps MongoDB's code, codeName and errmsg, a lost
connection is HostUnreachable.

The failures are real upstream failures, armed with MongoDB's `configureFailPoint`
(`failCommand`) and scoped to the proxy's own client by its application name, so that the
client's connection (and the test's direct one) keep working while modelgate's fail."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pymongo
import pymongo.errors
import pytest

from bench.support.onnx_models import linear_classifier
from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream

# proxy/app.py names the proxy's own client so.
PROXY_APP_NAME = "modelgate"
UNAUTHORIZED, HOST_UNREACHABLE = 13, 6
FAILPOINT_ERRMSG = "Failing command via 'failCommand' failpoint"
_MODEL_NUMBERS = itertools.count(1)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedUpstream]:
    folder = tmp_path_factory.mktemp("upstream-failures")
    with EmbeddedUpstream(
        ":memory:", extra_args=("--enable-test-commands",), log_path=folder / "secantus.log"
    ) as started:
        yield started


@pytest.fixture(scope="module")
def proxy(
    upstream: EmbeddedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    folder: Path = tmp_path_factory.mktemp("upstream-failures-proxy")
    with ProxyProcess(
        upstream.uri, folder / "modelgate.log", args=("--data-dir", str(folder))
    ) as started:
        yield started


@pytest.fixture(scope="module")
def direct(upstream: EmbeddedUpstream) -> Iterator[pymongo.MongoClient]:  # type: ignore[type-arg]
    with pymongo.MongoClient(upstream.uri) as client:
        yield client


@pytest.fixture
def client(proxy: ProxyProcess) -> Iterator[pymongo.MongoClient]:  # type: ignore[type-arg]
    # One connection, so that "the same connection" is something to check.
    with pymongo.MongoClient(
        proxy.uri, appname="upstream-failures-test", maxPoolSize=1, serverSelectionTimeoutMS=5000
    ) as opened:
        yield opened


@pytest.fixture
def model(client: pymongo.MongoClient) -> Iterator[str]:  # type: ignore[type-arg]
    """A deferred model of the test's own (deferred: it has a queue to count and mark)."""
    name = f"m{next(_MODEL_NUMBERS)}"
    register(client, name)
    yield name
    try:
        client.admin.command("dropModel", name)
    except pymongo.errors.OperationFailure as exc:
        assert exc.code == 4, exc  # dropped by the test itself


def register(client: pymongo.MongoClient, name: str) -> dict[str, Any]:  # type: ignore[type-arg]
    return client.admin.command(
        {
            "registerModel": name,
            "collection": f"failures.{name}",
            "input": "x",
            "mode": "deferred",
            "onnx": bson.Binary(linear_classifier()),
            "postprocess": {"kind": "classify", "labels": ["a", "b", "c"]},
        }
    )


def fail_proxy_commands(
    direct: pymongo.MongoClient,  # type: ignore[type-arg]
    commands: list[str],
    failure: dict[str, Any],
) -> None:
    data = {"failCommands": commands, "appName": PROXY_APP_NAME, **failure}
    direct.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": data})


def stop_failing(direct: pymongo.MongoClient) -> None:  # type: ignore[type-arg]
    direct.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


FAILURES = {
    "refused": ({"errorCode": UNAUTHORIZED}, UNAUTHORIZED),
    "lost": ({"closeConnection": True}, HOST_UNREACHABLE),
}

# (command, the upstream commands of modelgate's work to fail: where in the command)
CASES = [
    ("registerModel", ["findAndModify"]),  # the registry's version counter, first
    ("registerModel", ["insert"]),  # the ONNX bytes (GridFS), after the counter moved
    ("listModels", ["find"]),  # the registry read
    ("modelStatus", ["aggregate"]),  # the deferred queue's counts, after the registry read
    ("dropModel", ["find"]),  # the registry's record of the model
    ("dropModel", ["delete"]),  # removing the stored versions
    ("backfillModel", ["update"]),  # marking the outputs stale, after the registry read
]


def command_for(name: str, model: str) -> dict[str, Any]:
    if name == "registerModel":
        return {
            "registerModel": model,
            "collection": f"failures.{model}",
            "input": "x",
            "mode": "deferred",
            "onnx": bson.Binary(linear_classifier()),
        }
    return {name: 1 if name == "listModels" else model}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize(("name", "failing"), CASES, ids=[f"{n}-{f[0]}" for n, f in CASES])
def test_the_command_replies_with_the_error_and_the_connection_stays(
    client: pymongo.MongoClient,  # type: ignore[type-arg]
    direct: pymongo.MongoClient,  # type: ignore[type-arg]
    model: str,
    name: str,
    failing: list[str],
    failure: str,
) -> None:
    fail_point_data, code = FAILURES[failure]
    connection = client.admin.command("whatsmyuri")["you"]
    fail_proxy_commands(direct, failing, fail_point_data)
    try:
        with pytest.raises(pymongo.errors.OperationFailure) as refused:
            client.admin.command(command_for(name, model))
    finally:
        stop_failing(direct)
    details = refused.value.details or {}
    assert (details["ok"], details["code"]) == (0, code), details
    if failure == "refused":
        assert (details["codeName"], details["errmsg"]) == ("Unauthorized", FAILPOINT_ERRMSG)
    else:
        assert details["codeName"] == "HostUnreachable"
        assert details["errmsg"].startswith("the upstream did not answer while "), details
    # The client's connection is the one it had, and the command works again.
    assert client.admin.command("whatsmyuri")["you"] == connection
    assert client.admin.command(command_for(name, model))["ok"] == 1.0
    listed = {m["name"] for m in client.admin.command("listModels")["models"]}
    assert (model in listed) == (name != "dropModel")
    assert client.admin.command("whatsmyuri")["you"] == connection
