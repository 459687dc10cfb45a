"""`python -m bench wire`: the MongoDB driver benchmark tasks that matter for a proxy,
run straight against the upstream, through a bare frame forwarder and through modelgate,
taking turns, same data.

Tasks and scores follow the driver benchmarking specification
(mongodb/specifications, source/benchmarking/benchmarking.md): the score is
MB/s = dataset size (10^6 bytes) / median time of one iteration, on documents of the
spec's shapes and sizes (`bench.wire_data`).

The forwarder (`bench.support.forwarder`) is the floor of any proxy on trio: it reads a
frame and sends it on, nothing else, with one upstream connection per client as
modelgate. What modelgate adds over it is the cost of its own work; what the forwarder
adds over direct is the cost of a second hop through a Python process.

The one-operation-at-a-time tasks (hello, find one, insertOne) take turns between the
targets in blocks of 100 operations; the bulk tasks alternate whole iterations.
SecantusDB slows down as writes accumulate (a small insertOne went from 1.1 to 5.7 ms
over 6,000 inserts), and whole runs one after the other charged that drift to whichever
target ran later.

Besides throughput, the latency each hop adds to one round trip is measured from
sequential `ping`s: p50 and p99 of each distribution and their differences. The pings
reach every target with directConnection=true: a driver that sees modelgate as the
mongos its hello says it is spends more of its own time per operation (a sharded
topology's server selection) than on a single server, which is not modelgate's work.
Pings through modelgate as drivers reach it by default are measured too, and that
difference shown. Last, the
throughput of many concurrent clients through one modelgate process and through two in
one connection string (`bench.wire_scaling`)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
import pymongo
from pymongo.database import Database

from bench.harness import (
    MB,
    add_common_arguments,
    finish,
    format_table,
    latency_samples,
    machine_info,
    mb_per_s,
    median,
    run_alternating,
    run_interleaved,
    summarize,
)
from bench.support.forwarder import forwarder
from bench.support.processes import (
    BENCH_PROXY_ARGS,
    DIRECT,
    PROXY,
    BenchError,
    ProxyProcess,
    bench_stack,
    connect,
    redact_uri,
)
from bench.wire_data import Dataset, make_dataset
from bench.wire_scaling import measure_scaling, scaling_rows
from engine.stats import percentile
from proxy.settings import positive

__all__ = ["FORWARDER", "TARGETS", "TASKS", "main"]

DB_NAME = "modelgate_bench_wire"
COLLECTION = "corpus"

#: The third target, beside bench.support.processes' DIRECT and PROXY.
FORWARDER = "forwarder"
#: The order of the targets in results and tables.
TARGETS = (DIRECT, FORWARDER, PROXY)
#: Ping latency only: modelgate as drivers see it by default, a mongos (its hello says
#: so). The other three are reached with directConnection=true, so that the driver does
#: the same work for each (a driver spends more of its own time per operation on a
#: sharded topology than on a single server); what modelgate adds is then its own.
PROXY_AS_MONGOS = "proxy_as_mongos"

# The latency distribution kept in the report (for --plot): these percentiles of each.
DISTRIBUTION_PERCENTILES = (*range(100), 99.5, 99.9, 100)

# The spec's count of round trips in the one-operation-at-a-time tasks (hello, find one,
# insertOne of small docs).
SPEC_OPS = 10_000


@dataclass(frozen=True)
class Mode:
    scale: float  # of the spec's document counts (10,000 tweets/small docs, 10 large docs)
    ops: int  # round trips per iteration of the one-at-a-time tasks
    iterations: int
    pings: int
    budget_s: float  # per task: stop iterating once the timed calls passed this
    scaling_s: float  # one run of the concurrent clients, per configuration and round
    scaling_rounds: int


QUICK = Mode(
    scale=0.05, ops=500, iterations=3, pings=2_000, budget_s=8.0, scaling_s=2.0, scaling_rounds=2
)
# The spec's datasets at full size; the one-at-a-time tasks make 2,000 round trips per
# iteration instead of 10,000 so that the run stays under 10 minutes against the
# embedded upstream on two cores (MB/s is per byte, so the scores stay comparable).
FULL = Mode(
    scale=1.0,
    ops=2_000,
    iterations=5,
    pings=10_000,
    budget_s=60.0,
    scaling_s=10.0,
    scaling_rounds=3,
)

#: Concurrent clients of the one-process against two-processes run.
CLIENTS = 32

Db = Database[dict[str, Any]]


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One spec task. `load` runs once (untimed) before its iterations, `before` before
    each iteration (untimed). The timed part is either `op(db, i)`, one operation of a
    one-at-a-time task, run `ops` times with the targets taking turns in blocks; or
    `run(db)`, the whole of a bulk task, run for one target after the other."""

    name: str
    title: str
    ops: int
    dataset_bytes: int
    op: Callable[[Db, int], object] | None = None
    run: Callable[[Db], object] | None = None
    load: Callable[[Db], object] = lambda db: None
    before: Callable[[Db], object] = lambda db: None
    state: dict[str, Any] = field(default_factory=dict)


