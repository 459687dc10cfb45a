"""The batched-insert rows of `python -m bench inline`: CLIENTS clients each inserting
batches of BATCH documents through an inline model, against the machine's limit measured
in the same run.

The limit: a document costs an upstream insert and a model run, so with U the upstream's
insert rate of the same documents (same clients and batches, straight to it, no model)
and M onnxruntime's rate on the same inputs (batch MODEL_BATCH, input conversion
included), nothing that does both in turn can beat 1/(1/U + 1/M). modelgate's rate is
reported as a ratio of it, for two batch settings of the model: `maxSize` BATCH (each
client's insert is its own batch, so one client's model run can overlap another's
upstream insert) and CLIENTS x BATCH (the four clients' inserts merged into one batch).
The documents modelgate stores carry their outputs, which cost the upstream more to
store than the plain documents U is measured on; so each cell also gives the limit with
"U stored", the upstream's rate on a sample of the documents as modelgate stored them in
the cell's warm-up, measured like U.

Interleaved: this machine's speed changes from second to second (a CPU-bound loop ran
at 0.6 to 1.0 of its best rate over 2 s windows, with nothing else running), so U, U
stored and modelgate are not measured one after the other but in rounds of at most
ROUND_S seconds each, their order rotating from round to round, and each rate is over
all of its rounds: every kind sees the same mix of fast and slow seconds.

Beside the rates, each cell gives the CPU milliseconds per 1,000 documents of modelgate's
process, of the upstream's (read from /proc where this machine runs them) and of the
clients (this process): on a busy host they move less than the rates do; and the cores
the three kept busy (their CPU seconds over the run's), which says whether the machine's
cores were what held a rate back.

Fresh stacks: with the embedded upstream (no --upstream) each cell, and the no-model
run, gets a stack of its own, a fresh SecantusDB and a fresh modelgate in front (same
arguments), torn down after it, so that every cell starts from the same state (no
collections of earlier cells), with a small oplog (EMBEDDED_OPLOG_CAP). The clients
write without retryable writes (bench.insert_clients says why). A given --upstream
cannot be restarted: all the cells share one stack there, as one modelgate in front."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pymongo

from bench.deferred import upstream_cpu_seconds
from bench.harness import format_table
from bench.insert_clients import ClientPool
from bench.models import BenchModel, noise_pngs
from bench.onnx_baseline import open_session, preprocess_spec
from bench.support.forwarder import forwarder
from bench.support.processes import DIRECT, PROXY, BenchError, Stack, bench_stack, redact_uri
from modelgate.admin import register_model

__all__ = [
    "CLIENTS",
    "CpuProbe",
    "Ends",
    "batched_report",
    "batched_rows",
    "image_workload",
    "mlp_workload",
    "process_cpu_s",
]

CLIENTS = 4
BATCH = 16
MODEL_BATCH = 64
FEATURES = 16
DISTINCT = 256
DB_NAME = "modelgate_bench_inline"
# The embedded upstream's oplog cap: its inserts cost a third more once the oplog is at
# its cap (100,000 entries by default; 69 to 91 ms of its CPU per 1,000 documents before,
# 113 to 139 after); at this cap it is there within a cell's warm-up, so that every round
# meets the same upstream.
EMBEDDED_OPLOG_CAP = 5_000
# The longest run of one kind of inserts before the next kind's (see the module's docstring).
ROUND_S = 3.0


# CPU seconds used so far by (modelgate, the upstream, the clients); None for one this machine
# cannot read.
Cpu = tuple[float | None, float | None, float | None]
CpuProbe = Callable[[], Cpu]


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) process `pid` has used, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Ends:
    """One stack as the batched rows use it: CLIENTS clients to modelgate and as many
    straight to the upstream, the upstream's URI, the CPU probe of the two processes,
    and which processes they are (recorded with every cell measured on them)."""

    proxy: list[pymongo.MongoClient[dict[str, Any]]]
    direct: list[pymongo.MongoClient[dict[str, Any]]]
    direct_uri: str
    probe: CpuProbe
    processes: dict[str, Any]


@contextlib.contextmanager
def _ends(stack: Stack) -> Iterator[Ends]:
    pools = {name: ClientPool(uri, CLIENTS) for name, uri in stack.uris.items()}
    proxy_pid = stack.proxy.process.pid if stack.proxy.process else None
    try:
        upstream_pid = None
        with contextlib.suppress(pymongo.errors.PyMongoError):  # a MongoDB user may not see it
            upstream_pid = pools[DIRECT].clients[0].admin.command("serverStatus").get("pid")
        yield Ends(
            proxy=pools[PROXY].clients,
            direct=pools[DIRECT].clients,
            direct_uri=stack.direct_uri,
            probe=lambda: (
                process_cpu_s(proxy_pid),
                upstream_cpu_seconds(stack.direct_uri),
                time.process_time(),  # the clients are this process's threads
            ),
            processes={
                "upstream": redact_uri(stack.direct_uri),
                "upstream_pid": upstream_pid,
                "proxy_pid": proxy_pid,
            },
        )
    finally:
        for pool in pools.values():
            pool.close()


StackPerCell = Callable[[], contextlib.AbstractContextManager[Ends]]


@contextlib.contextmanager
def _stacks(upstream_uri: str | None, proxy_args: Sequence[str]) -> Iterator[StackPerCell]:
    """What gives each cell its stack: with the embedded upstream a fresh one per call
    (see the module's docstring), with a given upstream the same one every time."""
    if upstream_uri is None:

        @contextlib.contextmanager
        def fresh() -> Iterator[Ends]:
            embedded_args = ("--oplog-max-entries", str(EMBEDDED_OPLOG_CAP))
            with (
                bench_stack(None, proxy_args=proxy_args, embedded_args=embedded_args) as stack,
                _ends(stack) as ends,
            ):
                yield ends

        yield fresh
        return
    with bench_stack(upstream_uri, proxy_args=proxy_args) as stack, _ends(stack) as ends:
        yield lambda: contextlib.nullcontext(ends)


@dataclass(frozen=True)
class Workload:
    """A model and the documents that feed it, and how onnxruntime alone reads them."""

    name: str
    onnx: bytes
    field: str
    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    documents: list[dict[str, Any]]
    to_batch: Callable[[Sequence[dict[str, Any]]], np.ndarray]


def _mlp_onnx(seed: int = 1234) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(size=(FEATURES, 64)).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": rng.normal(size=(64, 10)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["o"]),
            helper.make_node("Add", ["o", "b2"], ["y"]),
        ],
        "mlp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    return bytes(built.SerializeToString())


