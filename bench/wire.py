"""`python -m bench wire`: the MongoDB driver benchmark tasks that matter for a proxy,
run straight against the upstream and through modelgate, alternating, same data.

Tasks and scores follow the driver benchmarking specification
(mongodb/specifications, source/benchmarking/benchmarking.md): the score is
MB/s = dataset size (10^6 bytes) / median time of one iteration. The spec's data sets
cannot be downloaded here, so documents of the same shapes and sizes are generated
(SMALL_DOC about 275 bytes, TWEET about 1.6 KB, LARGE_DOC about 2.7 MB), from a fixed
seed. Dataset sizes are measured from the generated BSON, not copied from the spec.

The one-operation-at-a-time tasks (hello, find one, insertOne) take turns between direct
and proxy in blocks of 100 operations; the bulk tasks alternate whole iterations.
SecantusDB slows down as writes accumulate (a small insertOne went from 1.1 to 5.7 ms
over 6,000 inserts), and whole runs one after the other charged that drift to whichever
target ran later.

Besides throughput, the latency the proxy adds to one round trip is measured from
sequential `ping`s: p50 and p99 of each distribution and their differences."""

from __future__ import annotations

import argparse
import functools
import random
import string
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
from bench.support.processes import DIRECT, PROXY, BenchError, bench_stack, connect, redact_uri
from engine.stats import percentile
from proxy.settings import positive

__all__ = ["TASKS", "Dataset", "main", "make_dataset"]

DB_NAME = "modelgate_bench_wire"
COLLECTION = "corpus"

# Spec sizes, in bytes of BSON.
SMALL_DOC_BYTES = 275
TWEET_BYTES = 1_622
LARGE_DOC_BYTES = 2_731_089

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


QUICK = Mode(scale=0.05, ops=500, iterations=3, pings=2_000, budget_s=8.0)
# The spec's datasets at full size; the one-at-a-time tasks make 2,000 round trips per
# iteration instead of 10,000 so that the run stays under 10 minutes against the
# embedded upstream on two cores (MB/s is per byte, so the scores stay comparable).
FULL = Mode(scale=1.0, ops=2_000, iterations=5, pings=10_000, budget_s=60.0)

Db = Database[dict[str, Any]]


# --------------------------------------------------------------------------- data


def _element_size(key: str, value: object) -> int:
    # An element's bytes inside a document: the one-element document less its
    # 4-byte length and trailing NUL.
    return len(bson.encode({key: value})) - 5


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choices(string.ascii_letters, k=rng.randint(low, high)))


