"""The batched-insert rows of `python -m bench inline`: CLIENTS clients each inserting
batches of BATCH documents through an inline model, against the machine's limit measured
in the same run.

The limit: a document costs an upstream insert and a model run, so with U the upstream's
insert rate of the same documents (same clients and batches, straight to it, no model;
measured right before and after each modelgate run) and M onnxruntime's rate on the same
inputs (batch MODEL_BATCH, input conversion included), nothing that does both in turn can
beat 1/(1/U + 1/M). modelgate's rate is
reported as a ratio of it, for two batch settings of the model: `maxSize` BATCH (each
client's insert is its own batch, so one client's model run can overlap another's
upstream insert) and CLIENTS x BATCH (the four clients' inserts merged into one batch).
The documents modelgate stores carry their outputs, which cost the upstream more to
store than the plain documents U is measured on; so each cell also gives the limit with
"U stored", the upstream's rate on a sample of the documents as modelgate stored them in
the cell's warm-up, measured like U (right before and after the timed run: U, U stored,
modelgate, U stored, U).

Beside the rates, each cell gives the CPU milliseconds per 1,000 documents of modelgate's
process and of the upstream's (read from /proc where this machine runs them): on a busy
host they move less than the rates do.

Fresh stacks: the embedded SecantusDB gets slower with every write it has taken, dropped
collections included (its CPU per insert doubled over 150,000 inserts), so cells run one
after another on one upstream are measured against different upstreams; a cell once
came out at 0.49 of its limit only because the upstream slid under it. So with the
embedded upstream (no --upstream) each cell, and the no-model run, gets a stack of its
own, a fresh upstream and a fresh modelgate in front (same arguments), torn down after
it: every cell starts from the same state. Within a cell the upstream still slides,
hence U and U stored right before and after. A given --upstream cannot be restarted:
all the cells share one stack there, as one modelgate in front of it."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


# CPU seconds used so far by (modelgate, the upstream); None for one this machine cannot read.
CpuProbe = Callable[[], tuple[float | None, float | None]]


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
    straight to the upstream, the CPU probe of its two processes, and which processes
    they are (recorded with every cell measured on them)."""

    proxy: list[pymongo.MongoClient[dict[str, Any]]]
    direct: list[pymongo.MongoClient[dict[str, Any]]]
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
            probe=lambda: (process_cpu_s(proxy_pid), upstream_cpu_seconds(stack.direct_uri)),
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
            with bench_stack(None, proxy_args=proxy_args) as stack, _ends(stack) as ends:
                yield ends

        yield fresh
        return
    with bench_stack(upstream_uri, proxy_args=proxy_args) as stack, _ends(stack) as ends:
        yield lambda: contextlib.nullcontext(ends)


def _cpu_ms_per_1k(
    probe: CpuProbe | None, before: tuple[float | None, float | None], docs: int
) -> dict[str, float | None]:
    after = probe() if probe is not None else (None, None)
    used = [
        None if a is None or b is None or not docs else 1e6 * (a - b) / docs
        for a, b in zip(after, before, strict=True)
    ]
    return {"proxy_cpu_ms_per_1k": used[0], "upstream_cpu_ms_per_1k": used[1]}


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
) -> tuple[float, int]:
    """Documents/s of `clients`, each inserting BATCH documents per insert_many, and how
    many they inserted."""
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
    return sum(counts) / (time.perf_counter() - started), sum(counts)


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


def _proxy_rate(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    attached: _Attached,
    workload: Workload,
    max_size: int,
    duration_s: float,
    probe: CpuProbe | None,
) -> dict[str, Any]:
    admin = clients[0].admin
    before = admin.command({"modelStatus": attached.name})
    cpu = probe() if probe is not None else (None, None)
    rate, docs = insert_rate(clients, attached.collection, workload.documents, duration_s)
    cpu_used = _cpu_ms_per_1k(probe, cpu, docs)
    after = admin.command({"modelStatus": attached.name})
    batches = int(after.get("batches", 0)) - int(before.get("batches", 0))
    items = float(after.get("meanBatchSize", 0.0)) * int(after.get("batches", 0)) - float(
        before.get("meanBatchSize", 0.0)
    ) * int(before.get("batches", 0))
    return {
        "max_size": max_size,
        "docs_per_s": rate,
        "mean_batch_size": items / batches if batches else 0.0,
        **cpu_used,
    }


def _plain_rate(
    ends: Ends,
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    documents: Sequence[dict[str, Any]],
    duration_s: float,
    probe: CpuProbe | None,
) -> dict[str, Any]:
    """Inserts of `documents` by `clients` (of `ends`) into a collection no model
    watches, and their CPU."""
    collection = f"plain_batched_{uuid.uuid4().hex[:8]}"
    try:
        cpu = probe() if probe is not None else (None, None)
        rate, docs = insert_rate(clients, collection, documents, duration_s)
        return {"docs_per_s": rate, **_cpu_ms_per_1k(probe, cpu, docs)}
    finally:
        ends.direct[0][DB_NAME].drop_collection(collection)