def mlp_workload() -> Workload:
    """An MLP on 16 floats (16-64-10, random weights), documents {x: [16 floats]}."""
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(DISTINCT, FEATURES)).round(4).tolist()
    return Workload(
        name="mlp16",
        onnx=_mlp_onnx(),
        field="x",
        preprocess={"kind": "tensor"},
        postprocess={"kind": "classify", "labels": list(range(10)), "topK": 3},
        documents=[{"x": row} for row in rows],
        to_batch=lambda docs: np.asarray([doc["x"] for doc in docs], dtype=np.float32),
    )


def image_workload(model: BenchModel) -> Workload:
    """An image model on noise PNGs, documents {img: BinData(png)}."""
    from engine.inputs.image import preprocess_image_bytes

    pre = preprocess_spec(model)
    images = noise_pngs(DISTINCT, model.image_size, model.image_mode)
    return Workload(
        name=model.name,
        onnx=model.onnx,
        field="img",
        preprocess=model.preprocess,
        postprocess=model.postprocess,
        documents=[{"img": bson.Binary(png)} for png in images],
        to_batch=lambda docs: np.stack([preprocess_image_bytes(d["img"], pre) for d in docs]),
    )


def model_rate(workload: Workload, budget_s: float) -> float:
    """M: documents/s of plain onnxruntime on the workload's inputs, MODEL_BATCH at a time."""
    session = open_session(workload.onnx, ["CPUExecutionProvider"], require_first=False)
    input_name = session.get_inputs()[0].name
    docs = workload.documents
    done = 0
    started = time.perf_counter()
    while done < 3 * MODEL_BATCH or time.perf_counter() - started < budget_s:
        batch = [docs[(done + i) % len(docs)] for i in range(MODEL_BATCH)]
        session.run(None, {input_name: workload.to_batch(batch)})
        done += MODEL_BATCH
    return done / (time.perf_counter() - started)


