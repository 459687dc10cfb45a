"""Whatever fails inside an admin command becomes a MongoDB-shaped error the session
replies with (a ModelgateError), not an exception that would close the connection.

Each command of the table runs against a model set whose every use raises, the way
modelgate's own pymongo client raises when the upstream fails in the middle of a command."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, cast

import pymongo.errors
import pytest
import trio

from engine.errors import HostUnreachable, ModelgateError, Unauthorized
from engine.upstream_failures import UpstreamRefusal, upstream_failure
from proxy.commands import COMMANDS
from proxy.session import CommandContext, Session
from proxy.settings import ModelSourceSettings

VECTOR_DEFINITION = {
    "fields": [{"type": "vector", "path": "e", "numDimensions": 2, "similarity": "cosine"}]
}
# A valid call of each command, up to the point where it needs the model set.
CALLS: dict[str, dict[str, Any]] = {
    "registerModel": {"registerModel": "m", "collection": "a.b", "input": "x", "onnx": b"-"},
    "listModels": {"listModels": 1},
    "modelStatus": {"modelStatus": "m"},
    "dropModel": {"dropModel": "m"},
    "backfillModel": {"backfillModel": "m"},
    "retryFailed": {"retryFailed": "m"},
    "cacheStatus": {"cacheStatus": 1},
    "createSearchIndexes": {
        "createSearchIndexes": "c",
        "indexes": [{"name": "v", "type": "vectorSearch", "definition": VECTOR_DEFINITION}],
        "$db": "shop",
    },
    "updateSearchIndex": {
        "updateSearchIndex": "c",
        "name": "v",
        "definition": VECTOR_DEFINITION,
        "$db": "shop",
    },
    "dropSearchIndex": {"dropSearchIndex": "c", "name": "v", "$db": "shop"},
}

REFUSAL = pymongo.errors.OperationFailure(
    'not authorized on modelgate to execute command { find: "models" }',
    13,
    {
        "ok": 0.0,
        "errmsg": 'not authorized on modelgate to execute command { find: "models" }',
        "code": 13,
        "codeName": "Unauthorized",
    },
)


class FailingModels:
    """A model set (or search index catalog) whose every attribute raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        raise self.error


class FakeSession:
    """What CommandContext reads of a session; the client's own upstream connection
    answers as an upstream without access control does."""

    def __init__(self, models: FailingModels) -> None:
        self.connection_id = 1
        self.log = logging.LoggerAdapter(logging.getLogger("test.session"), {})
        self.services = SimpleNamespace(
            models=models,
            deferred=None,
            model_sources=ModelSourceSettings(),
            search_catalog=models,
            search_indexes=None,
        )

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        return {"ok": 1.0, "authInfo": {"authenticatedUsers": []}}


async def run(name: str, error: BaseException, **command: Any) -> None:
    context = CommandContext(cast(Session, FakeSession(FailingModels(error))))
    await COMMANDS[name](context, {"$db": "admin", **CALLS[name], **command})


def test_every_command_is_covered() -> None:
    assert set(CALLS) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_an_upstream_refusal_keeps_mongodbs_code(name: str) -> None:
    with pytest.raises(UpstreamRefusal) as failure:
        await run(name, REFUSAL)
    assert (failure.value.code, failure.value.code_name) == (13, "Unauthorized")
    assert failure.value.message == REFUSAL.details["errmsg"]  # type: ignore[index]


@pytest.mark.parametrize(
    "error",
    [
        pymongo.errors.AutoReconnect("127.0.0.1:27017: connection closed"),
        pymongo.errors.ServerSelectionTimeoutError("127.0.0.1:27017: [Errno 111] refused"),
    ],
    ids=["lost", "unreachable"],
)
@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_lost_upstream_is_host_unreachable(name: str, error: Exception) -> None:
    with pytest.raises(HostUnreachable) as failure:
        await run(name, error)
    assert failure.value.code == 6
    assert failure.value.message == (f"the upstream did not answer while running {name}: {error}")


async def test_an_unexpected_error_is_an_internal_error_with_its_traceback_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ModelgateError) as failure:
        await run("listModels", ValueError("boom"))
    assert (failure.value.code, failure.value.code_name) == (1, "InternalError")
    assert failure.value.message == "listModels failed inside modelgate: ValueError: boom"
    [record] = [r for r in caplog.records if r.name == "test.session"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "command listModels failed unexpectedly" in record.getMessage()


async def test_modelgates_own_errors_pass_unchanged() -> None:
    with pytest.raises(Unauthorized, match="admin database"):
        await run("listModels", ValueError("never reached"), **{"$db": "shop"})


async def test_errors_of_the_clients_connection_pass_through() -> None:
    # The session closes that connection: the network error drivers retry.
    with pytest.raises(trio.BrokenResourceError):
        await run("listModels", trio.BrokenResourceError())


def test_replies_without_a_code_name_or_a_code() -> None:
    write_error = pymongo.errors.WriteError(
        "E11000 duplicate key", 11000, {"index": 0, "code": 11000, "errmsg": "E11000 dup"}
    )
    refusal = upstream_failure(write_error, "storing model 'm'")
    assert (refusal.code, refusal.code_name, refusal.message) == (
        11000,
        "Location11000",
        "E11000 dup",
    )
    no_code = upstream_failure(pymongo.errors.OperationFailure("odd"), "reading 'm'")
    assert (no_code.code_name, no_code.message) == (
        "InternalError",
        "failed while reading 'm': odd",
    )
    misuse = upstream_failure(pymongo.errors.InvalidOperation("closed"), "reading 'm'")
    assert (misuse.code_name, misuse.message) == (
        "InternalError",
        "failed while reading 'm': closed",
    )
