"""`python -m bench deferred`: how fast deferred predictions catch up, and their lag.

For each model (the digits CNN on 28x28 PNGs; ResNet-18 on 224x224 PNGs unless
--quick) and each number of modelgate processes sharing the collection (1 and 3):

  catch-up   N documents are inserted through modelgate as fast as possible; the time
             from the first insert to the last prediction stored gives documents/s.
             Compared with plain onnxruntime running the same model on the same PNGs
             (decode + preprocess with engine.inputs.image.preprocess_image_bytes, best
             batch size) in the same run.
  steady     documents are inserted at half the measured catch-up rate; each carries its
             insert time, and a poller (every --poll seconds) attributes the time it first
             sees the prediction: the lag p50/p99 (resolution: the poll interval).

Each catch-up (the loop's too) also gives the upstream's CPU seconds it took, inserts
included, read from /proc where the upstream is a SecantusDB process on this machine: on a
busy machine rates move with the load, the upstream's CPU much less.

Each (model, processes) cell gets a fresh upstream, so the cells do not share load.
The upstream's bookkeeping (leases, conditional writes) bounds the rate on SecantusDB;
point --upstream at a real MongoDB for that database's numbers."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import bson
import pymongo.uri_parser

from bench.deferred_loop import run_loop
from bench.harness import add_common_arguments, finish, format_table, machine_info
from bench.support.processes import BENCH_PROXY_ARGS, BenchError, ProxyProcess, connect, upstream
from engine.deferred import DeferredSettings
from engine.stats import percentile
from modelgate.admin import register_model

__all__ = ["main", "run"]

DB_NAME = "modelgate_bench_deferred"
INPUT_FIELD = "img"
MODEL_NAME = "bench_deferred"
OUTPUT = f"_outputs.{MODEL_NAME}"
DISTINCT_IMAGES = 256
INSERT_CHUNK = 500
# How often a catch-up looks at the counters (at most; --poll when shorter).
CATCH_UP_POLL = 0.1


@contextlib.contextmanager
def _cluster(
    upstream_uri: str | None, processes: int, proxy_args: Sequence[str], scratch: Path
) -> Iterator[tuple[str, list[ProxyProcess]]]:
    """A fresh upstream (unless one was given) and `processes` modelgate processes."""
    with upstream(upstream_uri) as uri, contextlib.ExitStack() as stack:
        proxies = []
        for index in range(processes):
            proxy = ProxyProcess(
                uri,
                scratch / f"modelgate-{processes}-{index}.log",
                args=(*BENCH_PROXY_ARGS, "--data-dir", str(scratch / f"data-{index}"), *proxy_args),
            )
            stack.enter_context(proxy)
            proxies.append(proxy)
        yield uri, proxies


def _register(client: Any, model: Any) -> None:
    register_model(
        client,
        MODEL_NAME,
        model=model.onnx,
        collection=f"{DB_NAME}.items",
        input=INPUT_FIELD,
        mode="deferred",
        preprocess=model.preprocess,
        postprocess=model.postprocess,
    )


def _documents(images: Sequence[bytes], start: int, count: int) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {"i": i, "t": now, INPUT_FIELD: bson.Binary(images[i % len(images)])}
        for i in range(start, start + count)
    ]


def insert_all(
    coll: Any,
    images: Sequence[bytes],
    total: int,
    after_chunk: Callable[[float], object] = lambda first: None,
) -> float:
    """Insert `total` documents in chunks, as fast as possible; the time of the first.
    `after_chunk(first)` runs after each chunk."""
    first = time.time()
    for start in range(0, total, INSERT_CHUNK):
        coll.insert_many(_documents(images, start, min(INSERT_CHUNK, total - start)))
        after_chunk(first)
    return first


def upstream_cpu_seconds(uri: str) -> float | None:
    """CPU seconds (user + system) the upstream process serving `uri` has used so far,
    read from /proc: a SecantusDB this machine runs (the embedded one, or one started by
    hand); None where there is no such process to read (a remote MongoDB, no /proc)."""
    port = str(pymongo.uri_parser.parse_uri(uri)["nodelist"][0][1])
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(b"secantusd" in part for part in command[:2]):
                continue
            if port.encode() not in command[command.index(b"--port") + 1 :][:1]:
                continue
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return None


def _cpu_since(uri: str, before: float | None) -> float | None:
    after = upstream_cpu_seconds(uri)
    return None if before is None or after is None else after - before


def _predicted(raw: Any) -> int:
    return int(raw.count_documents({f"{OUTPUT}.version": {"$exists": True}}))


class _Written:
    """Documents given an output so far, from the model's counters in modelgate's
    `deferred_stats` (one document read by `_id`): watching progress must not cost the
    upstream a count over the collection every poll (on SecantusDB that is a scan, 80 ms
    at 2,000 documents, which the hand-written loop, counting in its own process, does
    not pay)."""

    def __init__(self, direct: Any) -> None:
        self.stats = direct.modelgate.deferred_stats
        self.before = self._read()

    def _read(self) -> int:
        counters = self.stats.find_one({"_id": MODEL_NAME}) or {}
        return int(counters.get("done", 0)) + int(counters.get("failed", 0))

    def __call__(self) -> int:
        return self._read() - self.before


def _wait_all(
    written: _Written,
    raw: Any,
    total: int,
    timeout: float,
    poll: float,
    first: float,
    progress: list[list[float]],
) -> float:
    """Wait until `total` documents have a prediction; the time the last was seen.
    Each count is added to `progress` as [seconds since `first`, documents]."""
    deadline = time.monotonic() + timeout
    while True:
        done = written()
        progress.append([time.time() - first, done])
        # The counters say when; the documents themselves are counted once, to be sure.
        if done >= total and _predicted(raw) >= total:
            return progress[-1][0] + first
        if time.monotonic() > deadline:
            raise BenchError(f"predictions did not catch up in {timeout:.0f}s: {done}/{total}")
        time.sleep(poll)


def catch_up(
    proxy_uri: str,
    direct_uri: str,
    images: Sequence[bytes],
    total: int,
    poll: float,
    timeout: float,
) -> dict[str, Any]:
    with connect(proxy_uri) as proxied, connect(direct_uri) as direct:
        raw = direct[DB_NAME].items
        coll = proxied[DB_NAME].items
        written = _Written(direct)
        # Documents predicted over time, counted at most every `poll` seconds while
        # inserting too, so the curve shows the work starting before the inserts end.
        progress: list[list[float]] = [[0.0, 0]]

        def count(first: float) -> None:
            if time.time() - first - progress[-1][0] >= poll:
                progress.append([time.time() - first, written()])

        cpu_before = upstream_cpu_seconds(direct_uri)
        first = insert_all(coll, images, total, count)
        inserted = time.time()
        last = _wait_all(written, raw, total, timeout, poll, first, progress)
        upstream_cpu = _cpu_since(direct_uri, cpu_before)
        errors = raw.count_documents({f"{OUTPUT}.error": {"$exists": True}})
    seconds = last - first
    return {
        "documents": total,
        "insert_s": inserted - first,
        "catch_up_s": seconds,
        "documents_per_s": total / seconds,
        "errors": errors,
        # The upstream's CPU seconds over the catch-up, inserts included (None: unknown).
        "upstream_cpu_s": upstream_cpu,
        "progress": progress,
    }


def steady(
    proxy_uri: str,
    direct_uri: str,
    images: Sequence[bytes],
    rate: float,
    seconds: float,
    poll: float,
    timeout: float,
) -> dict[str, Any]:
    """Insert at `rate` documents/s for `seconds`; lag of each from insert to seen."""
    base = 10_000_000  # `i` of this phase's documents, apart from the catch-up's
    total = max(1, int(rate * seconds))
    lags: dict[int, float] = {}
    stop = threading.Event()

    def poller() -> None:
        with connect(direct_uri) as direct:
            raw = direct[DB_NAME].items
            low = base
            while not stop.is_set() or len(lags) < total:
                now = time.time()
                seen = raw.find(
                    {"i": {"$gte": low}, f"{OUTPUT}.version": {"$exists": True}}, {"i": 1, "t": 1}
                )
                for doc in seen:
                    lags.setdefault(doc["i"], now - doc["t"])
                while low in lags:
                    low += 1
                if stop.is_set() and time.monotonic() > deadline:
                    return
                time.sleep(poll)

    with connect(proxy_uri) as proxied, connect(direct_uri) as direct:
        direct[DB_NAME].items.create_index("i")
        coll = proxied[DB_NAME].items
        deadline = time.monotonic() + seconds + timeout
        thread = threading.Thread(target=poller, daemon=True)
        thread.start()
        started = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            if due > sent:
                coll.insert_many(_documents(images, base + sent, due - sent))
                sent = due
            time.sleep(0.05)
        stop.set()
        thread.join(timeout + seconds)
    values = sorted(lags.values())
    return {
        "rate_per_s": rate,
        "documents": total,
        "seen": len(values),
        "lag_s": {
            "p50": percentile(values, 50) if values else None,
            "p99": percentile(values, 99) if values else None,
            "max": values[-1] if values else None,
        },
        "poll_s": poll,
    }


def _loop(args: argparse.Namespace, model: Any, images: Sequence[bytes], docs: int) -> Any:
    """The hand-written loop's catch-up, on a fresh upstream (unless one was given)."""
    with upstream(args.upstream) as uri:
        cpu_before = upstream_cpu_seconds(uri)
        result = run_loop(
            uri,
            DB_NAME,
            model,
            INPUT_FIELD,
            docs,
            DeferredSettings().claim_size,
            partial(insert_all, images=images, total=docs),
            args.timeout,
        )
        result["upstream_cpu_s"] = _cpu_since(uri, cpu_before)
        return result