def insert_rate(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    collection: str,
    documents: Sequence[dict[str, Any]],
    duration_s: float,
) -> tuple[int, float]:
    """How many documents `clients` inserted in `duration_s`, each inserting BATCH
    documents per insert_many, and in how many seconds (from the start to the last
    insert's end)."""
    counts = [0] * len(clients)
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients) + 1)
    deadline = [0.0]

    def worker(index: int) -> None:
        coll = clients[index][DB_NAME][collection]
        cursor = index * 37
        start.wait()
        try:
            while time.perf_counter() < deadline[0]:
                batch = [dict(documents[(cursor + i) % len(documents)]) for i in range(BATCH)]
                coll.insert_many(batch)
                cursor += BATCH
                counts[index] += BATCH
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline[0] = started + duration_s
    start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"insert_many failed: {errors[0]!r}")
    return sum(counts), time.perf_counter() - started


# Inserts of one kind for the given seconds: (documents inserted, seconds taken).
Inserts = Callable[[float], tuple[int, float]]


def _inserts(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    collection: str,
    documents: Sequence[dict[str, Any]],
) -> Inserts:
    return lambda seconds: insert_rate(clients, collection, documents, seconds)


@dataclass
class _Tally:
    """One kind's runs over the rounds of a cell, and the CPU they cost."""

    docs: int = 0
    seconds: float = 0.0
    rates: list[float] = field(default_factory=list)
    cpu_s: list[float | None] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # as in Cpu

    def add(self, docs: int, seconds: float, before: Cpu, after: Cpu) -> None:
        self.docs += docs
        self.seconds += seconds
        self.rates.append(docs / seconds)
        self.cpu_s = [
            None if used is None or a is None or b is None else used + a - b
            for used, a, b in zip(self.cpu_s, after, before, strict=True)
        ]

    def result(self) -> dict[str, Any]:
        per_1k = [None if used is None else 1e6 * used / self.docs for used in self.cpu_s]
        known = [used for used in self.cpu_s if used is not None]
        return {
            "docs_per_s": self.docs / self.seconds,
            "runs": self.rates,
            "proxy_cpu_ms_per_1k": per_1k[0],
            "upstream_cpu_ms_per_1k": per_1k[1],
            "clients_cpu_ms_per_1k": per_1k[2],
            # None where a process's CPU cannot be read (a remote upstream's, say).
            "cores_busy": sum(known) / self.seconds if len(known) == len(self.cpu_s) else None,
        }


def _interleaved(
    kinds: dict[str, Inserts], duration_s: float, probe: CpuProbe
) -> dict[str, dict[str, Any]]:
    """Each kind of inserts for `duration_s` in all, in rounds of at most ROUND_S
    seconds, their order rotating from round to round (see the module's docstring).
    Per kind: docs/s over all its runs, each run's rate, the CPU ms per 1,000 documents
    of modelgate's process, the upstream's and the clients' while it ran, and the cores
    the three kept busy."""
    rounds = max(2, math.ceil(duration_s / ROUND_S))
    names = list(kinds)
    tallies = {name: _Tally() for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            before = probe()
            docs, seconds = kinds[name](duration_s / rounds)
            tallies[name].add(docs, seconds, before, probe())
    return {name: tally.result() for name, tally in tallies.items()}


@dataclass(frozen=True)
class _Attached:
    """A fresh model attached inline to a fresh collection, warmed up, and a sample of
    the documents as modelgate stored them in the warm-up (outputs in them)."""

    name: str
    collection: str
    stored: list[dict[str, Any]]


@contextlib.contextmanager
def _attached(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    workload: Workload,
    max_size: int,
    max_delay_ms: float,
    warm_up_s: float,
) -> Iterator[_Attached]:
    tag = uuid.uuid4().hex[:8]
    name, collection = f"bench_{workload.name}_b{max_size}_{tag}", f"batched_{tag}"
    admin = clients[0]
    register_model(
        admin,
        name,
        model=workload.onnx,
        collection=f"{DB_NAME}.{collection}",
        input=workload.field,
        mode="inline",
        preprocess=workload.preprocess,
        postprocess=workload.postprocess,
        batch={"maxSize": max_size, "maxDelayMs": max_delay_ms},
    )
    try:
        insert_rate(clients, collection, workload.documents, warm_up_s)
        stored = list(admin[DB_NAME][collection].find({}, {"_id": 0}).limit(DISTINCT))
        yield _Attached(name, collection, stored)
    finally:
        with contextlib.suppress(pymongo.errors.PyMongoError):
            admin.admin.command({"dropModel": name})
        admin[DB_NAME].drop_collection(collection)


@contextlib.contextmanager
def _scratch_collections(ends: Ends, count: int) -> Iterator[list[str]]:
    """`count` collections that no model watches, dropped afterwards."""
    names = [f"plain_batched_{uuid.uuid4().hex[:8]}" for _ in range(count)]
    try:
        yield names
    finally:
        for name in names:
            ends.direct[0][DB_NAME].drop_collection(name)


def _batch_counters(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]], name: str
) -> tuple[int, float]:
    """The model's batches so far, and the documents they held."""
    status = clients[0].admin.command({"modelStatus": name})
    batches = int(status.get("batches", 0))
    return batches, float(status.get("meanBatchSize", 0.0)) * batches


