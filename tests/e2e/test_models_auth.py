"""With access control on the upstream, only users who may administer a database may
register or drop its models; the check uses the client's own authentication."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import bson
import pymongo
import pymongo.errors
import pytest

from bench.support.onnx_models import linear_classifier
from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream
from tests.support import upstream_with_users

USERS = {
    "root": [{"role": "root", "db": "admin"}],
    "shopadmin": [{"role": "dbAdmin", "db": "shop"}, {"role": "readWrite", "db": "shop"}],
    "reader": [{"role": "read", "db": "shop"}],
}
PASSWORD = "pw-0123456789"


@pytest.fixture(scope="module")
def auth_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedUpstream]:
    folder = tmp_path_factory.mktemp("auth-models")
    users = {user: (PASSWORD, roles) for user, roles in USERS.items()}
    with upstream_with_users(folder, users) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy_uri(
    auth_upstream: EmbeddedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("auth-models-proxy")
    # The proxy's own service account (registry, deferred work) comes from the URI.
    service_uri = (
        f"mongodb://root:{quote(PASSWORD)}@127.0.0.1:{auth_upstream.port}/"
        "?directConnection=true&authSource=admin"
    )
    with ProxyProcess(
        service_uri, folder / "modelgate.log", args=("--data-dir", str(folder))
    ) as proxy:
        yield proxy.uri


def _as(proxy_uri: str, user: str | None) -> pymongo.MongoClient:  # type: ignore[type-arg]
    if user is None:
        return pymongo.MongoClient(proxy_uri, serverSelectionTimeoutMS=5000)
    return pymongo.MongoClient(
        proxy_uri,
        username=user,
        password=PASSWORD,
        authSource="admin",
        serverSelectionTimeoutMS=5000,
    )


def _register(client: pymongo.MongoClient, name: str, namespace: str) -> dict:  # type: ignore[type-arg]
    return client.admin.command(
        {
            "registerModel": name,
            "collection": namespace,
            "input": "x",
            "mode": "inline",
            "onnx": bson.Binary(linear_classifier(features=4, classes=3)),
        }
    )


def test_database_admin_may_register_and_drop(proxy_uri: str) -> None:
    with _as(proxy_uri, "shopadmin") as client:
        assert _register(client, "shop_model", "shop.items")["version"] == 1
        client.shop.items.insert_one({"x": [1.0, 0.0, 0.0, 0.0]})
        assert client.shop.items.find_one()["_outputs"]["shop_model"]["version"] == 1
        assert client.admin.command("dropModel", "shop_model")["ok"] == 1.0


def test_admin_of_another_database_is_refused(proxy_uri: str) -> None:
    with _as(proxy_uri, "shopadmin") as client:
        with pytest.raises(pymongo.errors.OperationFailure) as refused:
            _register(client, "elsewhere", "billing.invoices")
    assert refused.value.code == 13
    assert "not authorized on billing" in str(refused.value)


def test_reader_may_not_register_or_drop(proxy_uri: str) -> None:
    with _as(proxy_uri, "root") as root:
        _register(root, "kept", "shop.kept")
    try:
        with _as(proxy_uri, "reader") as reader:
            with pytest.raises(pymongo.errors.OperationFailure) as refused:
                _register(reader, "sneaky", "shop.items")
            assert refused.value.code == 13
            with pytest.raises(pymongo.errors.OperationFailure) as refused_drop:
                reader.admin.command("dropModel", "kept")
            assert refused_drop.value.code == 13
            # Reading the model list is not administration.
            assert "kept" in [m["name"] for m in reader.admin.command("listModels")["models"]]
    finally:
        with _as(proxy_uri, "root") as root:
            root.admin.command("dropModel", "kept")


def test_unauthenticated_client_is_refused(proxy_uri: str) -> None:
    with _as(proxy_uri, None) as anonymous:
        with pytest.raises(pymongo.errors.OperationFailure) as refused:
            _register(anonymous, "anon", "shop.items")
    assert refused.value.code == 13


def test_only_a_database_admin_may_retry_failed_predictions(proxy_uri: str) -> None:
    with _as(proxy_uri, "root") as root:
        root.admin.command(
            {
                "registerModel": "retried",
                "collection": "shop.retried",
                "input": "x",
                "mode": "deferred",
                "onnx": bson.Binary(linear_classifier(features=4, classes=3)),
            }
        )
    try:
        with _as(proxy_uri, "reader") as reader:
            with pytest.raises(pymongo.errors.OperationFailure) as refused:
                reader.admin.command({"retryFailed": "retried"})
            assert refused.value.code == 13
            assert "not authorized on shop to execute command retryFailed" in str(refused.value)
        with _as(proxy_uri, "shopadmin") as admin:
            assert admin.admin.command({"retryFailed": "retried"})["marked"] == 0
    finally:
        with _as(proxy_uri, "root") as root:
            root.admin.command("dropModel", "retried")
