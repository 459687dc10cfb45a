"""The batched-insert rows of `python -m bench inline`: CLIENTS clients each inserting
batches of BATCH documents through an inline model, against the machine's limit measured
in the same run.

The limit: a document costs an upstream insert and a model run, so with U the upstream's
insert rate of the same documents (same clients and batches, straight to it, no model)
and M onnxruntime's rate on the same inputs (batch MODEL_BATCH, input conversion
included), nothing that does both in turn can beat 1/(1/U + 1/M). modelgate's rate is
reported as a ratio of it, for two batch settings of the model: `maxSize` BATCH (each
client's insert is its own batch, so one client's model run can overlap another's
upstream insert) and CLIENTS x BATCH (the four clients' inserts merged into one batch)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import bson
import numpy as np
import pymongo

from bench.models import BenchModel, noise_pngs
from bench.onnx_baseline import open_session, preprocess_spec
from bench.support.processes import BenchError
from modelgate.admin import register_model

__all__ = ["CLIENTS", "batched_rows", "image_workload", "mlp_workload"]

CLIENTS = 4
BATCH = 16
MODEL_BATCH = 64
FEATURES = 16
DISTINCT = 256
DB_NAME = "modelgate_bench_inline"


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
) -> float:
    """Documents/s of `clients`, each inserting BATCH documents per insert_many."""
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
    return sum(counts) / (time.perf_counter() - started)


def _proxy_rate(
    clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    workload: Workload,
    max_size: int,
    max_delay_ms: float,
    duration_s: float,
) -> dict[str, Any]:
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
        insert_rate(clients, collection, workload.documents, min(1.0, duration_s))  # warm-up
        before = admin.admin.command({"modelStatus": name})
        rate = insert_rate(clients, collection, workload.documents, duration_s)
        after = admin.admin.command({"modelStatus": name})
    finally:
        with contextlib.suppress(pymongo.errors.PyMongoError):
            admin.admin.command({"dropModel": name})
        admin[DB_NAME].drop_collection(collection)
    batches = int(after.get("batches", 0)) - int(before.get("batches", 0))
    items = float(after.get("meanBatchSize", 0.0)) * int(after.get("batches", 0)) - float(
        before.get("meanBatchSize", 0.0)
    ) * int(before.get("batches", 0))
    return {
        "max_size": max_size,
        "docs_per_s": rate,
        "mean_batch_size": items / batches if batches else 0.0,
    }


def batched_rows(
    proxy_clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    direct_clients: Sequence[pymongo.MongoClient[dict[str, Any]]],
    workloads: Sequence[Workload],
    *,
    duration_s: float,
    max_delay_ms: float,
    model_budget_s: float,
) -> list[dict[str, Any]]:
    """One row per workload: U, M, the limit, and modelgate at each batch setting."""
    rows = []
    for workload in workloads:
        plain = {}
        # The proxy's own share: the same inserts through modelgate, with no model.
        for target, clients in (("direct", direct_clients), ("proxy", proxy_clients)):
            collection = f"plain_batched_{uuid.uuid4().hex[:8]}"
            try:
                plain[target] = insert_rate(clients, collection, workload.documents, duration_s)
            finally:
                direct_clients[0][DB_NAME].drop_collection(collection)
        upstream = plain["direct"]
        model = model_rate(workload, model_budget_s)
        limit = 1 / (1 / upstream + 1 / model)
        settings = []
        for max_size in (BATCH, CLIENTS * BATCH):
            cell = _proxy_rate(proxy_clients, workload, max_size, max_delay_ms, duration_s)
            cell["ratio_to_limit"] = cell["docs_per_s"] / limit
            settings.append(cell)
        rows.append(
            {
                "model": workload.name,
                "clients": CLIENTS,
                "insert_batch": BATCH,
                "upstream_docs_per_s": upstream,
                "proxy_no_model_docs_per_s": plain["proxy"],
                "model_docs_per_s": model,
                "limit_docs_per_s": limit,
                "proxy": settings,
            }
        )
    return rows