def _cell(
    args: argparse.Namespace,
    model: Any,
    images: Sequence[bytes],
    docs: int,
    processes: int,
    proxy_args: Sequence[str],
    scratch: Path,
    best: float,
) -> dict[str, Any]:
    """modelgate's catch-up (and steady lag) with `processes` processes."""
    with _cluster(args.upstream, processes, proxy_args, scratch) as (uri, proxies):
        with connect(proxies[0].uri) as admin_client:
            admin_client[DB_NAME].drop_collection("items")
            _register(admin_client, model)
            # Every process serves the model (modelStatus loads it there) and its worker
            # has made its first pass, so that the catch-up counts none of that.
            for proxy in proxies:
                with connect(proxy.uri) as one:
                    one.admin.command({"modelStatus": MODEL_NAME})
            time.sleep(1.5)
            # Progress is read from one counters document: polling it often costs little.
            poll = min(args.poll, CATCH_UP_POLL)
            fast = catch_up(proxies[0].uri, uri, images, docs, poll, args.timeout)
            admin_client[DB_NAME].drop_collection("items")
            slow = None
            if args.steady_seconds > 0:
                slow = steady(
                    proxies[0].uri,
                    uri,
                    images,
                    fast["documents_per_s"] / 2,
                    args.steady_seconds,
                    args.poll,
                    args.timeout,
                )
            status = admin_client.admin.command({"modelStatus": MODEL_NAME})
            admin_client.admin.command({"dropModel": MODEL_NAME})
    return {
        "processes": processes,
        "catch_up": fast,
        "ratio_to_baseline": fast["documents_per_s"] / best,
        "steady": slow,
        "duplicates": int(status.get("deferred", {}).get("duplicates", 0)),
    }