def _count(base: int, scale: float) -> int:
    return max(1, round(base * scale))


def _reset_collection(db: Db) -> None:
    db.drop_collection(COLLECTION)
    db.create_collection(COLLECTION)


def _run_command(n: int) -> Task:
    size = len(bson.encode({"hello": True}))

    def op(db: Db, i: int) -> None:
        db.command("hello")

    return Task("run_command", f"run command (hello x{n})", n, n * size, op=op)


def _find_one(n: int, tweet: dict[str, Any]) -> Task:
    size = n * len(bson.encode({"_id": 1, **tweet}))  # every int32 _id has the same size

    def load(db: Db) -> None:
        db[COLLECTION].insert_many([{"_id": i, **tweet} for i in range(1, n + 1)])

    def op(db: Db, i: int) -> None:
        db[COLLECTION].find_one({"_id": i + 1})

    return Task("find_one_by_id", f"find one by _id (x{n})", n, size, op=op, load=load)


def _insert_one(name: str, title: str, n: int, doc: dict[str, Any]) -> Task:
    size = n * len(bson.encode(doc))

    def op(db: Db, i: int) -> None:
        db[COLLECTION].insert_one(dict(doc))  # a copy: the insert adds _id in place

    return Task(name, f"{title} (x{n})", n, size, op=op, before=_reset_collection)


def _find_many(n: int, tweet: dict[str, Any]) -> Task:
    size = n * len(bson.encode(tweet))

    def load(db: Db) -> None:
        db[COLLECTION].insert_many([dict(tweet) for _ in range(n)])

    def run(db: Db) -> None:
        for _ in db[COLLECTION].find({}):
            pass

    return Task("find_many", f"find many, empty cursor ({n} tweets)", n, size, run=run, load=load)


def _bulk_insert(name: str, title: str, n: int, doc: dict[str, Any]) -> Task:
    size = n * len(bson.encode(doc))
    task = Task(name, f"{title} ({n} docs)", n, size)

    def before(db: Db) -> None:
        _reset_collection(db)
        task.state["docs"] = [dict(doc) for _ in range(n)]

    def run(db: Db) -> None:
        db[COLLECTION].insert_many(task.state.pop("docs"), ordered=True)

    task.before, task.run = before, run
    return task


#: Task names in the order they run.
TASKS = (
    "run_command",
    "find_one_by_id",
    "small_insert_one",
    "large_insert_one",
    "find_many",
    "small_bulk_insert",
    "large_bulk_insert",
)


def make_tasks(data: Dataset, scale: float, ops: int) -> list[Task]:
    return [
        _run_command(ops),
        _find_one(ops, data.tweet),
        _insert_one("small_insert_one", "small doc insertOne", ops, data.small),
        _insert_one("large_insert_one", "large doc insertOne", _count(10, scale), data.large),
        _find_many(_count(10_000, scale), data.tweet),
        _bulk_insert(
            "small_bulk_insert", "small doc bulk insert", _count(10_000, scale), data.small
        ),
        _bulk_insert("large_bulk_insert", "large doc bulk insert", _count(10, scale), data.large),
    ]