def _fill(
    rng: random.Random,
    target: int,
    value: Callable[[], object],
    key_len: tuple[int, int],
    doc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add random keys with `value()` values to `doc` until its BSON is about `target`."""
    doc = {} if doc is None else doc
    size = len(bson.encode(doc))
    while True:
        key = _word(rng, *key_len)
        if key in doc:
            continue
        item = value()
        grow = _element_size(key, item)
        if size + grow > target:
            break
        doc[key] = item
        size += grow
    # Top up with one string so the size lands on the target exactly (where it can).
    room = target - size - (1 + 3 + 1 + 4 + 1)  # type, 3-byte key, NUL, length, NUL
    if room >= 0:
        key = _word(rng, 3, 3)
        while key in doc:
            key = _word(rng, 3, 3)
        doc[key] = "x" * room
    return doc


def small_doc(rng: random.Random) -> dict[str, Any]:
    """SMALL_DOC's shape: 20-30 fields of short random ASCII keys, ints and strings."""

    def value() -> object:
        return rng.randint(0, 2**31 - 1) if rng.random() < 0.5 else _word(rng, 2, 6)

    return _fill(rng, SMALL_DOC_BYTES, value, (2, 4))


def tweet_doc(rng: random.Random) -> dict[str, Any]:
    """TWEET's shape: a status with a nested user, entities and counters."""
    user = {
        "id": rng.randint(10**8, 10**9),
        "name": _word(rng, 6, 14),
        "screen_name": _word(rng, 6, 12),
        "location": _word(rng, 5, 15),
        "url": "http://" + _word(rng, 5, 12).lower() + ".example.com/",
        "description": "",
        "protected": False,
        "followers_count": rng.randint(0, 10**5),
        "friends_count": rng.randint(0, 10**4),
        "listed_count": rng.randint(0, 500),
        "created_at": "Mon Dec 16 02:53:17 +0000 2013",
        "favourites_count": rng.randint(0, 10**4),
        "utc_offset": -18000,
        "time_zone": "Eastern Time (US & Canada)",
        "geo_enabled": True,
        "verified": False,
        "statuses_count": rng.randint(0, 10**5),
        "lang": "en",
        "profile_background_color": "C0DEED",
        "profile_image_url": "http://pbs.example.com/profile_images/" + _word(rng, 10, 10),
        "default_profile": True,
    }
    doc: dict[str, Any] = {
        "text": " ".join(_word(rng, 2, 9) for _ in range(18)),
        "in_reply_to_status_id": None,
        "retweet_count": rng.randint(0, 1000),
        "contributors": None,
        "created_at": "Fri Jan 03 22:26:51 +0000 2014",
        "geo": None,
        "source": '<a href="http://example.com" rel="nofollow">Example client</a>',
        "coordinates": None,
        "in_reply_to_screen_name": None,
        "truncated": False,
        "entities": {
            "user_mentions": [
                {
                    "indices": [0, 12],
                    "screen_name": _word(rng, 6, 10),
                    "id": rng.randint(10**8, 10**9),
                    "name": _word(rng, 6, 12),
                }
            ],
            "hashtags": [{"indices": [20, 28], "text": _word(rng, 4, 8)}],
            "urls": [],
        },
        "retweeted": False,
        "place": None,
        "user": user,
        "favorited": False,
        "in_reply_to_user_id": None,
        "id": rng.randint(10**17, 10**18),
    }
    room = TWEET_BYTES - len(bson.encode(doc))
    user["description"] = " ".join(_word(rng, 3, 8) for _ in range(room // 5 + 1))[: max(room, 0)]
    return doc


def large_doc(rng: random.Random) -> dict[str, Any]:
    """LARGE_DOC's shape: thousands of fields, mostly strings, some ints and arrays."""

    def value() -> object:
        roll = rng.random()
        if roll < 0.1:
            return rng.randint(0, 2**31 - 1)
        if roll < 0.15:
            return [_word(rng, 4, 12) for _ in range(rng.randint(2, 8))]
        return _word(rng, 20, 220)

    return _fill(rng, LARGE_DOC_BYTES, value, (4, 12))


@dataclass(frozen=True)
class Dataset:
    small: dict[str, Any]
    tweet: dict[str, Any]
    large: dict[str, Any]

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "small_doc": len(bson.encode(self.small)),
            "tweet": len(bson.encode(self.tweet)),
            "large_doc": len(bson.encode(self.large)),
        }


def make_dataset(seed: int = 20160813) -> Dataset:
    rng = random.Random(seed)
    return Dataset(small=small_doc(rng), tweet=tweet_doc(rng), large=large_doc(rng))


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
    result["added_p50_us"] = result[PROXY]["p50"] - result[DIRECT]["p50"]
    result["added_p99_us"] = result[PROXY]["p99"] - result[DIRECT]["p99"]
    result["added_mean_us"] = result[PROXY]["mean"] - result[DIRECT]["mean"]
    return result


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

    started = time.perf_counter()
    data = make_dataset()
    _progress(f"data generated in {time.perf_counter() - started:.1f} s")
    tasks = [task for task in make_tasks(data, scale, ops) if task.name in selected]
    results: list[dict[str, Any]] = []
    with bench_stack(args.upstream) as stack:
        _progress(
            f"upstream {redact_uri(stack.direct_uri)}"
            f"{' (embedded SecantusDB)' if stack.embedded else ''}; "
            f"modelgate {stack.proxy_uri}"
        )
        clients = {name: connect(uri) for name, uri in stack.uris.items()}
        try:
            dbs = {name: client[DB_NAME] for name, client in clients.items()}
            for task in tasks:
                _progress(f"  {task.title} ...")
                task_started = time.perf_counter()
                result = _run_task(task, dbs, dbs[DIRECT], iterations, budget)
                _progress(
                    f"    direct {result[DIRECT]['mb_per_s']:.2f} MB/s, "
                    f"proxy {result[PROXY]['mb_per_s']:.2f} MB/s "
                    f"(x{result['ratio']:.2f}, {result[DIRECT]['iterations']} iterations, "
                    f"{time.perf_counter() - task_started:.1f} s)"
                )
                results.append(result)
            latency = _ping_latency(clients, pings) if pings > 0 else None
        finally:
            for client in clients.values():
                client.close()
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
            "upstream": redact_uri(args.upstream) if args.upstream else "embedded SecantusDB",
            "document_bytes": data.sizes,
        },
        "machine": machine_info(),
        "tasks": results,
        "ping_latency": latency,
        "elapsed_s": time.perf_counter() - started,
    }


def report(payload: dict[str, Any]) -> str:
    rows = [
        [
            t["name"],
            t["ops"],
            t["dataset_mb"],
            t[DIRECT]["mb_per_s"],
            t[PROXY]["mb_per_s"],
            t["ratio"],
            t[DIRECT]["median_s"] * 1e3,
            t[PROXY]["median_s"] * 1e3,
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
                "proxy MB/s",
                "proxy/direct",
                "direct ms",
                "proxy ms",
            ],
            rows,
            floatfmt=["", "", ".4g", ".4g", ".4g", ".2f", ".1f", ".1f"],
        ),
    ]
    latency = payload["ping_latency"]
    if latency:
        rows = [
            [
                name,
                latency[name]["p50"],
                latency[name]["p99"],
                latency[name]["mean"],
                latency[name]["max"],
            ]
            for name in (DIRECT, PROXY)
        ]
        rows.append(
            [
                "added by proxy",
                latency["added_p50_us"],
                latency["added_p99_us"],
                latency["added_mean_us"],
                None,
            ]
        )
        parts += [
            "",
            f"ping round trip, {latency['count']} sequential pings each (µs)",
            format_table(["", "p50", "p99", "mean", "max"], rows, floatfmt=".1f"),
        ]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench wire",
        description="Driver-benchmark-spec tasks (hello, find one by _id, small/large "
        "insertOne, find many, small/large bulk insert) straight against the upstream and "
        "through modelgate, alternating on the same data; MB/s per the spec (dataset size "
        "/ median iteration time) and the proxy/direct ratio, plus the latency the proxy "
        "adds to a ping round trip (p50, p99).",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return finish("wire", build_parser().parse_args(argv), run, report)
