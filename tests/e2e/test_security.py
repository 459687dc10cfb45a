"""Authentication passes through the proxy; TLS on the listener and to the upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pymongo
import pymongo.errors
import pytest

from bench.support.processes import ProxyProcess, wait_for_ping
from proxy.embedded import EmbeddedUpstream
from tests.e2e.certs import CertPair, make_self_signed
from tests.support import upstream_with_users

USER, PASSWORD = "app", "s3cret-pass"


# -- authentication -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedUpstream]:
    """SecantusDB with --auth: users are created on a start without it, as its --help says."""
    folder = tmp_path_factory.mktemp("auth-upstream")
    users = {USER: (PASSWORD, [{"role": "root", "db": "admin"}])}
    with upstream_with_users(folder, users) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def auth_proxy(
    auth_upstream: EmbeddedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("auth-proxy")
    with ProxyProcess(
        auth_upstream.uri, folder / "modelgate.log", args=("--data-dir", str(folder))
    ) as proxy:
        yield proxy


def _client(uri: str, **kwargs: object) -> pymongo.MongoClient:  # type: ignore[type-arg]
    kwargs.setdefault("serverSelectionTimeoutMS", 5000)
    return pymongo.MongoClient(uri, **kwargs)  # type: ignore[arg-type]


def test_scram_sha_256_passes_through(auth_proxy: ProxyProcess) -> None:
    with _client(
        auth_proxy.uri,
        username=USER,
        password=PASSWORD,
        authSource="admin",
        authMechanism="SCRAM-SHA-256",
    ) as client:
        things = client.t_auth.things
        things.delete_many({})
        things.insert_one({"secret": 42})
        assert things.find_one({}, {"_id": 0}) == {"secret": 42}
        status = client.admin.command("connectionStatus")
        users = status["authInfo"]["authenticatedUsers"]
        assert {"user": USER, "db": "admin"} in [{"user": u["user"], "db": u["db"]} for u in users]


def test_credentials_in_the_uri(auth_proxy: ProxyProcess) -> None:
    uri = f"mongodb://{USER}:{quote(PASSWORD)}@127.0.0.1:{auth_proxy.port}/?authSource=admin"
    with _client(uri) as client:
        assert client.t_auth.things.count_documents({}) >= 0
        assert client.admin.command("ping")["ok"] == 1


def test_wrong_password_is_authentication_failed(auth_proxy: ProxyProcess) -> None:
    with (
        _client(auth_proxy.uri, username=USER, password="wrong", authSource="admin") as client,
        pytest.raises(pymongo.errors.OperationFailure) as failure,
    ):
        client.admin.command("ping")
    assert failure.value.code == 18


def test_unauthenticated_commands_fail_as_the_upstream_says(
    auth_proxy: ProxyProcess, auth_upstream: EmbeddedUpstream
) -> None:
    with _client(auth_upstream.uri) as direct, pytest.raises(pymongo.errors.OperationFailure) as d:
        direct.t_auth.things.find_one({})
    with _client(auth_proxy.uri) as client, pytest.raises(pymongo.errors.OperationFailure) as p:
        client.t_auth.things.find_one({})
    assert p.value.code == d.value.code
    assert p.value.code in (13, 18)  # Unauthorized (or AuthenticationFailed)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    return make_self_signed(tmp_path_factory.mktemp("certs"))


def _tls_uri(port: int, cert: CertPair) -> str:
    return f"mongodb://127.0.0.1:{port}/?tls=true&tlsCAFile={quote(str(cert.cert))}"


@pytest.fixture(scope="module")
def tls_proxy(
    upstream_uri: str, cert: CertPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("tls-proxy")
    proxy = ProxyProcess(
        upstream_uri,
        folder / "modelgate.log",
        args=("--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--data-dir", str(folder)),
    )
    proxy.start(ping_uri=_tls_uri(proxy.port, cert))
    try:
        yield proxy
    finally:
        proxy.stop()


def test_tls_listener_with_ca_file(tls_proxy: ProxyProcess, cert: CertPair) -> None:
    with _client(_tls_uri(tls_proxy.port, cert)) as client:
        things = client.t_tls.things
        things.drop()
        things.insert_many([{"n": n} for n in range(3)])
        assert sorted(d["n"] for d in things.find()) == [0, 1, 2]
        things.drop()


def test_tls_listener_allow_invalid_certificates(tls_proxy: ProxyProcess) -> None:
    with _client(tls_proxy.uri, tls=True, tlsAllowInvalidCertificates=True) as client:
        assert client.admin.command("ping")["ok"] == 1


def test_tls_listener_refuses_plain_tcp(tls_proxy: ProxyProcess) -> None:
    offset = len(tls_proxy.log_text())
    with (
        pymongo.MongoClient(tls_proxy.uri, serverSelectionTimeoutMS=1500) as client,
        pytest.raises(pymongo.errors.ServerSelectionTimeoutError),
    ):
        client.admin.command("ping")
    assert "TLS handshake failed" in tls_proxy.log_text()[offset:]
    # The listener carries on for TLS clients.
    assert tls_proxy.process is not None and tls_proxy.process.poll() is None


def test_tls_listener_rejects_an_untrusted_certificate(tls_proxy: ProxyProcess) -> None:
    """The client checks the certificate: without the CA it does not trust the proxy."""
    with (
        pymongo.MongoClient(tls_proxy.uri, tls=True, serverSelectionTimeoutMS=1500) as client,
        pytest.raises(pymongo.errors.ServerSelectionTimeoutError),
    ):
        client.admin.command("ping")


class _TlsUpstream(EmbeddedUpstream):
    """SecantusDB serving TLS with the test certificate."""

    def __init__(self, cert: CertPair, log_path: Path) -> None:
        super().__init__(
            ":memory:",
            extra_args=("--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key)),
            log_path=log_path,
        )
        self.cert = cert

    @property
    def uri(self) -> str:
        return f"{_tls_uri(self.port, self.cert)}&directConnection=true"


def test_tls_to_the_upstream(cert: CertPair, tmp_path: Path) -> None:
    with _TlsUpstream(cert, tmp_path / "secantus.log") as upstream:
        with (
            _client(
                f"mongodb://127.0.0.1:{upstream.port}/", serverSelectionTimeoutMS=1500
            ) as plain,
            pytest.raises(pymongo.errors.PyMongoError),
        ):
            plain.admin.command("ping")  # the upstream really does want TLS
        proxy = ProxyProcess(
            upstream.uri,
            tmp_path / "modelgate.log",
            args=("--data-dir", str(tmp_path), "--connect-timeout", "2"),
        )
        proxy.start(wait=False)
        try:
            wait_for_ping(proxy.uri, timeout=10, process=proxy.process)
            with _client(proxy.uri) as client:
                client.t_tls_up.things.insert_one({"over": "tls"})
                assert client.t_tls_up.things.find_one({}, {"_id": 0}) == {"over": "tls"}
        finally:
            proxy.kill()