# --------------------------------------------------------------------------- running


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_task(
    task: Task, dbs: dict[str, Db], direct_db: Db, iterations: int, budget: float
) -> dict[str, Any]:
    direct_db.client.drop_database(DB_NAME)
    task.load(direct_db)

    def setup(name: str) -> None:
        task.before(dbs[name])

    try:
        if task.op is not None:
            op = task.op
            times = run_interleaved(
                {name: functools.partial(op, db) for name, db in dbs.items()},
                task.ops,
                iterations=iterations,
                setup=setup,
                budget_s=budget,
            )
        else:
            run = task.run
            assert run is not None
            times = run_alternating(
                {name: functools.partial(run, db) for name, db in dbs.items()},
                iterations=iterations,
                setup=setup,
                budget_s=budget,
            )
    finally:
        task.state.clear()
        direct_db.client.drop_database(DB_NAME)
    result: dict[str, Any] = {
        "name": task.name,
        "title": task.title,
        "ops": task.ops,
        "dataset_bytes": task.dataset_bytes,
        "dataset_mb": task.dataset_bytes / MB,
    }
    for name, samples in times.items():
        seconds = median(samples)
        result[name] = {
            "median_s": seconds,
            "times_s": samples,
            "iterations": len(samples),
            "mb_per_s": mb_per_s(task.dataset_bytes, seconds),
            "ops_per_s": task.ops / seconds,
        }
    result["ratio"] = result[PROXY]["mb_per_s"] / result[DIRECT]["mb_per_s"]
    result["forwarder_ratio"] = result[FORWARDER]["mb_per_s"] / result[DIRECT]["mb_per_s"]
    return result


def _ping_latency(
    clients: dict[str, pymongo.MongoClient[dict[str, Any]]], count: int
) -> dict[str, Any]:
    admin = {name: client.admin for name, client in clients.items()}
    samples = latency_samples(
        {name: (lambda db=db: db.command("ping")) for name, db in admin.items()}, count
    )
    result: dict[str, Any] = {
        "count": count,
        "unit": "us",
        "percentiles": list(DISTRIBUTION_PERCENTILES),
        **{name: summarize(values, 1e6) for name, values in samples.items()},
    }
    for name, values in samples.items():
        ordered = sorted(values)
        result[name]["distribution"] = [
            percentile(ordered, q) * 1e6 for q in DISTRIBUTION_PERCENTILES
        ]
    # What each hop adds: modelgate and the forwarder over direct, modelgate over the
    # forwarder (the cost of modelgate's own work).
    for prefix, slower, faster in (
        ("added", PROXY, DIRECT),
        ("forwarder_added", FORWARDER, DIRECT),
        ("excess", PROXY, FORWARDER),
        ("mongos_topology", PROXY_AS_MONGOS, PROXY),
    ):
        for stat in ("p50", "p99", "mean"):
            result[f"{prefix}_{stat}_us"] = result[slower][stat] - result[faster][stat]
    return result


