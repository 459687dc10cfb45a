"""At DEBUG, the most talkative level, the proxy's log holds no credentials and no
document contents: not the service password of its upstream URI, not the password a
client authenticates with (SCRAM goes through the proxy), not the contents of documents
written through it, of the predictions made on them, or of error messages that echo an
input. It does say what it did: the commands, their namespaces, the masked URI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bson
import pymongo
import pymongo.errors
import pytest

from bench.support.image_server import ImageServer
from bench.support.onnx_models import image_classifier, linear_classifier
from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream
from tests.support import upstream_with_users

SERVICE_USER, SERVICE_PASSWORD = "modelgate-svc", "svc-Pa55word/with:specials"
CLIENT_USER, CLIENT_PASSWORD = "appuser", "client-Pa55word-0815"
MARKER = "MARKER-7f3a9c-do-not-log"
DATABASE = "logsecrets"
IMAGE_MODEL = {
    "onnx": bson.Binary(image_classifier(channels=1, size=(28, 28))),
    "preprocess": {"kind": "image", "size": [28, 28], "mode": "L"},
    "postprocess": {"kind": "classify", "labels": ["black", "white"]},
}
TENSOR_MODEL = {"onnx": bson.Binary(linear_classifier(features=4, classes=3))}

Client = pymongo.MongoClient[dict[str, Any]]


@pytest.fixture(scope="module")
def auth_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedUpstream]:
    folder = tmp_path_factory.mktemp("log-secrets-upstream")
    users = {
        SERVICE_USER: (SERVICE_PASSWORD, ["root"]),
        CLIENT_USER: (CLIENT_PASSWORD, [{"role": "dbOwner", "db": DATABASE}]),
    }
    with upstream_with_users(folder, users) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    with ImageServer() as server:
        yield server


def _wait_until(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.1)
    return value


def _register(client: Client, name: str, collection: str, **fields: Any) -> None:
    namespace = f"{DATABASE}.{collection}"
    client.admin.command({"registerModel": name, "collection": namespace, **fields})


def _exercise(client: Client, image_url: str) -> None:
    """Everything whose contents must stay out of the log: writes, reads and predictions,
    inline and deferred, with the marker in documents, filters and failing inputs."""
    db = client[DATABASE]
    _register(client, "inline_tensor", "inline", input="x", mode="inline", **TENSOR_MODEL)
    _register(client, "deferred_tensor", "deferred", input="x", mode="deferred", **TENSOR_MODEL)
    _register(client, "inline_image", "images", input="img", mode="inline", **IMAGE_MODEL)
    _register(
        client,
        "deferred_image",
        "later_images",
        input="img",
        mode="deferred",
        onError="record",
        **IMAGE_MODEL,
    )
    db.inline.insert_one({"x": [1.0, 0.0, 0.0, 0.0], "note": MARKER})
    db.inline.insert_many([{"x": [0.0, 1.0, 0.0, 0.0], "note": MARKER} for _ in range(3)])
    db.deferred.insert_one({"x": [0.0, 0.0, 1.0, 0.0], "note": MARKER})
    db.later_images.insert_one({"img": image_url, "note": MARKER})
    # The refusal names the URL it could not fetch: it echoes the input to the client.
    with pytest.raises(pymongo.errors.WriteError) as refused:
        db.images.insert_one({"img": image_url, "note": MARKER})
    assert MARKER in str(refused.value)
    db.inline.update_one({"note": MARKER}, {"$set": {"x": [0.0, 0.0, 0.0, 1.0]}})
    assert db.inline.find_one({"note": MARKER})["_outputs"]["inline_tensor"]["version"] == 1
    _wait_until(lambda: db.deferred.find_one({"_outputs.deferred_tensor": {"$exists": True}}))
    failed = _wait_until(
        lambda: db.later_images.find_one({"_outputs.deferred_image": {"$exists": True}})
    )
    assert MARKER in failed["_outputs"]["deferred_image"]["error"]
    for name in ("inline_tensor", "deferred_tensor", "inline_image", "deferred_image"):
        client.admin.command("dropModel", name)


def test_debug_log_holds_no_credentials_and_no_document_contents(
    auth_upstream: EmbeddedUpstream, image_server: ImageServer, tmp_path: Path
) -> None:
    service_uri = (
        f"mongodb://{SERVICE_USER}:{quote(SERVICE_PASSWORD, safe='')}@127.0.0.1:"
        f"{auth_upstream.port}/?directConnection=true&authSource=admin"
    )
    args = (
        "--data-dir", str(tmp_path), "--log-level", "DEBUG", "--fetch-allow-private",
        "--slow-ms", "0.001",  # every request also goes through the slow-operation log
        "--max-attempts", "1",  # the failing deferred document gets its error record at once
    )  # fmt: skip
    proxy = ProxyProcess(service_uri, tmp_path / "modelgate.log", args=args)
    image_url = image_server.url(f"/img/{MARKER}.png")  # 404: the fetch fails
    with proxy:
        client: Client
        with pymongo.MongoClient(
            proxy.uri, username=CLIENT_USER, password=CLIENT_PASSWORD, authSource="admin"
        ) as client:
            _exercise(client, image_url)
    log = proxy.log_text()  # the process's stdout and stderr

    assert f"command insert on {DATABASE}.inline" in log
    assert f"command find on {DATABASE}.inline" in log
    assert "DEBUG proxy.session: [conn" in log and "command saslContinue on admin" in log
    assert f"slow insert on {DATABASE}.deferred" in log
    # The upstream is named, its password masked.
    assert f"upstream: mongodb://{SERVICE_USER}:****@127.0.0.1:{auth_upstream.port}/" in log
    secrets = {
        "service password": SERVICE_PASSWORD,
        "service password, URI-escaped": quote(SERVICE_PASSWORD, safe=""),
        "client password": CLIENT_PASSWORD,
        "SCRAM client-first message": f"n={CLIENT_USER},r=",
        "document contents": MARKER,
    }
    leaked = {
        what: line
        for what, secret in secrets.items()
        for line in log.splitlines()
        if secret in line
    }
    assert not leaked