def _no_model(ends: Ends, workload: Workload, duration_s: float) -> dict[str, Any]:
    """The proxy's own share: the workload's documents inserted through modelgate with no
    model, interleaved with U and with the same inserts through the bare frame forwarder
    (bench.support.forwarder: what any proxy on trio costs, the floor of modelgate's)."""
    with (
        forwarder(ends.direct_uri) as forwarder_uri,
        contextlib.closing(ClientPool(forwarder_uri, CLIENTS)) as forwarded,
        _scratch_collections(ends, 3) as (direct, through_forwarder, through),
    ):
        measured = _interleaved(
            {
                "upstream": _inserts(ends.direct, direct, workload.documents),
                "forwarder": _inserts(forwarded.clients, through_forwarder, workload.documents),
                "modelgate": _inserts(ends.proxy, through, workload.documents),
            },
            duration_s,
            ends.probe,
        )
    return {
        **measured["modelgate"],
        "upstream": measured["upstream"],
        "upstream_docs_per_s": measured["upstream"]["docs_per_s"],
        "forwarder_docs_per_s": measured["forwarder"]["docs_per_s"],
        "stack": ends.processes,
    }


def _limit(upstream: float, model: float) -> float:
    """The machine's limit for documents that cost an upstream insert and a model run in
    turn (see the module's docstring), from the rates of each alone."""
    return 1 / (1 / upstream + 1 / model)


def _cell(
    ends: Ends,
    workload: Workload,
    model: float,
    max_size: int,
    max_delay_ms: float,
    duration_s: float,
) -> dict[str, Any]:
    """modelgate with the model attached at `max_size`, interleaved with U (the plain
    documents straight to the upstream) and U stored (the documents as modelgate stored
    them in the warm-up, straight to the upstream); its ratios to the two limits."""
    with (
        _attached(ends.proxy, workload, max_size, max_delay_ms, min(1.0, duration_s)) as attached,
        _scratch_collections(ends, 2) as (plain, stored),
    ):
        batches_before, items_before = _batch_counters(ends.proxy, attached.name)
        measured = _interleaved(
            {
                "upstream": _inserts(ends.direct, plain, workload.documents),
                "stored": _inserts(ends.direct, stored, attached.stored),
                "modelgate": _inserts(ends.proxy, attached.collection, workload.documents),
            },
            duration_s,
            ends.probe,
        )
        batches_after, items_after = _batch_counters(ends.proxy, attached.name)
    batches = batches_after - batches_before
    upstream, as_stored = measured["upstream"]["docs_per_s"], measured["stored"]["docs_per_s"]
    cell = {
        "max_size": max_size,
        **measured["modelgate"],
        "mean_batch_size": (items_after - items_before) / batches if batches else 0.0,
        "upstream_docs_per_s": upstream,
        "upstream_runs": measured["upstream"]["runs"],
        "upstream_cores_busy": measured["upstream"]["cores_busy"],
        "stored_upstream_docs_per_s": as_stored,
        "stored_upstream_runs": measured["stored"]["runs"],
        "limit_docs_per_s": _limit(upstream, model),
        "stored_limit_docs_per_s": _limit(as_stored, model),
        "stack": ends.processes,
    }
    cell["ratio_to_limit"] = cell["docs_per_s"] / cell["limit_docs_per_s"]
    cell["ratio_to_stored_limit"] = cell["docs_per_s"] / cell["stored_limit_docs_per_s"]
    return cell


