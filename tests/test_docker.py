"""The docker/ files, checked offline (Docker itself is not needed): the compose file and
its `monitoring` profile, Prometheus' scrape target, Grafana's provisioning, and a
dashboard whose every PromQL expression names only metric families modelgate exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.support.processes import ROOT

DOCKER = ROOT / "docker"
GRAFANA = DOCKER / "grafana"
METRICS_PORT = 9216

#: The agreed metric families (issue 11, and issue 10's search families), as Prometheus
#: exposes them: counters with `_total`, histograms as `_bucket`, `_sum` and `_count`.
COUNTERS = (
    "modelgate_predictions",
    "modelgate_prediction_errors",
    "modelgate_deferred_lease_takeovers",
    "modelgate_deferred_duplicates",
    "modelgate_image_fetches",
    "modelgate_image_fetch_errors",
    "modelgate_image_cache_hits",
    "modelgate_image_cache_misses",
    "modelgate_connections_accepted",
    "modelgate_connections_refused",
    "modelgate_requests",
    "modelgate_received_bytes",
    "modelgate_sent_bytes",
    "modelgate_upstream_connects",
    "modelgate_upstream_errors",
    "modelgate_slow_requests",
    "modelgate_search_queries",
    "modelgate_search_upkeep_errors",
)
GAUGES = (
    "modelgate_model_info",
    "modelgate_deferred_pending",
    "modelgate_deferred_in_progress",
    "modelgate_deferred_failed",
    "modelgate_image_cache_bytes",
    "modelgate_connections_open",
    "modelgate_search_documents_indexed",
    "modelgate_search_documents_pending",
    "modelgate_search_documents_failed",
)
HISTOGRAMS = (
    "modelgate_batch_size",
    "modelgate_inference_seconds",
    "modelgate_queue_wait_seconds",
    "modelgate_deferred_lag_seconds",
    "modelgate_added_latency_seconds",
    "modelgate_search_query_seconds",
    "modelgate_search_build_seconds",
)
AGREED_SERIES = frozenset(
    [f"{name}_total" for name in COUNTERS]
    + list(GAUGES)
    + [f"{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")]
)
METRIC_NAME = re.compile(r"\bmodelgate_[a-z_]+\b")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((GRAFANA / "dashboards" / "modelgate.json").read_text())
    return document


def _queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        yield query["query"] if isinstance(query, dict) else query


def _series_used() -> set[str]:
    return {name for query in _queries(_dashboard()) for name in METRIC_NAME.findall(query)}


def test_compose_file_has_the_monitoring_profile() -> None:
    compose = _yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"mongo", "modelgate", "prometheus", "grafana"}
    # The default `up` starts MongoDB and modelgate only.
    assert "profiles" not in services["mongo"] and "profiles" not in services["modelgate"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert services[name]["restart"] == "unless-stopped", name
    modelgate = services["modelgate"]
    assert modelgate["environment"]["MODELGATE_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}"
    assert str(METRICS_PORT) in modelgate["expose"]
    assert f"127.0.0.1:{METRICS_PORT}:{METRICS_PORT}" in modelgate["ports"]
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]
    assert services["prometheus"]["depends_on"] == ["modelgate"]
    assert services["grafana"]["depends_on"] == ["prometheus"]
    assert {"prometheus-data", "grafana-data", "mongo-data", "modelgate-data"} <= set(
        compose["volumes"]
    )


def test_compose_mounts_files_that_exist() -> None:
    services = _yaml(DOCKER / "compose.yaml")["services"]
    mounts = {
        volume.split(":")[1]: volume.split(":")[0]
        for name in ("prometheus", "grafana")
        for volume in services[name]["volumes"]
        if volume.startswith("./")
    }
    assert mounts == {
        "/etc/prometheus/prometheus.yml": "./prometheus.yml",
        "/etc/grafana/provisioning": "./grafana/provisioning",
        "/etc/grafana/dashboards": "./grafana/dashboards",
    }
    for source in mounts.values():
        assert (DOCKER / source).exists(), source  # relative to the compose file
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()


def test_prometheus_scrapes_modelgates_metrics_listener() -> None:
    config = _yaml(DOCKER / "prometheus.yml")
    [job] = config["scrape_configs"]
    assert job["job_name"] == "modelgate" and job["metrics_path"] == "/metrics"
    [static] = job["static_configs"]
    assert static["targets"] == [f"modelgate:{METRICS_PORT}"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    [source] = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = _yaml(GRAFANA / "provisioning" / "dashboards" / "modelgate.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = _dashboard()
    uses = {
        json.dumps(item["datasource"], sort_keys=True)
        for panel in dashboard["panels"]
        for item in (panel, *panel["targets"])
    }
    assert uses == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}


def test_dashboard_panels_are_complete() -> None:
    panels = _dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["title"] and panel["targets"], panel["id"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
    # The panels the issue asks for: traffic, added latency, predictions and errors per
    # model, deferred lag, cache hit rate.
    assert {
        "modelgate_requests_total",
        "modelgate_added_latency_seconds_bucket",
        "modelgate_predictions_total",
        "modelgate_prediction_errors_total",
        "modelgate_deferred_lag_seconds_bucket",
        "modelgate_image_cache_hits_total",
        "modelgate_image_cache_misses_total",
    } <= _series_used()


def test_dashboard_names_only_agreed_metric_families() -> None:
    unknown = _series_used() - AGREED_SERIES
    assert not unknown, sorted(unknown)
    for query in _queries(_dashboard()):
        if "histogram_quantile" in query:
            assert "_bucket" in query and "le" in query, query


def _exported_series() -> set[str]:
    """The series names the engine's and the proxy's metric families expose."""
    from prometheus_client import CollectorRegistry

    engine_metrics = pytest.importorskip("engine.metrics")
    proxy_metrics = pytest.importorskip("proxy.metrics")
    registry = CollectorRegistry()
    engine_metrics.EngineMetrics(registry)
    proxy_metrics.ProxyMetrics(registry)
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_agreed_families_are_the_ones_exported() -> None:
    exported = _exported_series()
    assert not AGREED_SERIES - exported, sorted(AGREED_SERIES - exported)
    assert not _series_used() - exported
