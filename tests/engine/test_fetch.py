"""Fetcher against a real local HTTP server: caching, limits, retries, the address guard.

Every connection in this module goes to 127.0.0.1: the autouse fixture below fails any
test whose fetcher tries to connect elsewhere.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from bench.support.image_server import ImageServer
from engine.addresses import METADATA_ADDRESSES, AddressPolicy, BlockedAddress, resolve_checked
from engine.cache import ImageCache
from engine.errors import PredictionError
from engine.fetch import Fetcher, FetchSettings

FAST = FetchSettings(
    allow_private=True,  # the test server is on 127.0.0.1
    connect_timeout=1.0,
    read_timeout=0.5,
    total_timeout=5.0,
    retries=2,
    retry_backoff=0.01,
    negative_ttl=30.0,
)


def settings(**changes: Any) -> FetchSettings:
    return dataclasses.replace(FAST, **changes)


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    connected: list[str] = []
    real = httpcore.TrioBackend.connect_tcp

    async def guarded(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        assert host == "127.0.0.1", f"test tried to connect to {host}"
        connected.append(host)
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.TrioBackend, "connect_tcp", guarded)
    return connected


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(slow_seconds=3.0) as s:
        yield s


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ImageCache]:
    with ImageCache(tmp_path / "cache", max_bytes=10 << 20) as c:
        yield c


async def fetch_error(fetcher: Fetcher, url: str) -> str:
    with pytest.raises(PredictionError) as info:
        await fetcher.fetch(url)
    return info.value.message


# -- serving and caching -----------------------------------------------------------


async def test_fetch_then_cache_hit(server: ImageServer, cache: ImageCache) -> None:
    url = server.add_png("a", size=(8, 8))
    async with Fetcher(FAST, cache) as fetcher:
        first = await fetcher.fetch(url)
        second = await fetcher.fetch(url)
    assert first == second == server.images["a"]
    assert first.startswith(b"\x89PNG")
    assert server.count("/img/a.png") == 1
    entry = cache.get(url)
    assert entry is not None and entry.content_type == "image/png" and entry.etag
    stats = fetcher.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["fetches"] == 1
    assert stats["bytes_fetched"] == len(first)
    assert stats["latency_p99_ms"] >= stats["latency_p50_ms"] > 0


async def test_cache_serves_after_server_stops(server: ImageServer, cache: ImageCache) -> None:
    cached = server.add_png("a")
    uncached = server.add_png("b")
    async with Fetcher(FAST, cache) as fetcher:
        expected = await fetcher.fetch(cached)
        server.stop()
        assert await fetcher.fetch(cached) == expected
        message = await fetch_error(fetcher, uncached)
    assert "connection refused" in message and uncached in message


async def test_new_fetcher_uses_existing_cache(server: ImageServer, cache: ImageCache) -> None:
    url = server.add_png("a")
    async with Fetcher(FAST, cache) as fetcher:
        await fetcher.fetch(url)
    async with Fetcher(FAST, cache) as fetcher:
        assert await fetcher.fetch(url) == server.images["a"]
    assert server.count("/img/a.png") == 1


async def test_non_image_body_is_returned_as_bytes(server: ImageServer) -> None:
    async with Fetcher(FAST) as fetcher:
        assert await fetcher.fetch(server.url("/notimage")) == b"this is not an image\n"


async def test_concurrent_fetches_share_one_request(server: ImageServer) -> None:
    url = server.add_png("a", size=(64, 64), noise=True)
    results: list[bytes] = []
    async with Fetcher(FAST) as fetcher:

        async def one() -> None:
            results.append(await fetcher.fetch(url))

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
    assert len(results) == 100 and set(results) == {server.images["a"]}
    assert server.count("/img/a.png") == 1
    assert fetcher.stats()["shared"] == 99


async def test_cancelled_leader_does_not_strand_waiters(server: ImageServer) -> None:
    url = server.add_png("a")
    async with Fetcher(FAST) as fetcher:
        results: list[bytes] = []

        async def waiter() -> None:
            results.append(await fetcher.fetch(url))

        async with trio.open_nursery() as nursery:
            leader = trio.CancelScope()

            async def lead() -> None:
                with leader:
                    await fetcher.fetch(url)

            nursery.start_soon(lead)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked(0.01)
            leader.cancel()
    assert results == [server.images["a"]]


async def test_revalidation_with_etag_gets_304(server: ImageServer, cache: ImageCache) -> None:
    url = server.add_png("a")
    async with Fetcher(settings(revalidate_after=0.0), cache) as fetcher:
        first = await fetcher.fetch(url)
        before = cache.get(url)
        assert before is not None
        second = await fetcher.fetch(url)
    assert first == second
    assert server.count("/img/a.png") == 2 and server.not_modified == 1
    after = cache.get(url)
    assert after is not None and after.fetched_at >= before.fetched_at
    assert fetcher.stats()["revalidated"] == 1


async def test_stale_entry_is_served_when_revalidation_cannot_connect(
    server: ImageServer, cache: ImageCache
) -> None:
    url = server.add_png("a")
    async with Fetcher(settings(revalidate_after=0.0, retries=0), cache) as fetcher:
        first = await fetcher.fetch(url)
        server.stop()
        assert await fetcher.fetch(url) == first


async def test_fresh_entry_is_not_revalidated(server: ImageServer, cache: ImageCache) -> None:
    url = server.add_png("a")
    async with Fetcher(settings(revalidate_after=3600.0), cache) as fetcher:
        await fetcher.fetch(url)
        await fetcher.fetch(url)
    assert server.count("/img/a.png") == 1


async def test_file_urls(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"\x89PNG local")
    async with Fetcher(settings(allow_file=True, max_bytes=100)) as fetcher:
        assert await fetcher.fetch(path.as_uri()) == b"\x89PNG local"
        path.write_bytes(b"x" * 101)
        assert "larger than 100 bytes" in await fetch_error(fetcher, path.as_uri() + "?")
        assert "cannot read file" in await fetch_error(fetcher, (tmp_path / "no").as_uri())
    async with Fetcher(FAST) as fetcher:
        assert "unsupported scheme" in await fetch_error(fetcher, path.as_uri())


@pytest.mark.parametrize(("limit", "expect_at_most"), [(2, 2), (8, 8)])
async def test_per_host_concurrency_limit(
    server: ImageServer, limit: int, expect_at_most: int
) -> None:
    server.slow_seconds = 0.1
    urls = [server.url(f"/slow?i={i}") for i in range(12)]
    async with (
        Fetcher(settings(per_host_concurrency=limit, read_timeout=2.0)) as fetcher,
        trio.open_nursery() as nursery,
    ):
        for url in urls:
            nursery.start_soon(fetcher.fetch, url)
    assert server.count("/slow") == 12
    assert 1 < server.max_active <= expect_at_most


# -- failures ----------------------------------------------------------------------


async def test_404_is_not_retried_and_is_remembered(server: ImageServer) -> None:
    url = server.url("/404")
    async with Fetcher(FAST) as fetcher:
        message = await fetch_error(fetcher, url)
        assert "HTTP 404" in message and url in message
        assert server.count("/404") == 1
        assert await fetch_error(fetcher, url) == message  # negative cache
        assert server.count("/404") == 1
        stats = fetcher.stats()
    assert stats["negative_hits"] == 1 and stats["errors"] == 1


async def test_negative_cache_expires(server: ImageServer) -> None:
    url = server.url("/404")
    async with Fetcher(settings(negative_ttl=0.05)) as fetcher:
        await fetch_error(fetcher, url)
        await trio.sleep(0.1)
        await fetch_error(fetcher, url)
    assert server.count("/404") == 2


async def test_5xx_is_retried_then_succeeds(server: ImageServer) -> None:
    url = server.url("/500-then-ok?k=1")
    async with Fetcher(settings(retries=2)) as fetcher:
        assert (await fetcher.fetch(url)).startswith(b"\x89PNG")
    assert server.count("/500-then-ok?k=1") == 3
    assert fetcher.stats()["retries"] == 2


async def test_5xx_gives_up_after_retries(server: ImageServer) -> None:
    url = server.url("/500-then-ok?k=2")
    async with Fetcher(settings(retries=1)) as fetcher:
        assert "HTTP 500" in await fetch_error(fetcher, url)
    assert server.count("/500-then-ok?k=2") == 2


async def test_slow_server_times_out(server: ImageServer) -> None:
    url = server.url("/slow")
    async with Fetcher(settings(read_timeout=0.2, retries=0)) as fetcher:
        with trio.fail_after(2):
            message = await fetch_error(fetcher, url)
    assert "timed out" in message and url in message


async def test_total_timeout(server: ImageServer) -> None:
    async with Fetcher(settings(read_timeout=5.0, total_timeout=0.3)) as fetcher:
        with trio.fail_after(2):
            assert "timed out" in await fetch_error(fetcher, server.url("/slow"))


async def test_endless_body_hits_the_size_cap(server: ImageServer) -> None:
    url = server.url("/endless")
    async with Fetcher(settings(max_bytes=100_000)) as fetcher:
        message = await fetch_error(fetcher, url)
    assert "larger than 100000 bytes" in message
    assert server.count("/endless") == 1


async def test_declared_length_over_the_cap(server: ImageServer) -> None:
    url = server.add_png("big", size=(64, 64), noise=True)
    async with Fetcher(settings(max_bytes=1000)) as fetcher:
        assert "larger than 1000 bytes" in await fetch_error(fetcher, url)


async def test_redirects_are_followed(server: ImageServer) -> None:
    target = server.add_png("a")
    async with Fetcher(FAST) as fetcher:
        assert await fetcher.fetch(server.url("/redirect?to=/img/a.png")) == server.images["a"]
        assert await fetcher.fetch(server.url(f"/redirect?to={target}")) == server.images["a"]


async def test_redirect_loop(server: ImageServer) -> None:
    async with Fetcher(FAST) as fetcher:
        message = await fetch_error(fetcher, server.url("/loop"))
    assert "too many redirects" in message
    assert server.count("/loop") == 1  # the loop is seen at the first repeat


async def test_redirect_cap(server: ImageServer) -> None:
    server.add_png("a")
    chain = "/img/a.png"
    for _ in range(3):
        chain = "/redirect?to=" + chain.replace("?", "%3F").replace("=", "%3D")
    async with Fetcher(settings(max_redirects=2)) as fetcher:
        message = await fetch_error(fetcher, server.url(chain))
    assert "too many redirects" in message and "more than 2 redirects" in message
    assert server.count("/img/a.png") == 0
    async with Fetcher(settings(max_redirects=3)) as fetcher:
        assert await fetcher.fetch(server.url(chain)) == server.images["a"]


async def test_unsupported_scheme() -> None:
    async with Fetcher(FAST) as fetcher:
        assert "unsupported scheme 'ftp'" in await fetch_error(fetcher, "ftp://127.0.0.1/a")
        assert "unsupported scheme" in await fetch_error(fetcher, "gopher://127.0.0.1/a")


async def test_redirect_to_file_is_refused(server: ImageServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    async with Fetcher(settings(allow_file=True)) as fetcher:
        message = await fetch_error(fetcher, server.url(f"/redirect?to={secret.as_uri()}"))
    assert "unsupported scheme 'file'" in message


# -- the address guard -------------------------------------------------------------


async def test_private_address_refused_before_any_request(
    server: ImageServer, only_loopback: list[str]
) -> None:
    url = server.add_png("a")
    async with Fetcher(settings(allow_private=False)) as fetcher:
        message = await fetch_error(fetcher, url)
        assert "blocked address 127.0.0.1 (private addresses are not allowed)" in message
        assert url in message
        host_url = url.replace("127.0.0.1", "localhost")
        assert "private addresses are not allowed" in await fetch_error(fetcher, host_url)
    assert server.total_requests == 0 and only_loopback == []


async def test_deny_hosts_wins_over_allow_private(
    server: ImageServer, only_loopback: list[str]
) -> None:
    url = server.add_png("a")
    for deny in ("127.0.0.1", "127.0.0.0/8", "localhost"):
        async with Fetcher(settings(deny_hosts=(deny,))) as fetcher:
            target = url.replace("127.0.0.1", "localhost") if deny == "localhost" else url
            assert "blocked" in await fetch_error(fetcher, target)
    assert server.total_requests == 0 and only_loopback == []


async def test_allow_hosts_lets_a_private_address_through(server: ImageServer) -> None:
    url = server.add_png("a")
    for allow in ("127.0.0.1", "127.0.0.0/8"):
        async with Fetcher(settings(allow_private=False, allow_hosts=(allow,))) as fetcher:
            assert await fetcher.fetch(url) == server.images["a"]


async def test_redirect_to_denied_address_is_refused(
    server: ImageServer, only_loopback: list[str]
) -> None:
    server.add_png("a")
    denied = f"http://localhost:{server.port}/img/a.png"
    async with Fetcher(settings(deny_hosts=("localhost",))) as fetcher:
        message = await fetch_error(fetcher, server.url(f"/redirect?to={denied}"))
        assert "blocked host localhost" in message
        message = await fetch_error(
            fetcher, server.url("/redirect?to=http://169.254.169.254/latest/meta-data/")
        )
        assert "metadata address" in message
    assert server.count("/redirect") == 2 and server.count("/img/a.png") == 0
    assert set(only_loopback) == {"127.0.0.1"}


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254", "100.100.100.200"]
)
def test_metadata_addresses_are_never_allowed(address: str) -> None:
    permissive = AddressPolicy.create(
        allow_private=True, allow_hosts=("169.254.0.0/16", "fd00::/8", "::/0", "0.0.0.0/0")
    )
    with pytest.raises(BlockedAddress, match="metadata address"):
        permissive.check_address(address)


@pytest.mark.parametrize(
    ("address", "allowed_by_default"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.0.1", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
    ],
)
def test_private_and_reserved_addresses(address: str, allowed_by_default: bool) -> None:
    strict = AddressPolicy.create()
    if allowed_by_default:
        strict.check_address(address)
    else:
        with pytest.raises(BlockedAddress, match="private addresses are not allowed"):
            strict.check_address(address)
    AddressPolicy.create(allow_private=True).check_address(address)


def test_link_local_ipv4_is_never_allowed() -> None:
    with pytest.raises(BlockedAddress, match="link-local"):
        AddressPolicy.create(allow_private=True).check_address("169.254.1.1")


def test_allow_hosts_by_name_and_network() -> None:
    policy = AddressPolicy.create(allow_hosts=("images.internal", "10.0.0.0/8"))
    policy.check_address("10.2.3.4")
    policy.check_address("::ffff:10.2.3.4")
    policy.check_address("192.168.1.1", host="images.internal")
    with pytest.raises(BlockedAddress):
        policy.check_address("192.168.1.1", host="other.internal")
    with pytest.raises(BlockedAddress, match="metadata"):
        policy.check_address("169.254.169.254", host="images.internal")


async def test_resolution_step_checks_literals_without_connecting(
    only_loopback: list[str],
) -> None:
    policy = AddressPolicy.create(allow_private=True)
    for host in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        with pytest.raises(BlockedAddress, match="metadata address"):
            await resolve_checked(host, 80, policy)
    assert await resolve_checked("127.0.0.1", 80, policy) == ["127.0.0.1"]
    async with Fetcher(settings(allow_private=True)) as fetcher:
        for url in (
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://[::ffff:169.254.169.254]/",
        ):
            assert "metadata address" in await fetch_error(fetcher, url)
    assert only_loopback == []


_any_ip = st.one_of(
    st.ip_addresses(v=4), st.ip_addresses(v=6), st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
)


@given(address=_any_ip)
def test_guard_never_lets_through_private_or_metadata(address: Any) -> None:
    ip = ipaddress.ip_address(str(address))
    judged = (ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None) or ip
    never = judged in METADATA_ADDRESSES or (judged.version == 4 and judged.is_link_local)
    for policy in (AddressPolicy.create(), AddressPolicy.create(allow_private=True)):
        try:
            policy.check_address(ip)
        except BlockedAddress as exc:
            assert str(ip) in exc.message
        else:
            assert not never
            if not policy.allow_private:
                assert judged.is_global and ip.is_global and not judged.is_multicast
    if never:
        with pytest.raises(BlockedAddress):
            AddressPolicy.create(
                allow_private=True, allow_hosts=("::/0", "0.0.0.0/0")
            ).check_address(ip)