def _seconds(result: dict[str, Any]) -> str:
    cpu = result.get("upstream_cpu_s")
    return "unknown" if cpu is None else f"{cpu:.2f} s"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.models import build_model, noise_pngs
    from bench.onnx_baseline import measure_baseline

    models = (
        args.models.split(",")
        if args.models
        else (["digits"] if args.quick else ["digits", "resnet18"])
    )
    counts = [int(n) for n in args.processes.split(",")]
    proxy_args = ["--sweep-interval", str(args.sweep_interval), *(args.proxy_arg or [])]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deferred-") as tmp:
        scratch = Path(tmp)
        for name in models:
            model = build_model(name)
            docs = args.docs if name == "digits" else args.resnet_docs
            images = noise_pngs(min(DISTINCT_IMAGES, docs), model.image_size, model.image_mode)
            baseline = measure_baseline(
                model, images, ["CPUExecutionProvider"], budget_s=args.baseline_budget
            )
            best = baseline["best_e2e"]["images_per_s"]
            rounds = []
            for number in range(args.rounds):
                loop = _loop(args, model, images, docs)
                print(
                    f"{name}, round {number + 1}, hand-written loop: {docs} docs caught up at "
                    f"{loop['documents_per_s']:.1f}/s; upstream CPU {_seconds(loop)}",
                    file=sys.stderr,
                    flush=True,
                )
                cells = []
                for processes in counts:
                    cell = _cell(args, model, images, docs, processes, proxy_args, scratch, best)
                    cell["ratio_to_loop"] = (
                        cell["catch_up"]["documents_per_s"] / loop["documents_per_s"]
                    )
                    print(
                        f"{name}, round {number + 1}, {processes} process(es): {docs} docs "
                        f"caught up at {cell['catch_up']['documents_per_s']:.1f}/s "
                        f"({cell['ratio_to_loop']:.2f} of the loop; onnxruntime {best:.0f}/s); "
                        f"upstream CPU {_seconds(cell['catch_up'])}; "
                        f"steady lag {(cell['steady'] or {}).get('lag_s')}",
                        file=sys.stderr,
                        flush=True,
                    )
                    cells.append(cell)
                one = next((c for c in cells if c["processes"] == 1), None)
                for cell in cells:
                    # Scaling out: each cell's rate against one process's, in the same round.
                    cell["ratio_to_one_process"] = (
                        cell["catch_up"]["documents_per_s"] / one["catch_up"]["documents_per_s"]
                        if one
                        else None
                    )
                rounds.append({"loop": loop, "cells": cells})
            results.append(
                {
                    "model": model.describe(),
                    "baseline": baseline,
                    # The first round, as before rounds; every round in "rounds".
                    "loop": rounds[0]["loop"],
                    "cells": rounds[0]["cells"],
                    "rounds": rounds,
                }
            )
    return {
        "benchmark": "deferred",
        "quick": bool(args.quick),
        "upstream": "given" if args.upstream else "embedded SecantusDB (in memory)",
        "machine": machine_info(),
        "settings": {
            "sweep_interval": args.sweep_interval,
            "poll_s": args.poll,
            "rounds": args.rounds,
        },
        "models": results,
    }