def _direct_connection(uri: str) -> str:
    return f"{uri}{'&' if '?' in uri else '?'}directConnection=true"


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = QUICK if args.quick else FULL
    scale = args.scale if args.scale is not None else mode.scale
    if args.ops is not None:
        ops = args.ops
    else:
        ops = mode.ops if args.scale is None else _count(SPEC_OPS, scale)
    iterations = args.iterations if args.iterations is not None else mode.iterations
    pings = args.pings if args.pings is not None else mode.pings
    budget = args.budget if args.budget is not None else mode.budget_s
    selected = [name.strip() for name in args.tasks.split(",")] if args.tasks else list(TASKS)
    unknown = sorted(set(selected) - set(TASKS))
    if unknown:
        raise BenchError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")

    clients = args.clients if args.clients is not None else CLIENTS
    started = time.perf_counter()
    data = make_dataset()
    _progress(f"data generated in {time.perf_counter() - started:.1f} s")
    tasks = [task for task in make_tasks(data, scale, ops) if task.name in selected]
    results: list[dict[str, Any]] = []
    scaling = None
    with bench_stack(args.upstream) as stack, forwarder(stack.direct_uri) as forwarder_uri:
        uris = {DIRECT: stack.direct_uri, FORWARDER: forwarder_uri, PROXY: stack.proxy_uri}
        _progress(
            f"upstream {redact_uri(stack.direct_uri)}"
            f"{' (embedded SecantusDB)' if stack.embedded else ''}; "
            f"forwarder {forwarder_uri}; modelgate {stack.proxy_uri}"
        )
        with contextlib.ExitStack() as closing:
            targets = {name: closing.enter_context(connect(uri)) for name, uri in uris.items()}
            dbs = {name: client[DB_NAME] for name, client in targets.items()}
            for task in tasks:
                _progress(f"  {task.title} ...")
                task_started = time.perf_counter()
                result = _run_task(task, dbs, dbs[DIRECT], iterations, budget)
                _progress(
                    "    "
                    + ", ".join(f"{name} {result[name]['mb_per_s']:.2f} MB/s" for name in TARGETS)
                    + f" ({result[DIRECT]['iterations']} iterations, "
                    f"{time.perf_counter() - task_started:.1f} s)"
                )
                results.append(result)
            latency = None
            if pings > 0:
                pinged = {
                    DIRECT: targets[DIRECT],
                    FORWARDER: targets[FORWARDER],
                    PROXY: closing.enter_context(connect(_direct_connection(stack.proxy_uri))),
                    PROXY_AS_MONGOS: targets[PROXY],
                }
                latency = _ping_latency(pinged, pings)
        if clients > 0:
            _progress(f"  {clients} concurrent clients, one modelgate process vs two ...")
            scaling = _scaling(stack.proxy, clients, mode)
    return {
        "benchmark": "wire",
        "spec": "https://github.com/mongodb/specifications/blob/master/source/benchmarking/"
        "benchmarking.md",
        "config": {
            "quick": args.quick,
            "scale": scale,
            "ops": ops,
            "iterations": iterations,
            "warmup": 1,
            "pings": pings,
            "task_budget_s": budget,
            "clients": clients,
            "upstream": redact_uri(args.upstream) if args.upstream else "embedded SecantusDB",
            "document_bytes": data.sizes,
        },
        "machine": machine_info(),
        "tasks": results,
        "ping_latency": latency,
        "scaling": scaling,
        "elapsed_s": time.perf_counter() - started,
    }


def _scaling(first: ProxyProcess, clients: int, mode: Mode) -> dict[str, Any]:
    """`clients` concurrent clients through `first` alone and through `first` and a
    second modelgate process on the same upstream, both in one connection string."""
    with ProxyProcess(first.upstream, args=BENCH_PROXY_ARGS) as second:
        assert first.process is not None and second.process is not None
        both = f"mongodb://127.0.0.1:{first.port},127.0.0.1:{second.port}/"
        return measure_scaling(
            {"1 process": first.uri, "2 processes": both},
            {
                "1 process": [first.process.pid],
                "2 processes": [first.process.pid, second.process.pid],
            },
            clients=clients,
            seconds=mode.scaling_s,
            rounds=mode.scaling_rounds,
        )