def batched_rows(
    upstream_uri: str | None,
    workloads: Sequence[Workload],
    *,
    proxy_args: Sequence[str],
    duration_s: float,
    max_delay_ms: float,
    model_budget_s: float,
) -> list[dict[str, Any]]:
    """One row per workload: U, M, the limit, and modelgate at each batch setting.

    Each cell (and the no-model run) is interleaved with U (see the module's docstring);
    with the embedded upstream (`upstream_uri` None) each on a fresh stack (upstream and
    modelgate started with `proxy_args`)."""
    rows = []
    with _stacks(upstream_uri, proxy_args) as stack_per_cell:
        for workload in workloads:
            model = model_rate(workload, model_budget_s)
            with stack_per_cell() as ends:
                no_model = _no_model(ends, workload, duration_s)
            settings = []
            for max_size in (BATCH, CLIENTS * BATCH):
                with stack_per_cell() as ends:
                    settings.append(
                        _cell(ends, workload, model, max_size, max_delay_ms, duration_s)
                    )
            upstream_rates = [no_model["upstream_docs_per_s"]]
            upstream_rates += [cell["upstream_docs_per_s"] for cell in settings]
            upstream = sum(upstream_rates) / len(upstream_rates)
            rows.append(
                {
                    "model": workload.name,
                    "clients": CLIENTS,
                    "insert_batch": BATCH,
                    "stack_per_cell": upstream_uri is None,
                    "upstream_docs_per_s": upstream,
                    "proxy_no_model_docs_per_s": no_model["docs_per_s"],
                    "proxy_no_model": no_model,
                    "model_docs_per_s": model,
                    "limit_docs_per_s": _limit(upstream, model),
                    "proxy": settings,
                }
            )
    return rows


def batched_report(batched: list[dict[str, Any]]) -> list[str]:
    if not batched:
        return []
    rows = [
        [
            row["model"],
            cell["max_size"],
            cell["upstream_docs_per_s"],
            row["model_docs_per_s"],
            cell["limit_docs_per_s"],
            cell["docs_per_s"],
            cell["ratio_to_limit"],
            cell["stored_upstream_docs_per_s"],
            cell["ratio_to_stored_limit"],
            cell["mean_batch_size"],
            cell.get("proxy_cpu_ms_per_1k"),
            cell.get("upstream_cpu_ms_per_1k"),
            cell.get("clients_cpu_ms_per_1k"),
            _busy(cell),
        ]
        for row in batched
        for cell in row["proxy"]
    ]
    first = batched[0]
    stacks = (
        "each cell on a fresh upstream and modelgate of its own"
        if first["stack_per_cell"]
        else "all cells on one upstream and modelgate"
    )
    return [
        "",
        f"{first['clients']} clients inserting batches of {first['insert_batch']} (docs/s), "
        f"{stacks}: U the upstream alone (interleaved with modelgate, in rounds), M "
        "onnxruntime alone (batch 64), limit 1/(1/U + 1/M), modelgate per model batch "
        "maxSize; U stored: the upstream alone inserting the documents as modelgate stored "
        "them (outputs included; measured like U), /stored limit: modelgate over "
        "1/(1/U stored + 1/M); "
        "CPU: ms per 1,000 documents of modelgate's process, the upstream's and the "
        "clients'; busy: the cores those three kept busy in modelgate's runs / in U's",
        format_table(
            [
                *("model", "maxSize", "U", "M", "limit", "modelgate", "/limit"),
                *("U stored", "/stored limit", "mean batch", "proxy CPU", "upstream CPU"),
                *("clients CPU", "busy"),
            ],
            rows,
            floatfmt=[
                *("", "", ".0f", ".0f", ".0f", ".0f", ".2f"),
                *(".0f", ".2f", ".1f", ".0f", ".0f", ".0f", ""),
            ],
        ),
        "no model: " + "; ".join(_no_model_text(row) for row in batched),
    ]


def _no_model_text(row: dict[str, Any]) -> str:
    through = row["proxy_no_model"]
    return (
        f"{row['model']} through modelgate {through['docs_per_s']:.0f} docs/s "
        f"(x{through['docs_per_s'] / through['upstream_docs_per_s']:.2f} of U; the bare "
        f"frame forwarder x{through['forwarder_docs_per_s'] / through['upstream_docs_per_s']:.2f}"
        "), proxy CPU "
        f"{_ms(through['proxy_cpu_ms_per_1k'])}, upstream CPU "
        f"{_ms(through['upstream']['upstream_cpu_ms_per_1k'])} direct"
    )


def _busy(cell: dict[str, Any]) -> str:
    cores = (cell.get("cores_busy"), cell.get("upstream_cores_busy"))
    return "/".join("-" if value is None else f"{value:.2f}" for value in cores)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
