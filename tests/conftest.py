"""Shared fixtures: a real upstream server process and modelgate in front of it.

Set MODELGATE_TEST_UPSTREAM to a MongoDB URI to run the suite against a real MongoDB
instead of the SecantusDB process the fixtures start by default (tests that must own their
upstream, see README.md, still start their own)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest

from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream

REAL_UPSTREAM = os.environ.get("MODELGATE_TEST_UPSTREAM")


@pytest.fixture(scope="session")
def upstream_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if REAL_UPSTREAM:
        yield REAL_UPSTREAM
        return
    log_path = tmp_path_factory.mktemp("upstream") / "secantus.log"
    with EmbeddedUpstream(":memory:", log_path=log_path) as upstream:
        yield upstream.uri


@pytest.fixture(scope="session")
def proxy(upstream_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    log_dir = tmp_path_factory.mktemp("proxy")
    # Every proxy on the shared upstream takes deferred work of any test's model, and the
    # tests' image servers listen on loopback: this one must be able to fetch from them.
    args = ("--data-dir", str(log_dir), "--fetch-allow-private")
    with ProxyProcess(upstream_uri, log_dir / "modelgate.log", args=args) as process:
        yield process


@pytest.fixture(scope="session")
def client(proxy: ProxyProcess) -> Iterator[pymongo.MongoClient]:  # type: ignore[type-arg]
    with pymongo.MongoClient(proxy.uri) as mongo_client:
        yield mongo_client


@pytest.fixture(scope="session")
def direct(upstream_uri: str) -> Iterator[pymongo.MongoClient]:  # type: ignore[type-arg]
    """A client connected straight to the upstream, around the proxy."""
    with pymongo.MongoClient(upstream_uri) as mongo_client:
        yield mongo_client


@pytest.fixture
def db_name(request: pytest.FixtureRequest, direct: pymongo.MongoClient) -> Iterator[str]:  # type: ignore[type-arg]
    """A database of the test's own, dropped afterwards."""
    name = "t_" + re.sub(r"\W", "_", request.node.name)[:50]
    direct.drop_database(name)
    yield name
    direct.drop_database(name)


@pytest.fixture
def db(client: pymongo.MongoClient, db_name: str):  # type: ignore[no-untyped-def,type-arg]
    return client[db_name]


@pytest.fixture
def own_upstream(tmp_path: Path) -> Iterator[EmbeddedUpstream]:
    """A SecantusDB of the test's own, for tests that stop, restart or measure it."""
    with EmbeddedUpstream(":memory:", log_path=tmp_path / "secantus.log") as upstream:
        yield upstream


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
