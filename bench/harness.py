"""Shared pieces of the benchmarks: the timing and the output.

Every benchmark (`wire`, `inline`, `deferred`, `images`, `cache`) compares the same
work done straight against the upstream (or plain onnxruntime) and through modelgate.
`bench.support.processes` starts both ends; this module times callables with the two
targets alternating or taking turns in blocks, and prints a table, writes JSON with
the machine's description and draws the table as a PNG (`bench.plots`).

Typical use::

    with bench_stack(args.upstream, proxy_args=("--data-dir", tmp)) as stack:
        with connect(stack.direct_uri) as direct, connect(stack.proxy_uri) as proxied:
            times = run_alternating(
                {"direct": lambda: work(direct), "proxy": lambda: work(proxied)},
                iterations=5,
                setup=lambda target: direct.drop_database("bench"),
            )
    print(format_table(["task", "median ms"], rows))
    write_json(path, {"benchmark": "mine", "results": ...})
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pymongo

from bench.support.processes import BenchError
from engine.stats import percentile

__all__ = [
    "MB",
    "add_common_arguments",
    "format_table",
    "latency_samples",
    "machine_info",
    "mb_per_s",
    "median",
    "run_alternating",
    "run_interleaved",
    "summarize",
    "write_json",
]

#: The benchmarking spec's megabyte: 1,000,000 bytes.
MB = 1_000_000


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `finally` blocks stop the child processes."""

    def _handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)


def add_common_arguments(
    parser: argparse.ArgumentParser, *, quick: str, database: str | None
) -> None:
    """--quick, --json, --plot and, for a benchmark that writes to MongoDB (in
    `database`), --upstream: the same in every benchmark."""
    parser.add_argument("--quick", action="store_true", help=f"a short run: {quick}")
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="write every number and the machine's description as JSON to PATH",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="draw what the table shows as a PNG at PATH (needs matplotlib: the plot extra)",
    )
    if database is not None:
        parser.add_argument(
            "--upstream",
            metavar="URI",
            help=f"MongoDB to use instead of an embedded in-memory SecantusDB "
            f"(the benchmark writes to its database {database!r})",
        )


def finish(
    name: str,
    args: Any,
    run: Callable[[Any], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """The end of every benchmark's main: run it, print its report, write --json and
    --plot. Exit status 1 when it could not be set up, 2 when --plot cannot be drawn
    here (checked before a possibly long run), 130 when interrupted."""
    _exit_on_sigterm()
    if args.plot:
        try:
            from bench.plots import write_plot
        except ImportError as exc:
            print(f"bench {name}: --plot needs matplotlib (the plot extra): {exc}", file=sys.stderr)
            return 2
    try:
        payload = run(args)
    except BenchError as exc:
        print(f"bench {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(report(payload))
    if args.json:
        print(f"\nwrote {write_json(args.json, payload)}")
    if args.plot:
        print(f"wrote {write_plot(payload, args.plot)}")
    return 0


# --------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mb_per_s(size_bytes: float, seconds: float) -> float:
    """The spec's score: dataset size in MB (10^6 bytes) over the (median) time."""
    return size_bytes / MB / seconds if seconds > 0 else float("inf")


def summarize(samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """n, min, p50, p90, p99, max and mean of `samples`, each multiplied by `scale`."""
    return {
        "n": len(samples),
        "min": min(samples) * scale,
        "p50": percentile(samples, 50) * scale,
        "p90": percentile(samples, 90) * scale,
        "p99": percentile(samples, 99) * scale,
        "max": max(samples) * scale,
        "mean": statistics.fmean(samples) * scale,
    }


def run_alternating(
    targets: Mapping[str, Callable[[], object]],
    *,
    iterations: int,
    warmup: int = 1,
    setup: Callable[[str], object] | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Time `targets[name]()` for each target, alternating, `iterations` times each.

    `setup(name)` runs untimed before every call (warm-up included). The order of the
    targets rotates from one iteration to the next so that neither always runs on a
    cooler or warmer machine. Warm-up calls are not returned. With `budget_s`, stop
    after the first full round in which the timed calls together passed the budget.
    Returns the durations in seconds per target."""
    names = list(targets)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            if setup is not None:
                setup(name)
            targets[name]()
    spent = 0.0
    for index in range(iterations):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup(name)
            start = time.perf_counter()
            targets[name]()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if budget_s is not None and spent > budget_s:
            break
    return times


def run_interleaved(
    targets: Mapping[str, Callable[[int], object]],
    ops: int,
    *,
    iterations: int,
    block: int = 100,
    setup: Callable[[str], object] | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Time `targets[name](i)` for i in range(ops), per target and iteration, in blocks of
    `block` calls that take turns between the targets (the order rotating each turn).

    For one-operation-at-a-time work: an upstream whose speed drifts while the run goes
    on (SecantusDB slows as writes accumulate) then slows every target alike, where
    whole runs one after the other would charge the drift to whichever ran later.
    `setup(name)` runs untimed before every iteration; a warm-up block per target comes
    first. Returns per target the total seconds of each iteration's `ops` calls."""
    names = list(targets)
    for name in names:
        if setup is not None:
            setup(name)
        for i in range(min(block, ops)):
            targets[name](i)
    times: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    spent = 0.0
    for _ in range(iterations):
        if setup is not None:
            for name in names:
                setup(name)
        totals = dict.fromkeys(names, 0.0)
        for start in range(0, ops, block):
            shift = turn % len(names)
            turn += 1
            for name in names[shift:] + names[:shift]:
                call = targets[name]
                began = time.perf_counter()
                for i in range(start, min(start + block, ops)):
                    call(i)
                totals[name] += time.perf_counter() - began
        for name in names:
            times[name].append(totals[name])
        spent += sum(totals.values())
        if budget_s is not None and spent > budget_s:
            break
    return times


def latency_samples(
    targets: Mapping[str, Callable[[], object]], count: int, *, block: int = 100, warmup: int = 50
) -> dict[str, list[float]]:
    """Per-call latency in seconds of `count` sequential calls per target, the targets
    interleaved in blocks of `block` calls so that both see the same machine state."""
    names = list(targets)
    for name in names:
        for _ in range(warmup):
            targets[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    done = 0
    while done < count:
        size = min(block, count - done)
        for name in names:
            call, out = targets[name], samples[name]
            for _ in range(size):
                start = clock()
                call()
                out.append((clock() - start) / 1e9)
        done += size
    return samples


# --------------------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pymongo": pymongo.version,
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    return info


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    floatfmt: str | Sequence[str] = ".2f",
) -> str:
    """A plain-text table: text left-aligned, numbers right-aligned, floats formatted
    with `floatfmt` (one format, or one per column), None shown as "-"."""
    formats = [floatfmt] * len(headers) if isinstance(floatfmt, str) else list(floatfmt)

    def cell(value: object, column: int) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return format(value, formats[column])
        return str(value)

    text_rows = [[cell(value, i) for i, value in enumerate(row)] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) if rows else False
        for i in range(len(headers))
    ]
    widths = [
        max([len(headers[i]), *(len(row[i]) for row in text_rows)]) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(widths[i]) if numeric[i] else value.ljust(widths[i])
            for i, value in enumerate(values)
        ).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), separator, *(line(row) for row in text_rows)])


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` (with a `machine` entry added when missing) as indented JSON,
    creating parent folders."""
    path = Path(path)
    document = dict(payload)
    document.setdefault("machine", machine_info())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
    return path
