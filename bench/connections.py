"""`python -m bench connections`: what idle and slow connections cost the others.

One client pings modelgate in a loop, first alone (unloaded), then while the proxy
holds `--idle` connections that made one round trip each and went quiet, and `--slow`
clients send a frame one byte per second (loaded). Reported: the ping latency p50/p99
unloaded and loaded (the goal: loaded p50 within 2x of unloaded), how many slow clients
the frame timeout closed meanwhile (each reconnects and starts again), and the proxy's
resident memory per idle connection: VmRSS of the proxy process (/proc/PID/status)
before and after opening the idle connections, over their number. An idle connection
holds its client socket, its upstream connection and its session's tasks and buffers."""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import add_common_arguments, finish, format_table, machine_info, summarize
from bench.support.processes import BenchError, bench_stack, connect, redact_uri
from bench.support.raw_clients import SlowFrameSender, open_pinged_connection
from proxy.settings import positive

__all__ = ["main", "resident_bytes"]


@dataclass(frozen=True)
class Mode:
    idle: int
    slow: int
    ping_seconds: float  # of pinging, unloaded and loaded each


QUICK = Mode(idle=500, slow=20, ping_seconds=4.0)
# Loaded for longer than the default --frame-timeout (30 s), so that the slow clients
# are closed and come back while the pings go on.
FULL = Mode(idle=500, slow=20, ping_seconds=40.0)


def resident_bytes(pid: int) -> int:
    """The process's resident set size (VmRSS) from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS in /proc/{pid}/status (Linux only)")


def _ping_latencies(ping: Callable[[], object], seconds: float) -> list[float]:
    """Sequential pings for `seconds`; each one's round trip in seconds."""
    samples: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    while (start := clock()) < end:
        ping()
        samples.append(clock() - start)
    return samples


class _SlowClients:
    """`count` clients each sending a byte per second, in one thread; a client the proxy
    closes is counted and replaced."""

    def __init__(self, address: tuple[str, int], count: int) -> None:
        self.address = address
        self.senders = [SlowFrameSender(address) for _ in range(count)]
        self.closed_by_proxy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> _SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sender in self.senders:
            sender.close()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for index, sender in enumerate(self.senders):
                if not sender.step():
                    self.closed_by_proxy += 1
                    sender.close()
                    self.senders[index] = SlowFrameSender(self.address)


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = QUICK if args.quick else FULL
    idle = args.idle or mode.idle
    slow = mode.slow if args.slow is None else args.slow
    seconds = args.seconds or mode.ping_seconds
    with tempfile.TemporaryDirectory(prefix="modelgate-bench-") as tmp:
        proxy_args = ("--data-dir", tmp, "--max-connections", str(idle + slow + 100))
        with bench_stack(args.upstream, proxy_args=proxy_args) as stack:
            assert stack.proxy.process is not None
            pid = stack.proxy.process.pid
            address = ("127.0.0.1", stack.proxy.port)
            with connect(stack.proxy_uri, maxPoolSize=1) as client:

                def ping() -> object:
                    return client.admin.command("ping")

                _ping_latencies(ping, 1.0)  # warm-up
                unloaded = _ping_latencies(ping, seconds)
                rss_before = resident_bytes(pid)
                sockets = [open_pinged_connection(address) for _ in range(idle)]
                try:
                    time.sleep(1.0)  # let the proxy settle (freed buffers, tasks parked)
                    rss_after = resident_bytes(pid)
                    with _SlowClients(address, slow) as slow_clients:
                        loaded = _ping_latencies(ping, seconds)
                    closed_by_timeout = slow_clients.closed_by_proxy
                finally:
                    for sock in sockets:
                        sock.close()
    unloaded_ms, loaded_ms = summarize(unloaded, 1e3), summarize(loaded, 1e3)
    return {
        "benchmark": "connections",
        "machine": machine_info(),
        "quick": bool(args.quick),
        "upstream": redact_uri(args.upstream) if args.upstream else "embedded SecantusDB",
        "idle_connections": idle,
        "slow_clients": slow,
        "ping_seconds": seconds,
        "ping_ms": {"unloaded": unloaded_ms, "loaded": loaded_ms},
        "loaded_p50_ratio": loaded_ms["p50"] / unloaded_ms["p50"],
        "slow_clients_closed_by_frame_timeout": closed_by_timeout,
        "proxy_rss_bytes": {"before_idle": rss_before, "with_idle": rss_after},
        "rss_bytes_per_idle_connection": (rss_after - rss_before) / idle,
    }


def report(payload: dict[str, Any]) -> str:
    pings = payload["ping_ms"]
    rows = [
        [name, stats["n"], stats["p50"], stats["p99"]]
        for name, stats in (
            ("unloaded", pings["unloaded"]),
            (
                f"{payload['idle_connections']} idle + {payload['slow_clients']} slow",
                pings["loaded"],
            ),
        )
    ]
    rss = payload["proxy_rss_bytes"]
    return "\n".join(
        [
            format_table(["ping", "n", "p50 ms", "p99 ms"], rows, floatfmt=".3f"),
            "",
            f"loaded p50 / unloaded p50: {payload['loaded_p50_ratio']:.2f} (goal: under 2)",
            f"slow clients closed by the frame timeout: "
            f"{payload['slow_clients_closed_by_frame_timeout']}",
            f"proxy RSS: {rss['before_idle'] / 2**20:.1f} MiB before, "
            f"{rss['with_idle'] / 2**20:.1f} MiB with the idle connections: "
            f"{payload['rss_bytes_per_idle_connection'] / 1024:.1f} KiB per idle connection",
        ]
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench connections", description=__doc__)
    add_common_arguments(parser, quick=f"{QUICK.ping_seconds:g} s of pings each", database=None)
    parser.add_argument(
        "--upstream", metavar="URI", help="MongoDB to use instead of an embedded SecantusDB"
    )
    parser.add_argument("--idle", type=positive(int), help="idle connections (500)")
    parser.add_argument("--slow", type=int, help="clients sending a byte a second (20)")
    parser.add_argument(
        "--seconds", type=positive(float), help="of pings, unloaded and loaded each"
    )
    return finish("connections", parser.parse_args(argv), run, report)