def table(payload: dict[str, Any]) -> str:
    rows = []
    for result in payload["models"]:
        best = result["baseline"]["best_e2e"]
        rounds = result.get("rounds") or [{"loop": result["loop"], "cells": result["cells"]}]
        for number, one_round in enumerate(rounds, 1):
            for cell in one_round["cells"]:
                fast, slow = cell["catch_up"], cell["steady"] or {}
                lag = slow.get("lag_s", {})
                rows.append(
                    [
                        result["model"]["name"],
                        number,
                        cell["processes"],
                        fast["documents"],
                        fast["documents_per_s"],
                        best["images_per_s"],
                        best["batch"],
                        cell["ratio_to_baseline"],
                        one_round["loop"]["documents_per_s"],
                        one_round["loop"].get("upstream_cpu_s"),
                        fast.get("upstream_cpu_s"),
                        cell["ratio_to_loop"],
                        cell["ratio_to_one_process"],
                        slow.get("rate_per_s"),
                        lag.get("p50"),
                        lag.get("p99"),
                        cell["duplicates"],
                    ]
                )
    headers = [
        "model",
        "round",
        "procs",
        "docs",
        "catch-up docs/s",
        "ORT img/s",
        "ORT batch",
        "ratio",
        "loop docs/s",
        "loop up CPU s",
        "up CPU s",
        "/loop",
        "/1 proc",
        "steady /s",
        "lag p50 s",
        "lag p99 s",
        "dups",
    ]
    text = format_table(
        headers,
        rows,
        floatfmt=[
            *("", "", "", "", ".1f", ".0f", "", ".4f"),
            *(".1f", ".2f", ".2f", ".2f", ".2f", ".1f", ".2f", ".2f", ""),
        ],
    )
    return text + "".join(_spread(result) for result in payload["models"])


def _spread(result: dict[str, Any]) -> str:
    """Median and range of each ratio over the rounds, per number of processes."""
    rounds = result.get("rounds") or []
    if len(rounds) < 2:
        return ""
    lines = []
    for index, cell in enumerate(rounds[0]["cells"]):
        for key, label in (("ratio_to_loop", "/loop"), ("ratio_to_one_process", "/1 proc")):
            values = sorted(r["cells"][index][key] for r in rounds)
            lines.append(
                f"{result['model']['name']}, {cell['processes']} process(es), {label}: median "
                f"{percentile(values, 50):.2f}, {values[0]:.2f} to {values[-1]:.2f} over "
                f"{len(values)} rounds"
            )
    return "\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench deferred",
        description="Deferred predictions: catch-up rate vs plain onnxruntime, and lag.",
    )
    add_common_arguments(
        parser, quick="1,000 documents, digits only, 10 s steady phase", database=DB_NAME
    )
    parser.add_argument("--models", metavar="A,B", help="digits,resnet18 (default both)")
    parser.add_argument(
        "--processes",
        default="1,3",
        metavar="1,3",
        help="modelgate processes sharing the collection (default 1,3)",
    )
    parser.add_argument(
        "--docs", type=int, metavar="N", help="digits documents (default 10000; --quick 1000)"
    )
    parser.add_argument("--resnet-docs", type=int, default=500, metavar="N")
    parser.add_argument(
        "--steady-seconds",
        type=float,
        metavar="S",
        help="length of the steady-rate phase (default 30; --quick 10; 0: skip)",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.5,
        metavar="S",
        help="how often predictions are looked for (default 0.5)",
    )
    parser.add_argument("--sweep-interval", type=float, default=1.0, metavar="S")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="run the loop and each number of processes N times in turn, each round's "
        "ratios within the round, then their median and range (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="give up on a catch-up after S seconds",
    )
    parser.add_argument(
        "--baseline-budget",
        type=float,
        metavar="S",
        help="seconds per onnxruntime batch size (default 2; --quick 0.5)",
    )
    parser.add_argument(
        "--proxy-arg",
        action="append",
        metavar="ARG",
        help="extra `modelgate serve` argument (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.docs is None:
        args.docs = 1000 if args.quick else 10_000
    if args.steady_seconds is None:
        args.steady_seconds = 10.0 if args.quick else 30.0
    if args.baseline_budget is None:
        args.baseline_budget = 0.5 if args.quick else 2.0
    return finish("deferred", args, run, table)
