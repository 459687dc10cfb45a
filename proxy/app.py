"""Assembling and running the proxy: the services every session shares, the listener,
the operations listener (metrics and probes), and shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from typing import Any

import pymongo
import trio
from prometheus_client import CollectorRegistry, ProcessCollector

from engine.cache import ImageCache
from engine.deferred import DeferredWorkers
from engine.fetch import Fetcher
from engine.metrics import EngineMetrics
from engine.models import ModelSet
from engine.registry import ModelRegistry
from engine.search.catalog import SearchCatalog
from engine.search.upkeep import SearchIndexes
from proxy.commands import COMMANDS
from proxy.inline import InlineWrites
from proxy.metrics import ProxyMetrics
from proxy.monitoring import MonitoringServer, Readiness
from proxy.server import ProxyServer, listener_tls_context
from proxy.session import SessionServices
from proxy.settings import Settings, masked_uri
from proxy.upstream import UpstreamTarget
from proxy.vector_search import SearchWrites, VectorSearchStages

__all__ = ["run_proxy"]

log = logging.getLogger(__name__)


async def run_proxy(settings: Settings, upstream_uri: str) -> None:
    """Serve until SIGINT or SIGTERM, then shut down in two phases."""
    target = UpstreamTarget.from_uri(upstream_uri, settings.connect_timeout)
    # The proxy's own connection to the upstream (registry, deferred work), used from
    # worker threads; the credentials in the URI are the proxy's service account.
    own_client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        upstream_uri,
        appname="modelgate",
        connect=False,
        # Give up as promptly as client sessions do: a registry read stuck in server
        # selection (30 s by default) holds up shutdown while the upstream is away.
        serverSelectionTimeoutMS=max(1, int(settings.connect_timeout * 1000)),
    )
    # The process's one metrics registry, passed to whatever counts: prometheus_client's
    # global one stays unused, so that proxies run in one process never share series.
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_*: CPU, memory, open files
    engine_metrics = EngineMetrics(registry)
    cache = ImageCache(settings.image_cache_dir, settings.cache_size, metrics=engine_metrics)
    fetcher = Fetcher(settings.fetch, cache, metrics=engine_metrics)
    models = ModelSet(
        ModelRegistry(own_client), settings.runtime, image_source=fetcher, metrics=engine_metrics
    )
    deferred = DeferredWorkers(models, own_client, settings.deferred)
    # --search passthrough: no catalog, and the search commands and stages go upstream.
    catalog = search_indexes = search_stages = search_writes = None
    if settings.search_mode == "serve":
        catalog = SearchCatalog(own_client, models=models, prepare=deferred.prepare)
        # --no-change-streams holds for the vector indexes too.
        change_streams = settings.search.change_streams and settings.deferred.change_streams
        search_indexes = SearchIndexes(
            catalog,
            own_client,
            settings.search_index_dir,
            replace(settings.search, change_streams=change_streams),
            metrics=engine_metrics,
        )
        search_stages = VectorSearchStages(catalog, search_indexes, models)
        search_writes = SearchWrites(catalog, search_indexes)
    services = SessionServices(
        upstream=target,
        commands=COMMANDS,
        writes=InlineWrites(models, on_written=deferred.kick_namespace),
        models=models,
        deferred=deferred,
        metrics=ProxyMetrics(registry, admin_commands=COMMANDS),
        slow_ms=settings.slow_ms,
        model_sources=settings.model_sources,
        search_catalog=catalog,
        search_indexes=search_indexes,
        search=search_stages,
        search_writes=search_writes,
    )
    readiness = Readiness(own_client, models)
    tls_context = None
    if settings.tls_cert is not None:
        tls_context = listener_tls_context(settings.tls_cert, settings.tls_key or settings.tls_cert)
    host, port = settings.listen
    server = ProxyServer(
        services,
        host,
        port,
        tls_context,
        max_connections=settings.max_connections,
        frame_timeout=settings.frame_timeout,
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with fetcher, trio.open_nursery() as nursery:
            nursery.start_soon(models.refresh_forever, settings.registry_refresh)
            nursery.start_soon(deferred.run)
            if catalog is not None and search_indexes is not None:
                nursery.start_soon(catalog.refresh_forever, settings.registry_refresh)
                await nursery.start(search_indexes.run)
            addresses = await nursery.start(server.run)
            for address in addresses:
                log.info("modelgate listening on %s:%d", *address)
            log.info("upstream: %s", masked_uri(upstream_uri))
            if settings.metrics_listen is not None:
                monitoring = MonitoringServer(registry, readiness, *settings.metrics_listen)
                for address in await nursery.start(monitoring.run):
                    log.info("monitoring on http://%s:%d (/metrics, /healthz, /readyz)", *address)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                break
            readiness.stopping = True
            await server.shutdown(settings.grace_period)
            nursery.cancel_scope.cancel()
    own_client.close()
    cache.close()
    log.info("modelgate stopped")
