"""The wire front's Prometheus metrics: connections, requests, bytes, the latency
modelgate adds, the upstream's connections and slow requests.

Every request moves several of these, and a ping spends only about 85 µs in the proxy,
so they are plain integers on the event loop's thread (a prometheus_client child takes
a lock on each change, a few µs per request in all); the registry reads them through
`collect` when it is scraped.

Labels stay bounded whatever clients send: a command is labelled with its own name only
when it is one of MongoDB's commands or one of modelgate's admin commands, and "other"
otherwise. Counts are kept per known name only, so a client cannot grow them."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.metrics import decade_buckets

__all__ = ["MONGODB_COMMANDS", "CommandCounts", "LatencyHistogram", "ProxyMetrics"]

# MongoDB's commands as drivers and shells send them (aliases included: drivers differ
# in case for a few). Anything else is counted as "other".
MONGODB_COMMANDS = frozenset(
    {
        "abortTransaction",
        "aggregate",
        "authenticate",
        "buildInfo",
        "buildinfo",
        "bulkWrite",
        "collMod",
        "collStats",
        "commitTransaction",
        "connectionStatus",
        "count",
        "create",
        "createIndexes",
        "createRole",
        "createSearchIndexes",
        "createUser",
        "currentOp",
        "dbStats",
        "delete",
        "distinct",
        "drop",
        "dropDatabase",
        "dropIndexes",
        "dropRole",
        "dropSearchIndex",
        "dropUser",
        "endSessions",
        "explain",
        "find",
        "findAndModify",
        "findandmodify",
        "getCmdLineOpts",
        "getLog",
        "getMore",
        "getParameter",
        "grantRolesToUser",
        "hello",
        "hostInfo",
        "insert",
        "isMaster",
        "ismaster",
        "killAllSessions",
        "killCursors",
        "killOp",
        "killSessions",
        "listCollections",
        "listDatabases",
        "listIndexes",
        "listSearchIndexes",
        "logout",
        "ping",
        "refreshSessions",
        "renameCollection",
        "replSetGetStatus",
        "revokeRolesFromUser",
        "rolesInfo",
        "saslContinue",
        "saslStart",
        "serverStatus",
        "startSession",
        "update",
        "updateSearchIndex",
        "updateUser",
        "usersInfo",
        "validate",
        "whatsmyuri",
    }
)

OTHER_COMMAND = "other"

# From a fraction of the ~85 µs a ping spends in the proxy to an inline model's seconds.
_LATENCY_BUCKETS_S = decade_buckets(0.00005, 10.0)


class CommandCounts:
    """What the requests of one command label have counted."""

    __slots__ = ("label", "requests", "slow")

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests = 0
        self.slow = 0


class LatencyHistogram:
    """Durations in nanoseconds counted into Prometheus buckets (in seconds)."""

    def __init__(self, buckets_s: tuple[float, ...]) -> None:
        self.buckets_s = buckets_s
        self._bounds_ns = tuple(round(bound * 1e9) for bound in buckets_s)
        # One count per bucket (a duration counts in the first whose bound it does not
        # pass), plus one for those past every bound.
        self.counts = [0] * (len(buckets_s) + 1)
        self.sum_ns = 0

    def observe_ns(self, duration_ns: int) -> None:
        self.counts[bisect_left(self._bounds_ns, duration_ns)] += 1
        self.sum_ns += duration_ns

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = 0
        buckets = []
        for bound, count in zip((*map(str, self.buckets_s), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(
            name, documentation, buckets=buckets, sum_value=self.sum_ns / 1e9
        )


class ProxyMetrics:
    """The proxy's families, counted by the session and the listener and registered in
    `registry` (a fresh one when None: tests and embedders that do not export metrics
    still count, in a registry of their own).

    `admin_commands` are modelgate's own command names, labelled as themselves."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, admin_commands: Iterable[str] = ()
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.connections_open = 0
        self.connections_accepted = 0
        self.refused_upstream_unreachable = 0
        self.refused_tls_handshake = 0
        self.refused_max_connections = 0
        self.received_bytes = 0
        self.sent_bytes = 0
        self.added_latency = LatencyHistogram(_LATENCY_BUCKETS_S)
        self.upstream_connects = 0
        self.upstream_connect_errors = 0
        self.upstream_lost = 0
        # Read from the sessions' own tables at scrape time (the server that holds them
        # sets it), so that the gauge shows what is really kept: a record left behind
        # after its last reply shows as a request in flight.
        self.requests_in_flight: Callable[[], int] = lambda: 0
        self._known_commands = MONGODB_COMMANDS | frozenset(admin_commands)
        self._other = CommandCounts(OTHER_COMMAND)
        self._by_command: dict[str, CommandCounts] = {}
        self.registry.register(self)

    def for_command(self, name: str) -> CommandCounts:
        """The counts a request of command `name` moves."""
        counts = self._by_command.get(name)
        if counts is None:
            if name not in self._known_commands:
                return self._other
            counts = self._by_command[name] = CommandCounts(name)
        return counts

    def describe(self) -> Iterator[Metric]:
        # The registry checks the names for clashes when the collector is registered.
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "modelgate_connections_open", "Client connections open now.", self.connections_open
        )
        yield GaugeMetricFamily(
            "modelgate_requests_in_flight",
            "Client requests owed a reply now, over every connection (an exhaust stream "
            "counts once; so does a monitor's awaitable hello, waiting upstream by design).",
            self.requests_in_flight(),
        )
        yield CounterMetricFamily(
            "modelgate_connections_accepted",
            "Client connections accepted.",
            self.connections_accepted,
        )
        refused = CounterMetricFamily(
            "modelgate_connections_refused",
            "Client connections closed before serving a request, by reason.",
            labels=["reason"],
        )
        refused.add_metric(["upstream_unreachable"], self.refused_upstream_unreachable)
        refused.add_metric(["tls_handshake"], self.refused_tls_handshake)
        refused.add_metric(["max_connections"], self.refused_max_connections)
        yield refused
        requests = CounterMetricFamily(
            "modelgate_requests",
            "Client requests, by command (a known command name, else 'other').",
            labels=["command"],
        )
        slow = CounterMetricFamily(
            "modelgate_slow_requests",
            "Client requests whose round trip through modelgate passed --slow-ms, by command.",
            labels=["command"],
        )
        for counts in (*self._by_command.values(), self._other):
            requests.add_metric([counts.label], counts.requests)
            slow.add_metric([counts.label], counts.slow)
        yield requests
        yield slow
        yield CounterMetricFamily(
            "modelgate_received_bytes", "Bytes received from clients.", self.received_bytes
        )
        yield CounterMetricFamily("modelgate_sent_bytes", "Bytes sent to clients.", self.sent_bytes)
        yield self.added_latency.family(
            "modelgate_added_latency_seconds",
            "Time modelgate adds to a request's round trip (inline inference included): "
            "the round trip less the upstream's share.",
        )
        yield CounterMetricFamily(
            "modelgate_upstream_connects",
            "Connections opened to the upstream for clients.",
            self.upstream_connects,
        )
        upstream_errors = CounterMetricFamily(
            "modelgate_upstream_errors",
            "Upstream connections that could not be opened (connect) or ended under a "
            "client (lost).",
            labels=["kind"],
        )
        upstream_errors.add_metric(["connect"], self.upstream_connect_errors)
        upstream_errors.add_metric(["lost"], self.upstream_lost)
        yield upstream_errors