def report(payload: dict[str, Any]) -> str:
    rows = [
        [
            t["name"],
            t["ops"],
            t["dataset_mb"],
            *(t[name]["mb_per_s"] for name in TARGETS),
            t["forwarder_ratio"],
            t["ratio"],
        ]
        for t in payload["tasks"]
    ]
    config = payload["config"]
    machine = payload["machine"]
    parts = [
        f"modelgate wire benchmark — {machine['date']}, {machine['cpu_count']} CPUs, "
        f"Python {machine['python']}, upstream: {config['upstream']}, scale {config['scale']}, "
        f"{config['ops']} ops, "
        f"median of {config['iterations']} (after 1 warm-up)",
        "",
        format_table(
            [
                "task",
                "ops",
                "MB",
                "direct MB/s",
                "forwarder MB/s",
                "modelgate MB/s",
                "forwarder/direct",
                "proxy/direct",
            ],
            rows,
            floatfmt=["", "", ".4g", ".4g", ".4g", ".4g", ".2f", ".2f"],
        ),
    ]
    latency = payload["ping_latency"]
    if latency:
        shown = {name: name for name in TARGETS}
        if PROXY_AS_MONGOS in latency:
            shown[PROXY_AS_MONGOS] = "proxy, driver sees a mongos"
        rows = [
            [title, *(latency[name][stat] for stat in ("p50", "p99", "mean", "max"))]
            for name, title in shown.items()
        ]
        rows += [
            [title, *(latency[f"{prefix}_{stat}_us"] for stat in ("p50", "p99", "mean")), None]
            for title, prefix in (
                ("forwarder over direct", "forwarder_added"),
                ("modelgate over direct", "added"),
                ("modelgate over forwarder", "excess"),
                ("driver's mongos topology", "mongos_topology"),
            )
            if f"{prefix}_p50_us" in latency
        ]
        parts += [
            "",
            f"ping round trip, {latency['count']} sequential pings each (µs); direct, "
            "forwarder and proxy with directConnection=true (the driver's work the same "
            "for each), the last without (as drivers see modelgate by default: a mongos)",
            format_table(["", "p50", "p99", "mean", "max"], rows, floatfmt=".1f"),
        ]
    scaling = payload["scaling"]
    if scaling:
        parts += [
            "",
            f"{scaling['clients']} concurrent clients sending pings, median of "
            f"{scaling['rounds']} runs of {scaling['seconds']:g} s (CPU in cores)",
            format_table(
                ["modelgate", "ops/s", "client CPU", "modelgate CPU", "machine busy %"],
                scaling_rows(scaling),
                floatfmt=["", ".0f", ".2f", ".2f", ".0f"],
            ),
        ]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench wire",
        description="Driver-benchmark-spec tasks (hello, find one by _id, small/large "
        "insertOne, find many, small/large bulk insert) straight against the upstream, "
        "through a bare frame forwarder and through modelgate, taking turns on the same "
        "data; MB/s per the spec (dataset size / median iteration time) and the ratios to "
        "direct; the latency each adds to a ping round trip (p50, p99); and the throughput "
        "of concurrent clients through one modelgate process and through two.",
    )
    add_common_arguments(
        parser,
        quick=f"scale {QUICK.scale}, {QUICK.ops} ops, "
        f"{QUICK.iterations} iterations, {QUICK.pings} pings (default: scale "
        f"{FULL.scale}, {FULL.ops} ops, {FULL.iterations} iterations, "
        f"{FULL.pings} pings; under 10 minutes on 2 cores)",
        database=DB_NAME,
    )
    parser.add_argument(
        "--iterations",
        type=positive(int),
        metavar="K",
        help="timed iterations per task and target (median reported)",
    )
    parser.add_argument(
        "--scale",
        type=positive(float),
        metavar="F",
        help="multiply the spec's operation and document counts by F "
        "(1 = spec: 10,000 tweets or small docs, 10 large docs); document sizes "
        "stay the spec's. Alone, also sets --ops to 10,000 x F",
    )
    parser.add_argument(
        "--ops",
        type=positive(int),
        metavar="N",
        help="round trips per iteration of the one-at-a-time tasks (hello, "
        "find one by _id, small insertOne); the spec's is 10,000",
    )
    parser.add_argument(
        "--pings",
        type=int,
        metavar="N",
        help="sequential pings per target for the latency (0: skip)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="per task: stop iterating once its timed calls together passed "
        "this (at least one iteration always runs)",
    )
    parser.add_argument("--tasks", metavar="A,B", help=f"run only these: {', '.join(TASKS)}")
    parser.add_argument(
        "--clients",
        type=int,
        metavar="N",
        help=f"concurrent clients of the one-process against two-processes run "
        f"(default {CLIENTS}; 0: skip)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return finish("wire", build_parser().parse_args(argv), run, report)