def _upstream_rate(ends: Ends, workload: Workload, duration_s: float) -> dict[str, Any]:
    """U: the workload's documents inserted straight into the upstream."""
    return _plain_rate(ends, ends.direct, workload.documents, duration_s, ends.probe)


def _mean_rate(runs: Sequence[dict[str, Any]]) -> float:
    return sum(run["docs_per_s"] for run in runs) / len(runs)


def _record_bracket(measured: dict[str, Any], ends: Ends, runs: list[dict[str, Any]]) -> None:
    """Give `measured` the mean of `runs` (U right before and after it) as its U, and
    the processes it ran on."""
    measured["upstream_docs_per_s"] = _mean_rate(runs)
    measured["stack"] = ends.processes


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

    Each cell (and the no-model run) is measured between two runs of U, and its U is
    their mean; with the embedded upstream (`upstream_uri` None) each on a fresh stack
    (upstream and modelgate started with `proxy_args`), see the module's docstring."""
    rows = []
    with _stacks(upstream_uri, proxy_args) as stack_per_cell:
        for workload in workloads:
            model = model_rate(workload, model_budget_s)
            direct: list[dict[str, Any]] = []
            with stack_per_cell() as ends:
                before = _upstream_rate(ends, workload, duration_s)
                # The proxy's own share: the same inserts through modelgate, with no model.
                no_model = _plain_rate(ends, ends.proxy, workload.documents, duration_s, ends.probe)
                runs = [before, _upstream_rate(ends, workload, duration_s)]
                _record_bracket(no_model, ends, runs)
            direct += runs
            settings = []
            for max_size in (BATCH, CLIENTS * BATCH):
                with (
                    stack_per_cell() as ends,
                    _attached(
                        ends.proxy, workload, max_size, max_delay_ms, min(1.0, duration_s)
                    ) as attached,
                ):
                    # U, and the upstream's rate on the documents as modelgate stored them
                    # (outputs in them, which cost the upstream more than the plain ones),
                    # each measured right before and right after the cell, in mirror order.
                    before = _upstream_rate(ends, workload, duration_s)
                    stored_before = _plain_rate(
                        ends, ends.direct, attached.stored, duration_s, None
                    )
                    cell = _proxy_rate(
                        ends.proxy, attached, workload, max_size, duration_s, ends.probe
                    )
                    stored_runs = [
                        stored_before,
                        _plain_rate(ends, ends.direct, attached.stored, duration_s, None),
                    ]
                    runs = [before, _upstream_rate(ends, workload, duration_s)]
                    _record_bracket(cell, ends, runs)
                direct += runs
                as_stored = _mean_rate(stored_runs)
                cell["stored_upstream_docs_per_s"] = as_stored
                cell["stored_upstream_runs"] = [run["docs_per_s"] for run in stored_runs]
                cell["stored_limit_docs_per_s"] = 1 / (1 / as_stored + 1 / model)
                cell["ratio_to_stored_limit"] = cell["docs_per_s"] / cell["stored_limit_docs_per_s"]
                cell["limit_docs_per_s"] = 1 / (1 / cell["upstream_docs_per_s"] + 1 / model)
                cell["ratio_to_limit"] = cell["docs_per_s"] / cell["limit_docs_per_s"]
                settings.append(cell)
            upstream = _mean_rate(direct)
            rows.append(
                {
                    "model": workload.name,
                    "clients": CLIENTS,
                    "insert_batch": BATCH,
                    "stack_per_cell": upstream_uri is None,
                    "upstream_docs_per_s": upstream,
                    "upstream_runs": direct,
                    "proxy_no_model_docs_per_s": no_model["docs_per_s"],
                    "proxy_no_model": no_model,
                    "model_docs_per_s": model,
                    "limit_docs_per_s": 1 / (1 / upstream + 1 / model),
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
        f"{stacks}: U the upstream alone (the mean of the runs right before and after "
        "this one), M onnxruntime alone (batch 64), limit 1/(1/U + 1/M), modelgate per model batch "
        "maxSize; U stored: the upstream alone inserting the documents as modelgate stored "
        "them (outputs included; measured like U), /stored limit: modelgate over "
        "1/(1/U stored + 1/M); "
        "CPU: ms per 1,000 documents of modelgate's process and of the upstream's",
        format_table(
            [
                *("model", "maxSize", "U", "M", "limit", "modelgate", "/limit"),
                *("U stored", "/stored limit", "mean batch", "proxy CPU", "upstream CPU"),
            ],
            rows,
            floatfmt=[
                *("", "", ".0f", ".0f", ".0f", ".0f", ".2f"),
                *(".0f", ".2f", ".1f", ".0f", ".0f"),
            ],
        ),
        "no model: " + "; ".join(_no_model(row) for row in batched),
    ]


def _no_model(row: dict[str, Any]) -> str:
    through = row["proxy_no_model"]
    return (
        f"{row['model']} through modelgate {through['docs_per_s']:.0f} docs/s "
        f"(x{through['docs_per_s'] / through['upstream_docs_per_s']:.2f} of U), proxy CPU "
        f"{_ms(through['proxy_cpu_ms_per_1k'])}, upstream CPU "
        f"{_ms(row['upstream_runs'][0]['upstream_cpu_ms_per_1k'])} direct"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
