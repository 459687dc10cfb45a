"""One modelgate process against two, under many concurrent clients (part of `bench wire`).

modelgate presents itself as a mongos, so a driver given several modelgate processes in
one connection string (`mongodb://127.0.0.1:p1,127.0.0.1:p2/`) spreads its operations
over them. Here `clients` threads share one MongoClient and send `ping`s (forwarded to
the upstream like any command, the cheapest round trip there is) for a fixed time,
first through one process, then through both, taking turns round after round.

The CPU each process spends meanwhile (from /proc/PID/stat) and the machine's busy
share (from /proc/stat) say what limits the throughput: on a machine with few cores the
client's threads, the modelgate processes and the upstream all compete for them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness import median
from bench.support.processes import connect

__all__ = ["measure_scaling", "scaling_rows"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _run_clients(uri: str, clients: int, seconds: float) -> int:
    """Operations `clients` threads completed in `seconds` through one MongoClient."""
    client = connect(uri, maxPoolSize=clients)
    try:
        admin = client.admin
        ready = threading.Barrier(clients + 1)
        go = threading.Event()
        counts = [0] * clients
        deadline = 0.0

        def work(index: int) -> None:
            admin.command("ping")  # its pooled connection opened before the clock starts
            ready.wait()
            go.wait()
            done = 0
            while time.perf_counter() < deadline:
                admin.command("ping")
                done += 1
            counts[index] = done

        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        ready.wait()
        deadline = time.perf_counter() + seconds
        go.set()
        for thread in threads:
            thread.join()
        return sum(counts)
    finally:
        client.close()


def measure_scaling(
    uris: Mapping[str, str],
    pids: Mapping[str, Sequence[int]],
    *,
    clients: int,
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """ops/s of `clients` concurrent clients for each configuration in `uris` (the
    modelgate processes of each in `pids`), `rounds` runs of `seconds` each, the order
    rotating; and the CPU each used, in cores (CPU-seconds per second)."""
    names = list(uris)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            own = [_cpu_seconds(os.getpid()), *(_cpu_seconds(pid) for pid in pids[name])]
            busy, total = _machine_ticks()
            began = time.perf_counter()
            operations = _run_clients(uris[name], clients, seconds)
            elapsed = time.perf_counter() - began
            after_busy, after_total = _machine_ticks()
            spent = [
                (_cpu_seconds(pid) - before) / elapsed
                for pid, before in zip([os.getpid(), *pids[name]], own, strict=True)
            ]
            runs[name].append(
                {
                    "ops_per_s": operations / seconds,
                    "client_cores": spent[0],
                    "modelgate_cores": spent[1:],
                    "machine_busy": (after_busy - busy) / max(after_total - total, 1),
                }
            )
    results: dict[str, Any] = {"clients": clients, "seconds": seconds, "rounds": rounds}
    for name, samples in runs.items():
        results[name] = {
            "runs": samples,
            "ops_per_s": median([run["ops_per_s"] for run in samples]),
            "client_cores": median([run["client_cores"] for run in samples]),
            "modelgate_cores": median([sum(run["modelgate_cores"]) for run in samples]),
            "machine_busy": median([run["machine_busy"] for run in samples]),
        }
    return results


def scaling_rows(scaling: Mapping[str, Any]) -> list[list[object]]:
    """Report rows: configuration, ops/s, the CPU of client and modelgate, machine busy."""
    return [
        [
            name,
            result["ops_per_s"],
            result["client_cores"],
            result["modelgate_cores"],
            result["machine_busy"] * 100,
        ]
        for name, result in scaling.items()
        if isinstance(result, dict)
    ]
