"""No leak per reply: a long exhaust stream through modelgate leaves nothing behind.

A session keeps one record per request owed a reply, removed after its last reply
(proxy.session); an exhaust cursor is one request with a reply per batch, a monitor's
streaming hello one request with a reply per heartbeat. Both run here for long enough
that anything kept per reply would show: in the requests-in-flight gauge, which reads
the sessions' tables themselves, and in the process's resident memory.

The replies are transformed on the way (the client asks for zlib, which the embedded
upstream does not speak, so modelgate compresses each reply itself), so the path that
rewrites replies is the one measured. Nothing here depends on the machine's speed."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.support.processes import ProxyProcess
from proxy.embedded import free_port

Client = pymongo.MongoClient  # type: ignore[type-arg]

DOCUMENTS = 50_000
WARM_UP_DOCUMENTS = 10_000
# Measured growth is a few hundred kB at most. A record kept per reply (an object of
# its own and a table entry, a few hundred bytes) passes this well before 50,000
# replies; a bare table key left to a shared record (about 85 bytes) comes near it.
MAX_RSS_GROWTH_KB = 5 * 1024
# Each client's monitor keeps one awaitable hello waiting upstream, by design.
CLIENTS = 2


class MeteredProxy:
    """A modelgate process with its operations listener, and its resident memory."""

    def __init__(self, upstream_uri: str, tmp_path: Path) -> None:
        self.metrics_port = free_port()
        args = ("--data-dir", str(tmp_path / "data"))
        args += ("--metrics-listen", f"127.0.0.1:{self.metrics_port}")
        self.proxy = ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=args)

    def gauge(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == name:
                return float(family.samples[0].value)
        raise AssertionError(f"{name} is not exported")

    def rss_kb(self) -> int:
        assert self.proxy.process is not None
        for line in Path(f"/proc/{self.proxy.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")


@pytest.fixture
def metered(upstream_uri: str, tmp_path: Path) -> Iterator[MeteredProxy]:
    metered = MeteredProxy(upstream_uri, tmp_path)
    with metered.proxy:
        yield metered


def _monitored_client(uri: str) -> Client:
    # Streaming hellos at a short heartbeat: a reply through the proxy every 500 ms.
    return pymongo.MongoClient(
        uri, compressors="zlib", heartbeatFrequencyMS=500, serverMonitoringMode="stream"
    )


def _exhaust(client: Client, db_name: str, query: dict[str, Any]) -> Iterator[dict[str, Any]]:
    collection = client[db_name].docs
    return collection.find(query, cursor_type=pymongo.CursorType.EXHAUST, batch_size=1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_exhaust_stream_and_streaming_hello_leave_nothing_behind(
    metered: MeteredProxy, direct: Client, db_name: str
) -> None:
    for start in range(0, DOCUMENTS, 5_000):
        direct[db_name].docs.insert_many([{"_id": i, "n": i} for i in range(start, start + 5_000)])
    with _monitored_client(metered.proxy.uri) as client, _monitored_client(metered.proxy.uri):
        # The warm-up round: buffers, caches and the compressor reach their working size.
        warm_up = _exhaust(client, db_name, {"_id": {"$lt": WARM_UP_DOCUMENTS}})
        assert sum(1 for _ in warm_up) == WARM_UP_DOCUMENTS
        rss_before = metered.rss_kb()

        seen: set[int] = set()
        for document in _exhaust(client, db_name, {}):
            seen.add(document["_id"])
            if len(seen) == 1_000:
                # The stream is a request in flight while it runs: the gauge reads the
                # sessions' tables, it is not a counter that only ever reads 0.
                assert metered.gauge("modelgate_requests_in_flight") >= 1
        assert seen == set(range(DOCUMENTS))  # none lost, none twice
        rss_after = metered.rss_kb()
        print(f"proxy VmRSS: {rss_before} kB after the warm-up, {rss_after} kB after the run")

        # Only the monitors' awaitable hellos may still be waiting.
        assert metered.gauge("modelgate_requests_in_flight") <= CLIENTS
        assert rss_after - rss_before < MAX_RSS_GROWTH_KB, (rss_before, rss_after)
    # With the clients gone (their connections closed: the proxy learns it from the
    # sockets), nothing at all.
    deadline = time.monotonic() + 30
    while metered.gauge("modelgate_connections_open") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metered.gauge("modelgate_connections_open") == 0
    assert metered.gauge("modelgate_requests_in_flight") == 0
