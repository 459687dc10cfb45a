"""`python -m bench inline`: inserts into a collection with an inline model, through
modelgate, against plain onnxruntime running the same model on the same inputs.

For each model (ResNet-18 on 224x224 RGB PNGs, a small digits CNN on 28x28 grayscale
PNGs; random weights, see bench/models.py):

- inline: C client threads (each with its own MongoClient) call `insert_one({"img":
  BinData(png)})` through modelgate for a fixed time (or up to a document cap); every
  insert gets its prediction before it is stored. Reported: images/s, per-insert
  latency p50/p99, and the mean batch size the model ran at (modelStatus, counted
  over the timed phase only; a fresh model name per run).
- baseline: the same ONNX bytes in a plain onnxruntime InferenceSession in this
  process, the same session options as modelgate's (default thread counts, all graph
  optimisations, the same providers), at batch sizes 1, 8, 32, 64: images/s with the
  PNG decode and preprocess counted (`engine.inputs.image.preprocess_image_bytes`, one
  thread, then one `run` per batch) and, separately, the `session.run` rate alone. The
  best batch size of each is reported; the ratio is proxy / best end-to-end baseline.
- no model: the same documents inserted through modelgate and straight into the
  upstream, same concurrencies, so the proxy's own cost is visible.
- batched rows (bench/inline_batches.py): 4 clients inserting batches of 16 through an
  MLP and the digits CNN, against the limit 1/(1/U + 1/M) of the same run, U and
  modelgate interleaved in rounds; with the embedded upstream each of their cells on a
  fresh upstream and modelgate of its own, so that all start from the same state.

Everything (this process, modelgate, the embedded SecantusDB) shares the machine's
CPUs; the table's header says how many."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo

from bench.harness import add_common_arguments, finish, format_table, machine_info
from bench.inline_batches import (
    CLIENTS,
    batched_report,
    batched_rows,
    image_workload,
    mlp_workload,
)
from bench.insert_clients import DB_NAME, INPUT_FIELD, ClientPool, drive_inserts
from bench.models import MODELS, BenchModel, build_model, noise_pngs
from bench.onnx_baseline import BASELINE_BATCHES, measure_baseline, resolve
from bench.support.processes import DIRECT, PROXY, BenchError, bench_stack, redact_uri
from modelgate.admin import register_model

__all__ = ["Mode", "main", "run"]


@dataclass(frozen=True)
class Mode:
    concurrency: tuple[int, ...]
    duration_s: float  # timed phase of one (model, concurrency) run
    plain_duration_s: float  # timed phase of one no-model run
    max_docs: int  # per run, whichever comes first (bounds the in-memory upstream)
    warmup_per_client: int
    baseline_budget_s: float  # per (batch size, kind) of the baseline
    baseline_batches: tuple[int, ...]
    baseline_min_iterations: int  # per (batch size, kind), even past the budget
    images: int  # distinct PNGs per model, inserted round-robin
    models: tuple[str, ...]
    # Fewer concurrencies for slow models in quick runs.
    model_concurrency: dict[str, tuple[int, ...]]


QUICK = Mode(
    concurrency=(1, 8, 32),
    duration_s=2.0,
    plain_duration_s=1.0,
    max_docs=2_000,
    warmup_per_client=2,
    baseline_budget_s=0.5,
    baseline_batches=(1, 8, 32),
    baseline_min_iterations=1,
    images=32,
    models=("digits",),
    model_concurrency={"resnet18": (1, 8)},
)
FULL = Mode(
    concurrency=(1, 8, 32),
    duration_s=12.0,
    plain_duration_s=4.0,
    max_docs=20_000,
    warmup_per_client=2,
    baseline_budget_s=3.0,
    baseline_batches=BASELINE_BATCHES,
    baseline_min_iterations=3,
    images=64,
    models=("resnet18", "digits"),
    model_concurrency={},
)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- proxy


def _register(
    client: pymongo.MongoClient[Any],
    model: BenchModel,
    name: str,
    collection: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    return register_model(
        client,
        name,
        model=model.onnx,
        collection=f"{DB_NAME}.{collection}",
        input=INPUT_FIELD,
        mode="inline",
        preprocess=model.preprocess,
        postprocess=model.postprocess,
        batch={"maxSize": args.max_batch, "maxDelayMs": args.max_delay_ms},
    )


def _model_counters(admin: Any, name: str) -> dict[str, Any]:
    status = admin.command({"modelStatus": name})
    batches = int(status.get("batches", 0))
    return {
        "batches": batches,
        "items": float(status.get("meanBatchSize", 0.0)) * batches,
        "predicted": int(status.get("predicted", 0)),
        "errors": int(status.get("errors", 0)),
        "providers": list(status.get("providers", [])),
    }


def _inline_run(
    pools: dict[str, ClientPool],
    model: BenchModel,
    images: Sequence[bytes],
    concurrency: int,
    mode: Mode,
    args: argparse.Namespace,
    requested: Sequence[str] | None,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    name, collection = f"bench_{model.name}_c{concurrency}_{tag}", f"inline_{tag}"
    proxy_clients = pools[PROXY].clients[:concurrency]
    admin = proxy_clients[0].admin
    direct = pools[DIRECT].clients[0]
    reply = _register(proxy_clients[0], model, name, collection, args)
    providers = list(reply.get("providers", []))
    try:
        if requested and (not providers or providers[0] != requested[0]):
            raise BenchError(
                f"modelgate was asked for {requested[0]} but model {name!r} runs on {providers}"
            )
        warm = mode.warmup_per_client
        counters: dict[str, dict[str, Any]] = {}
        result = drive_inserts(
            proxy_clients,
            collection,
            images,
            duration_s=mode.duration_s,
            max_docs=mode.max_docs,
            warmup_per_client=warm,
            # Read after the warm-up inserts: only timed inserts count.
            on_ready=lambda: counters.update(before=_model_counters(admin, name)),
        )
        before, after = counters["before"], _model_counters(admin, name)
        stored = direct[DB_NAME][collection].find_one(
            {f"_outputs.{name}": {"$exists": True}}, {INPUT_FIELD: 0}
        )
        if stored is None:
            raise BenchError(f"no document of {collection} holds a prediction of {name}")
        warm_docs = warm * concurrency
        batches = after["batches"] - before["batches"]
        if after["errors"] > before["errors"]:
            raise BenchError(f"model {name}: {after['errors'] - before['errors']} failures")
        result.update(
            providers=providers,
            mean_batch_size=(after["items"] - before["items"]) / batches if batches else 0.0,
            batches=batches,
            warmup_docs=warm_docs,
            predicted=after["predicted"],
            mean_batch_size_incl_warmup=after["items"] / after["batches"]
            if after["batches"]
            else 0.0,
        )
        return result
    finally:
        with contextlib.suppress(pymongo.errors.PyMongoError):
            admin.command({"dropModel": name})
        direct[DB_NAME].drop_collection(collection)


def _plain_run(
    pool: ClientPool, images: Sequence[bytes], concurrency: int, mode: Mode
) -> dict[str, Any]:
    """The same inserts into a collection no model watches."""
    collection = f"plain_{uuid.uuid4().hex[:8]}"
    try:
        return drive_inserts(
            pool.clients[:concurrency],
            collection,
            images,
            duration_s=mode.plain_duration_s,
            max_docs=mode.max_docs,
            warmup_per_client=mode.warmup_per_client,
        )
    finally:
        pool.clients[0][DB_NAME].drop_collection(collection)


# --------------------------------------------------------------------------- the run


def _mode(args: argparse.Namespace) -> Mode:
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.concurrency:
        changes["concurrency"] = tuple(int(c) for c in args.concurrency.split(","))
        changes["model_concurrency"] = {}
    if args.duration is not None:
        changes["duration_s"] = args.duration
        changes["plain_duration_s"] = min(base.plain_duration_s, args.duration)
    if args.max_docs is not None:
        changes["max_docs"] = args.max_docs
    if args.models:
        changes["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    mode = Mode(**{**base.__dict__, **changes})
    unknown = sorted(set(mode.models) - set(MODELS))
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if not mode.concurrency or min(mode.concurrency) < 1:
        raise BenchError("--concurrency needs positive integers")
    return mode


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = _mode(args)
    requested = [p.strip() for p in args.providers.split(",")] if args.providers else None
    providers = resolve(requested)
    started = time.perf_counter()
    models: list[tuple[BenchModel, list[bytes]]] = []
    for name in mode.models:
        model = build_model(name)
        images = noise_pngs(mode.images, model.image_size, model.image_mode)
        _progress(
            f"{name}: ONNX {len(model.onnx) / 1e6:.1f} MB built in {model.build_s:.1f} s; "
            f"{len(images)} PNGs of {sum(map(len, images)) // len(images)} bytes"
        )
        models.append((model, images))

    results: list[dict[str, Any]] = []
    for model, images in models:
        _progress(f"{model.name}: baseline, plain onnxruntime on {providers} ...")
        baseline = measure_baseline(
            model,
            images,
            providers,
            batch_sizes=mode.baseline_batches,
            budget_s=mode.baseline_budget_s,
            min_iterations=mode.baseline_min_iterations,
            warmup=1 if args.quick else 2,
            require_first=bool(requested),
        )
        _progress(
            f"  best end-to-end {baseline['best_e2e']['images_per_s']:.1f} images/s "
            f"(batch {baseline['best_e2e']['batch']}), session.run alone "
            f"{baseline['best_run']['images_per_s']:.1f} images/s "
            f"(batch {baseline['best_run']['batch']})"
        )
        results.append(
            {"model": model.describe(), "baseline": baseline, "inline": [], "no_model": []}
        )

    proxy_args = ["--providers", ",".join(requested)] if requested else []
    proxy_args += args.proxy_arg or []
    profile = Path(args.profile_proxy).resolve() if args.profile_proxy else None
    top = max(max(mode.concurrency), *[max(c) for c in mode.model_concurrency.values()] or [1])
    with bench_stack(args.upstream, proxy_args=proxy_args, profile=profile) as stack:
        _progress(
            f"upstream {redact_uri(stack.direct_uri)}"
            f"{' (embedded SecantusDB)' if stack.embedded else ''}; "
            f"modelgate {stack.proxy_uri} {' '.join(proxy_args)}"
        )
        pools = {name: ClientPool(uri, top) for name, uri in stack.uris.items()}
        try:
            stack_started = time.perf_counter()
            for (model, images), result in zip(models, results, strict=True):
                best = result["baseline"]["best_e2e"]["images_per_s"]
                for concurrency in mode.model_concurrency.get(model.name, mode.concurrency):
                    cell = _inline_run(pools, model, images, concurrency, mode, args, requested)
                    cell["ratio_to_baseline"] = cell["images_per_s"] / best
                    result["inline"].append(cell)
                    _progress(
                        f"  {model.name} inline c={concurrency}: "
                        f"{cell['images_per_s']:.1f} images/s "
                        f"(x{cell['ratio_to_baseline']:.2f} of baseline), "
                        f"p50 {cell['latency_ms']['p50']:.1f} ms, "
                        f"p99 {cell['latency_ms']['p99']:.1f} ms, mean batch "
                        f"{cell['mean_batch_size']:.1f}"
                    )
                if args.no_plain:
                    continue
                for concurrency in mode.model_concurrency.get(model.name, mode.concurrency):
                    plain: dict[str, Any] = {"concurrency": concurrency}
                    for target in (PROXY, DIRECT):
                        plain[target] = _plain_run(pools[target], images, concurrency, mode)
                    result["no_model"].append(plain)
                    _progress(
                        f"  {model.name} documents, no model, c={concurrency}: proxy "
                        f"{plain[PROXY]['images_per_s']:.0f} docs/s, direct "
                        f"{plain[DIRECT]['images_per_s']:.0f} docs/s"
                    )
            stack_s = time.perf_counter() - stack_started
        finally:
            for pool in pools.values():
                pool.close()
    if profile is not None:
        _progress(f"modelgate profile (event loop thread) written to {profile}")
    batched: list[dict[str, Any]] = []
    batched_started = time.perf_counter()
    if not args.no_batched:
        # After the stack above is gone: with the embedded upstream they start their own.
        _progress(f"batched inserts: {CLIENTS} clients, mlp16 and digits ...")
        batched = batched_rows(
            args.upstream,
            [mlp_workload(), image_workload(build_model("digits"))],
            proxy_args=proxy_args,
            duration_s=mode.duration_s,
            max_delay_ms=args.max_delay_ms,
            model_budget_s=mode.baseline_budget_s,
        )
        for row in batched:
            _progress(
                f"  {row['model']}: limit {row['limit_docs_per_s']:.0f} docs/s; "
                + ", ".join(
                    f"maxSize {cell['max_size']}: {cell['docs_per_s']:.0f} docs/s "
                    f"(x{cell['ratio_to_limit']:.2f}; "
                    f"x{cell['ratio_to_stored_limit']:.2f} of the stored documents' limit)"
                    for cell in row["proxy"]
                )
            )
    return {
        "benchmark": "inline",
        "config": {
            "quick": args.quick,
            "models": list(mode.models),
            "concurrency": list(mode.concurrency),
            "model_concurrency": {k: list(v) for k, v in mode.model_concurrency.items()},
            "duration_s": mode.duration_s,
            "no_model_duration_s": mode.plain_duration_s,
            "max_docs": mode.max_docs,
            "warmup_per_client": mode.warmup_per_client,
            "images_per_model": mode.images,
            "batch": {"maxSize": args.max_batch, "maxDelayMs": args.max_delay_ms},
            "providers_requested": requested,
            "providers": providers,
            "proxy_args": proxy_args,
            "baseline_batches": list(mode.baseline_batches),
            "baseline_min_iterations": mode.baseline_min_iterations,
            "baseline_budget_s": mode.baseline_budget_s,
            "upstream": redact_uri(args.upstream) if args.upstream else "embedded SecantusDB",
            "profile": str(profile) if profile else None,
        },
        "machine": _machine(),
        "models": results,
        "batched": batched,
        "stack_s": stack_s,  # the inline and no-model runs
        "batched_s": time.perf_counter() - batched_started,
        "elapsed_s": time.perf_counter() - started,
    }


def _machine() -> dict[str, Any]:
    import onnxruntime as ort

    info = machine_info()
    info["onnxruntime"] = ort.__version__
    info["onnxruntime_device"] = ort.get_device()
    info["onnxruntime_providers_available"] = ort.get_available_providers()
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return info


def report(payload: dict[str, Any]) -> str:
    config, machine = payload["config"], payload["machine"]
    rows = []
    baseline_rows = []
    for result in payload["models"]:
        name = result["model"]["name"]
        baseline = result["baseline"]
        plain = {p["concurrency"]: p for p in result["no_model"]}
        for cell in result["inline"]:
            c = cell["concurrency"]
            rows.append(
                [
                    name,
                    c,
                    cell["images_per_s"],
                    baseline["best_e2e"]["images_per_s"],
                    cell["ratio_to_baseline"],
                    cell["latency_ms"]["p50"],
                    cell["latency_ms"]["p99"],
                    cell["mean_batch_size"],
                    plain[c][PROXY]["images_per_s"] if c in plain else None,
                    plain[c][DIRECT]["images_per_s"] if c in plain else None,
                    plain[c][PROXY]["latency_ms"]["p50"] if c in plain else None,
                ]
            )
        for row in baseline["batches"]:
            baseline_rows.append(
                [
                    name,
                    row["batch"],
                    row["e2e_images_per_s"],
                    row["run_images_per_s"],
                    row["run_ms_per_batch"],
                ]
            )
    cpus = machine.get("cpus_usable", machine["cpu_count"])
    return "\n".join(
        [
            f"modelgate inline benchmark — {machine['date']}, {cpus} CPUs "
            f"({machine.get('cpu_model', '?')}), onnxruntime {machine['onnxruntime']} on "
            f"{config['providers']}, upstream: {config['upstream']}, batch maxSize "
            f"{config['batch']['maxSize']} maxDelayMs {config['batch']['maxDelayMs']}, "
            f"{config['duration_s']:g} s per run",
            "",
            "inline inserts through modelgate (images/s, per-insert latency in ms) vs plain "
            "onnxruntime at its best batch size (decode + preprocess + run); the same "
            "documents with no model, through modelgate and straight to the upstream (docs/s)",
            format_table(
                [
                    "model",
                    "clients",
                    "proxy img/s",
                    "baseline img/s",
                    "proxy/base",
                    "p50 ms",
                    "p99 ms",
                    "mean batch",
                    "no-model proxy",
                    "no-model direct",
                    "no-model p50 ms",
                ],
                rows,
            ),
            "",
            "baseline: plain onnxruntime per batch size (images/s; e2e = PNG decode + "
            "preprocess in one thread + run)",
            format_table(
                ["model", "batch", "e2e img/s", "run img/s", "run ms/batch"],
                baseline_rows,
                floatfmt=".1f",
            ),
            *batched_report(payload["batched"]),
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench inline",
        description="Inline-model inserts through modelgate (images/s, p50/p99 latency, "
        "mean batch size) at several client concurrencies, against plain onnxruntime on "
        "the same model and inputs at its best batch size, and plain inserts of the same "
        "documents with no model (through modelgate and direct); then the batched rows: "
        f"{CLIENTS} clients inserting batches of 16 through an MLP and the digits CNN against "
        "the limit 1/(1/U + 1/M) (U the upstream alone, M onnxruntime alone).",
    )
    add_common_arguments(
        parser,
        quick=f"models {','.join(QUICK.models)}, "
        f"{QUICK.duration_s:g} s per run, baseline {QUICK.baseline_budget_s:g} s "
        f"per batch size (resnet18, if asked for, at concurrency 1 and 8 only)",
        database=DB_NAME,
    )
    parser.add_argument(
        "--models",
        metavar="A,B",
        help=f"models to run, of {', '.join(MODELS)} "
        f"(default: {','.join(FULL.models)}; --quick: {','.join(QUICK.models)})",
    )
    parser.add_argument(
        "--concurrency", metavar="1,8,32", help="client threads per run (default 1,8,32)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help=f"timed phase of each inline run and of each batched-row run "
        f"(default {FULL.duration_s:g}, "
        f"--quick {QUICK.duration_s:g})",
    )
    parser.add_argument(
        "--max-docs",
        type=int,
        metavar="N",
        help="stop a run after N timed inserts even before its duration",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=32,
        metavar="N",
        help="the model's batch.maxSize (default %(default)s)",
    )
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="the model's batch.maxDelayMs (default %(default)s)",
    )
    parser.add_argument(
        "--providers",
        metavar="LIST",
        help="onnxruntime providers, comma-separated, for modelgate "
        "(--providers) and the baseline alike; the first must be the one in "
        "use or the run fails (default: modelgate's automatic choice)",
    )
    parser.add_argument(
        "--proxy-arg",
        action="append",
        metavar="ARG",
        help="extra argument for `modelgate serve` (repeat; e.g. "
        "--proxy-arg=--max-concurrent-runs --proxy-arg=4)",
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the no-model inserts")
    parser.add_argument(
        "--no-batched",
        action="store_true",
        help="skip the batched-insert rows (4 clients, batches of 16, against the limit "
        "1/(1/U + 1/M), U and modelgate interleaved in rounds of at most 3 s; with the "
        "embedded upstream each of their cells starts a fresh upstream and modelgate of "
        "its own)",
    )
    parser.add_argument(
        "--profile-proxy",
        metavar="PATH",
        help="run modelgate under cProfile and write its profile to PATH (the modelgate "
        "of the inline and no-model runs; the batched rows start their own, unprofiled)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return finish("inline", build_parser().parse_args(argv), run, report)
