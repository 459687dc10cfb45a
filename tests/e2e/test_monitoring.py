"""Operating modelgate end to end: a real `modelgate serve` with --metrics-listen in front of
its own SecantusDB, real pymongo traffic, and the listener scraped over HTTP.

Counters are compared before and after the traffic that should move them, by the amount
it should move them. Nothing here depends on the machine's speed: the one slow request
is slow by construction (its image URL answers after a fixed delay)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bson
import pymongo
import pymongo.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.support.image_server import ImageServer
from bench.support.onnx_models import image_classifier, linear_classifier
from bench.support.processes import ProxyProcess
from proxy.embedded import EmbeddedUpstream, free_port

Client = pymongo.MongoClient  # type: ignore[type-arg]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Every family the operations guide documents (counters without their _total).
FAMILIES = {
    "modelgate_model_info",
    "modelgate_predictions",
    "modelgate_prediction_errors",
    "modelgate_batch_size",
    "modelgate_inference_seconds",
    "modelgate_queue_wait_seconds",
    "modelgate_deferred_pending",
    "modelgate_deferred_in_progress",
    "modelgate_deferred_failed",
    "modelgate_deferred_lag_seconds",
    "modelgate_deferred_lease_takeovers",
    "modelgate_deferred_duplicates",
    "modelgate_image_fetches",
    "modelgate_image_fetch_errors",
    "modelgate_image_cache_hits",
    "modelgate_image_cache_misses",
    "modelgate_image_cache_bytes",
    "modelgate_connections_open",
    "modelgate_requests_in_flight",
    "modelgate_connections_accepted",
    "modelgate_connections_refused",
    "modelgate_requests",
    "modelgate_received_bytes",
    "modelgate_sent_bytes",
    "modelgate_added_latency_seconds",
    "modelgate_upstream_connects",
    "modelgate_upstream_errors",
    # vector search (issue 10): per search index
    "modelgate_search_documents_indexed",
    "modelgate_search_documents_pending",
    "modelgate_search_documents_failed",
    "modelgate_search_queries",
    "modelgate_search_query_seconds",
    "modelgate_search_build_seconds",
    "modelgate_search_upkeep_errors",
    "modelgate_slow_requests",
}
LABELS = ["a", "b", "c"]
WHITE = (255, 255, 255)


# -- helpers -----------------------------------------------------------------------------


class Monitored:
    """A modelgate process with its operations listener on a port of its own."""

    def __init__(self, upstream_uri: str, tmp_path: Path, *args: str) -> None:
        self.metrics_port = free_port()
        flags = (
            "--data-dir", str(tmp_path / "data"),
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--registry-refresh", "0.5",
            "--fetch-allow-private",
            *args,
        )  # fmt: skip
        self.proxy = ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=flags)

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def families(self) -> set[str]:
        status, text = self.get("/metrics")
        assert status == 200
        return {family.name for family in text_string_to_metric_families(text)}

    def scrape(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a series not (or no longer) exported."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series_with(samples: Samples, label: str, label_value: str) -> list[str]:
    return sorted(name for name, labels in samples if (label, label_value) in labels)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def register(client: Client, name: str, namespace: str, **fields: Any) -> None:
    command = {
        "registerModel": name,
        "collection": namespace,
        "input": "x",
        "mode": "inline",
        "onError": "record",
        "onnx": bson.Binary(linear_classifier()),
        "postprocess": {"kind": "classify", "labels": LABELS},
        **fields,
    }
    client.admin.command(command)


def register_image_model(client: Client, name: str, namespace: str) -> None:
    register(
        client,
        name,
        namespace,
        input="img",
        onnx=bson.Binary(image_classifier(channels=1, size=(28, 28))),
        preprocess={"kind": "image", "size": [28, 28], "mode": "L"},
        postprocess={"kind": "classify", "labels": ["black", "white"]},
    )


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    with ImageServer(slow_seconds=1.0) as server:
        server.add_png("white", size=(28, 28), color=WHITE)
        yield server


# -- tests -------------------------------------------------------------------------------


def test_metrics_follow_real_traffic(
    own_upstream: EmbeddedUpstream, image_server: ImageServer, tmp_path: Path
) -> None:
    monitored = Monitored(own_upstream.uri, tmp_path)
    with monitored.proxy as proxy, pymongo.MongoClient(proxy.uri) as client:
        assert monitored.families() >= FAMILIES
        db = client.shop

        # Wire: requests by command, bytes both ways, the latency modelgate adds.
        before = monitored.scrape()
        for _ in range(5):
            client.admin.command("ping")
        after = monitored.scrape()
        assert moved(before, after, "modelgate_requests_total", command="ping") == 5
        for name in (
            "modelgate_added_latency_seconds_count",
            "modelgate_received_bytes_total",
            "modelgate_sent_bytes_total",
        ):
            assert moved(before, after, name) >= 5, name
        assert value(after, "modelgate_connections_open") >= 1
        assert value(after, "modelgate_connections_accepted_total") >= 1
        assert value(after, "modelgate_upstream_connects_total") >= 1

        # Inline: three predictions and one input error; a new version keeps counting.
        register(client, "lin", "shop.inline")
        db.inline.insert_many([{"x": [1, 0, 0, 0]}, {"x": [0, 1, 0, 0]}, {"x": [0, 0, 1, 0]}])
        db.inline.insert_one({"x": "not numbers"})
        samples = monitored.scrape()
        assert value(samples, "modelgate_predictions_total", model="lin") == 3
        assert value(samples, "modelgate_prediction_errors_total", model="lin", kind="input") == 1
        assert value(samples, "modelgate_batch_size_sum", model="lin") == 3
        assert value(samples, "modelgate_inference_seconds_count", model="lin") >= 1
        assert value(samples, "modelgate_queue_wait_seconds_count", model="lin") >= 1
        [info] = [key for key in samples if key[0] == "modelgate_model_info"]
        assert dict(info[1])["model"] == "lin" and dict(info[1])["version"] == "1"
        assert dict(info[1])["provider"].endswith("ExecutionProvider")

        register(client, "lin", "shop.inline")
        db.inline.insert_one({"x": [0, 0, 0, 1]})
        samples = monitored.scrape()
        assert value(samples, "modelgate_predictions_total", model="lin") == 4
        versions = [dict(key[1])["version"] for key in samples if key[0] == "modelgate_model_info"]
        assert versions == ["2"]

        # Deferred: four documents predicted in the background, each with its lag.
        register(client, "later", "shop.deferred", mode="deferred")
        db.deferred.insert_many([{"x": [1, 0, 0, 0]} for _ in range(4)])
        lags = "modelgate_deferred_lag_seconds_count"
        wait_until(
            lambda: value(monitored.scrape(), lags, model="later") == 4, "four lags observed"
        )
        samples = monitored.scrape()
        assert value(samples, "modelgate_predictions_total", model="later") == 4
        assert value(samples, "modelgate_deferred_duplicates_total", model="later") == 0

        # Image URLs: one fetch for two documents, the second a cache hit; a 404 is a
        # fetch error of the model and of the fetcher.
        register_image_model(client, "pic", "shop.images")
        before = monitored.scrape()
        white = image_server.url("/img/white.png")
        db.images.insert_one({"img": white})
        db.images.insert_one({"img": white})
        db.images.insert_one({"img": image_server.url("/404")})
        after = monitored.scrape()
        assert image_server.count("/img/white.png") == 1
        assert moved(before, after, "modelgate_image_fetches_total") == 2  # white.png, /404
        assert moved(before, after, "modelgate_image_cache_hits_total") >= 1
        assert moved(before, after, "modelgate_image_cache_misses_total") >= 1
        assert value(after, "modelgate_image_cache_bytes") > 0
        assert moved(before, after, "modelgate_predictions_total", model="pic") == 2
        errors = "modelgate_prediction_errors_total"
        assert moved(before, after, errors, model="pic", kind="fetch") == 1
        assert moved(before, after, "modelgate_image_fetch_errors_total", reason="http_4xx") == 1
        fetch_errors = [key for key in after if key[0] == "modelgate_image_fetch_errors_total"]
        assert sum(after[key] - before.get(key, 0.0) for key in fetch_errors) == 1

        # A dropped model's series go.
        client.admin.command({"dropModel": "lin"})
        assert series_with(monitored.scrape(), "model", "lin") == []
        assert series_with(monitored.scrape(), "model", "pic") != []


def test_readyz_follows_the_upstream(own_upstream: EmbeddedUpstream, tmp_path: Path) -> None:
    monitored = Monitored(own_upstream.uri, tmp_path, "--connect-timeout", "1")
    with monitored.proxy:
        assert monitored.get("/healthz") == (200, "ok\n")
        wait_until(lambda: monitored.get("/readyz")[0] == 200, "ready")

        own_upstream.kill()
        _, body = wait_until(
            lambda: (answer := monitored.get("/readyz"))[0] == 503 and answer, "not ready"
        )
        assert body.startswith("not ready: upstream unreachable"), body
        assert monitored.get("/healthz") == (200, "ok\n")  # alive all the same
        before = monitored.scrape()
        with (
            pymongo.MongoClient(monitored.proxy.uri, serverSelectionTimeoutMS=2000) as client,
            pytest.raises(pymongo.errors.PyMongoError),
        ):
            client.admin.command("ping")
        after = monitored.scrape()
        for name, labels in (
            ("modelgate_upstream_errors_total", {"kind": "connect"}),
            ("modelgate_connections_refused_total", {"reason": "upstream_unreachable"}),
        ):
            assert moved(before, after, name, **labels) >= 1, name

        # Same port, fresh data: ready again without a restart.
        own_upstream.start()
        wait_until(lambda: monitored.get("/readyz") == (200, "ready\n"), "ready again")


def test_json_logs_and_the_slow_request_log(
    own_upstream: EmbeddedUpstream, image_server: ImageServer, tmp_path: Path
) -> None:
    # The image answers after 1 s: the insert that fetches it is over --slow-ms by
    # construction, on any machine.
    args = ("--log-format", "json", "--slow-ms", "500", "--log-level", "INFO")
    monitored = Monitored(own_upstream.uri, tmp_path, *args)
    with monitored.proxy as proxy, pymongo.MongoClient(proxy.uri) as client:
        register_image_model(client, "pic", "shop.slow")
        before = monitored.scrape()
        client.shop.slow.insert_one({"img": image_server.url("/slow")})
        after = monitored.scrape()
        assert moved(before, after, "modelgate_slow_requests_total", command="insert") == 1
        log_text = proxy.log_text()

    entries = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    [slow] = [e for e in entries if e.get("command") == "insert" and "duration_ms" in e]
    assert slow["namespace"] == "shop.slow" and slow["level"] == "WARNING"
    assert slow["duration_ms"] >= 1000
    assert "connection_id" in slow
    assert any("monitoring" in e["message"] and str(monitored.metrics_port) in e["message"]
               for e in entries)  # fmt: skip
