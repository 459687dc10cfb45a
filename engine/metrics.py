"""The engine's Prometheus metrics: predictions, batching, deferred work, image fetch
and cache, local vector search indexes.

One EngineMetrics is made per process (proxy/app.py, on the process's one
CollectorRegistry) and passed to the components that count; a component made without
one gets a fresh EngineMetrics on a registry of its own, so nothing is ever counted on
prometheus_client's global registry.

Labels stay bounded: `model` is the name of a registered model, `index` the key of a
search index ("db.coll/name"), every other label takes its values from a fixed set
here. Per-model series are keyed by the model's name, not by a loaded version, so
counters keep counting when a model is registered again; dropping a model removes its
series (`forget_model`), dropping a search index removes its (`forget_search_index`).
Components take their children (`model`, `deferred`) while the model is served: a
series a late task updates after the drop belongs to a removed child and is never
exported again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "FETCH_ERROR_REASONS",
    "PREDICTION_ERROR_KINDS",
    "SEARCH_UPKEEP_ERROR_KINDS",
    "DeferredMetrics",
    "EngineMetrics",
    "FetchErrorReason",
    "ModelMetrics",
    "PredictionErrorKind",
    "SearchIndexMetrics",
    "SearchUpkeepErrorKind",
    "decade_buckets",
]

#: Why a document got no prediction: its input was unusable, its image could not be
#: fetched, the model run failed, or the model's output could not be turned into a value.
PredictionErrorKind = Literal["input", "fetch", "model", "output"]
PREDICTION_ERROR_KINDS: tuple[PredictionErrorKind, ...] = get_args(PredictionErrorKind)

#: Why an image fetch failed (engine/fetch.py maps each failure to one of these).
FetchErrorReason = Literal[
    "invalid_url",  # unparsable URL, or no host
    "scheme",  # not http(s), or file: while file URLs are off
    "blocked",  # the address guard refused the address
    "dns",  # the host name did not resolve
    "connect",  # connection refused or failed
    "timeout",
    "network",  # the connection broke mid-request
    "http_4xx",
    "http_5xx",
    "http",  # any other protocol-level failure
    "too_large",
    "redirects",  # too many, or a loop
    "file",  # a file: URL could not be read
]
FETCH_ERROR_REASONS: tuple[FetchErrorReason, ...] = get_args(FetchErrorReason)

#: What failed in keeping a local search index: its build from MongoDB, its change
#: stream, a sweep (full rescan), a refresh of documents written through the proxy,
#: saving it to disk, loading it from disk (then it is rebuilt).
SearchUpkeepErrorKind = Literal["build", "change_stream", "sweep", "refresh", "save", "load"]
SEARCH_UPKEEP_ERROR_KINDS: tuple[SearchUpkeepErrorKind, ...] = get_args(SearchUpkeepErrorKind)

# Items per run: powers of two up to the largest batch a spec sensibly declares.
_BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(11))


def decade_buckets(lowest: float, highest: float) -> tuple[float, ...]:
    """Histogram buckets 1, 2.5, 5 per decade from `lowest` to `highest` (seconds)."""
    buckets = []
    for exponent in range(-7, 5):
        for mantissa in (1.0, 2.5, 5.0):
            bound = round(mantissa * 10.0**exponent, 7)
            if lowest <= bound <= highest:
                buckets.append(bound)
    return tuple(buckets)


# From a sub-millisecond tiny model on CPU to a slow model on a loaded machine.
_RUN_SECONDS_BUCKETS = decade_buckets(0.0005, 10.0)
# Deferred lag: from a prompt change-stream wake-up to a backlog worked off for an hour.
# A vector search: from a small index's ANN query to an exact search of a large one.
_SEARCH_SECONDS_BUCKETS = decade_buckets(0.0001, 10.0)
# Building a local index: a handful of documents to millions.
_BUILD_SECONDS_BUCKETS = decade_buckets(0.01, 10000.0)
_LAG_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's prediction series (children of the EngineMetrics families)."""

    predictions: Counter
    errors: Mapping[PredictionErrorKind, Counter]
    batch_size: Histogram
    inference_seconds: Histogram
    queue_wait_seconds: Histogram


@dataclass(frozen=True)
class SearchIndexMetrics:
    """One search index's series (this process's local index of it)."""

    indexed: Gauge
    pending: Gauge
    failed: Gauge
    queries: Counter
    query_seconds: Histogram
    build_seconds: Histogram
    upkeep_errors: Mapping[SearchUpkeepErrorKind, Counter]


@dataclass(frozen=True)
class DeferredMetrics:
    """One deferred model's background-work series."""

    pending: Gauge
    in_progress: Gauge
    failed: Gauge
    lag_seconds: Histogram
    lease_takeovers: Counter
    duplicates: Counter


class EngineMetrics:
    """Every engine metric family, registered on `registry` (a fresh one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        model = ["model"]
        self.model_info = Gauge(
            "modelgate_model_info",
            "1 for the model version this process serves, with the execution provider in use",
            ["model", "version", "provider"],
            registry=r,
        )
        self.predictions = Counter(
            "modelgate_predictions", "Documents that got a prediction", model, registry=r
        )
        self.prediction_errors = Counter(
            "modelgate_prediction_errors",
            "Documents that got no prediction, by kind (input, fetch, model, output)",
            ["model", "kind"],
            registry=r,
        )
        self.batch_size = Histogram(
            "modelgate_batch_size",
            "Items per model run",
            model,
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "modelgate_inference_seconds",
            "Duration of one run of the model's session",
            model,
            buckets=_RUN_SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "modelgate_queue_wait_seconds",
            "Time from a prediction request to the start of the run that serves it",
            model,
            buckets=_RUN_SECONDS_BUCKETS,
            registry=r,
        )
        self.deferred_pending = Gauge(
            "modelgate_deferred_pending",
            "Documents waiting for the deferred model's prediction, as last counted here",
            model,
            registry=r,
        )
        self.deferred_in_progress = Gauge(
            "modelgate_deferred_in_progress",
            "Documents this process holds leases on and is predicting now",
            model,
            registry=r,
        )
        self.deferred_failed = Gauge(
            "modelgate_deferred_failed",
            "Documents with an error record from the served version, as last counted here",
            model,
            registry=r,
        )
        self.deferred_lag_seconds = Histogram(
            "modelgate_deferred_lag_seconds",
            "Time from a document's insert (its ObjectId's time; documents inserted since "
            "the served version was registered) to its deferred output being stored",
            model,
            buckets=_LAG_SECONDS_BUCKETS,
            registry=r,
        )
        self.deferred_lease_takeovers = Counter(
            "modelgate_deferred_lease_takeovers",
            "Expired leases of other holders taken over (their documents may be done twice)",
            model,
            registry=r,
        )
        self.deferred_duplicates = Counter(
            "modelgate_deferred_duplicates",
            "Predictions computed here that another process had stored first",
            model,
            registry=r,
        )
        self.image_fetches = Counter(
            "modelgate_image_fetches",
            "Image HTTP requests sent to the network (each retry and redirect counts)",
            registry=r,
        )
        self.image_fetch_errors = Counter(
            "modelgate_image_fetch_errors",
            "Image fetches that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.image_cache_hits = Counter(
            "modelgate_image_cache_hits", "Image cache lookups that found the URL", registry=r
        )
        self.image_cache_misses = Counter(
            "modelgate_image_cache_misses", "Image cache lookups that did not", registry=r
        )
        self.image_cache_bytes = Gauge(
            "modelgate_image_cache_bytes",
            "Bytes of image bodies in the cache (all processes sharing it), as last seen here",
            registry=r,
        )
        index = ["index"]
        self.search_documents_indexed = Gauge(
            "modelgate_search_documents_indexed",
            "Documents in this process's local index of the search index",
            index,
            registry=r,
        )
        self.search_documents_pending = Gauge(
            "modelgate_search_documents_pending",
            "Documents known changed and not yet applied to the local index (while it "
            "builds: documents not yet read)",
            index,
            registry=r,
        )
        self.search_documents_failed = Gauge(
            "modelgate_search_documents_failed",
            "Documents whose value at a vector path is no vector of the index's dimension",
            index,
            registry=r,
        )
        self.search_queries = Counter(
            "modelgate_search_queries", "$vectorSearch queries served", index, registry=r
        )
        self.search_query_seconds = Histogram(
            "modelgate_search_query_seconds",
            "Duration of a local index search (approximate or exact, with its filter)",
            index,
            buckets=_SEARCH_SECONDS_BUCKETS,
            registry=r,
        )
        self.search_build_seconds = Histogram(
            "modelgate_search_build_seconds",
            "Duration of a local index build from MongoDB",
            index,
            buckets=_BUILD_SECONDS_BUCKETS,
            registry=r,
        )
        self.search_upkeep_errors = Counter(
            "modelgate_search_upkeep_errors",
            "Failures keeping a local index, by kind (build, change_stream, sweep, refresh, "
            "save, load)",
            ["index", "kind"],
            registry=r,
        )
        self._per_index = (
            self.search_documents_indexed,
            self.search_documents_pending,
            self.search_documents_failed,
            self.search_queries,
            self.search_query_seconds,
            self.search_build_seconds,
            self.search_upkeep_errors,
        )
        self._per_model = (
            self.model_info,
            self.predictions,
            self.prediction_errors,
            self.batch_size,
            self.inference_seconds,
            self.queue_wait_seconds,
            self.deferred_pending,
            self.deferred_in_progress,
            self.deferred_failed,
            self.deferred_lag_seconds,
            self.deferred_lease_takeovers,
            self.deferred_duplicates,
        )
        for reason in FETCH_ERROR_REASONS:
            self.image_fetch_errors.labels(reason)  # every reason exported from the start

    def model(self, name: str) -> ModelMetrics:
        errors = {
            kind: self.prediction_errors.labels(name, kind) for kind in PREDICTION_ERROR_KINDS
        }
        return ModelMetrics(
            predictions=self.predictions.labels(name),
            errors=errors,
            batch_size=self.batch_size.labels(name),
            inference_seconds=self.inference_seconds.labels(name),
            queue_wait_seconds=self.queue_wait_seconds.labels(name),
        )

    def deferred(self, name: str) -> DeferredMetrics:
        return DeferredMetrics(
            pending=self.deferred_pending.labels(name),
            in_progress=self.deferred_in_progress.labels(name),
            failed=self.deferred_failed.labels(name),
            lag_seconds=self.deferred_lag_seconds.labels(name),
            lease_takeovers=self.deferred_lease_takeovers.labels(name),
            duplicates=self.deferred_duplicates.labels(name),
        )

    def serve_model(self, name: str, version: int, provider: str) -> None:
        """`name` is served at `version` on `provider`: its info series replaces the
        previous version's."""
        self.model_info.remove_by_labels({"model": name})
        self.model_info.labels(name, str(version), provider).set(1)

    def forget_model(self, name: str) -> None:
        """`name` was dropped: remove every series labelled with it."""
        for family in self._per_model:
            family.remove_by_labels({"model": name})

    def search_index(self, key: str) -> SearchIndexMetrics:
        """The series of the search index `key` ("db.coll/name")."""
        errors = {
            kind: self.search_upkeep_errors.labels(key, kind) for kind in SEARCH_UPKEEP_ERROR_KINDS
        }
        return SearchIndexMetrics(
            indexed=self.search_documents_indexed.labels(key),
            pending=self.search_documents_pending.labels(key),
            failed=self.search_documents_failed.labels(key),
            queries=self.search_queries.labels(key),
            query_seconds=self.search_query_seconds.labels(key),
            build_seconds=self.search_build_seconds.labels(key),
            upkeep_errors=errors,
        )

    def forget_search_index(self, key: str) -> None:
        """The search index `key` was dropped: remove every series labelled with it."""
        for family in self._per_index:
            family.remove_by_labels({"index": key})
