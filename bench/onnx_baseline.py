"""Plain onnxruntime on a benchmark model, the way modelgate runs it (the same session
options and providers): the baselines the benchmarks compare modelgate with."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.models import BenchModel
from bench.support.processes import BenchError

__all__ = ["measure_baseline", "open_session", "preprocess_spec", "resolve", "session_options"]

BASELINE_BATCHES = (1, 8, 32, 64)


def session_options() -> Any:
    """The options engine.runtime.load_model gives every session (default threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.inter_op_num_threads = 0
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def resolve(providers: Sequence[str] | None) -> list[str]:
    """The providers modelgate would use for `--providers` (None: its automatic choice)."""
    from engine.runtime import RuntimeSettings, resolve_providers

    return resolve_providers(RuntimeSettings(providers=tuple(providers) if providers else None))


def open_session(onnx: bytes, providers: Sequence[str], *, require_first: bool) -> Any:
    """An InferenceSession; with `require_first`, fail unless the first provider asked for
    is the one in use (onnxruntime otherwise falls back to the next one silently)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, session_options(), providers=list(providers))
    active = session.get_providers()
    if require_first and (not active or active[0] != providers[0]):
        raise BenchError(
            f"onnxruntime was asked for {providers[0]} but runs on {active}; "
            f"available here: {ort.get_available_providers()}"
        )
    return session


def preprocess_spec(model: BenchModel) -> Any:
    from proxy.commands.register_model import parse_register_command

    spec, _ = parse_register_command(
        {
            "registerModel": model.name,
            "collection": "x.y",
            "input": "input",
            "onnx": b"-",
            "preprocess": model.preprocess,
            "postprocess": model.postprocess,
        }
    )
    return spec.preprocess


def _timed_loop(step: Any, budget_s: float, min_iterations: int = 3) -> tuple[int, float]:
    """Call `step()` until `budget_s` passed (at least `min_iterations` times)."""
    iterations = 0
    started = time.perf_counter()
    while True:
        step()
        iterations += 1
        elapsed = time.perf_counter() - started
        if iterations >= min_iterations and elapsed >= budget_s:
            return iterations, elapsed


def measure_baseline(
    model: BenchModel,
    images: Sequence[bytes],
    providers: Sequence[str],
    *,
    batch_sizes: Sequence[int] = BASELINE_BATCHES,
    budget_s: float = 2.0,
    min_iterations: int = 3,
    require_first: bool = False,
    warmup: int = 2,
) -> dict[str, Any]:
    """Plain onnxruntime on `model`: images/s per batch size, end to end (decode and
    preprocess in this thread, then one run) and `session.run` alone; and the best."""
    from engine.inputs.image import preprocess_image_bytes

    session = open_session(model.onnx, providers, require_first=require_first)
    pre = preprocess_spec(model)
    arrays = [preprocess_image_bytes(png, pre) for png in images]
    rows = [
        _baseline_batch(session, images, arrays, pre, batch, budget_s, min_iterations, warmup)
        for batch in batch_sizes
    ]
    best_e2e = max(rows, key=lambda r: r["e2e_images_per_s"])
    best_run = max(rows, key=lambda r: r["run_images_per_s"])
    return {
        "providers": session.get_providers(),
        "session_options": {
            "intra_op_num_threads": 0,
            "inter_op_num_threads": 0,
            "graph_optimization_level": "ORT_ENABLE_ALL",
        },
        "batches": rows,
        "best_e2e": {"batch": best_e2e["batch"], "images_per_s": best_e2e["e2e_images_per_s"]},
        "best_run": {"batch": best_run["batch"], "images_per_s": best_run["run_images_per_s"]},
    }


def _baseline_batch(
    session: Any,
    images: Sequence[bytes],
    arrays: Sequence[np.ndarray],
    pre: Any,
    batch: int,
    budget_s: float,
    min_iterations: int,
    warmup: int,
) -> dict[str, Any]:
    from engine.inputs.image import preprocess_image_bytes

    input_name = session.get_inputs()[0].name
    stacked = np.stack([arrays[i % len(arrays)] for i in range(batch)])
    for _ in range(warmup):
        session.run(None, {input_name: stacked})
    runs, run_s = _timed_loop(
        lambda: session.run(None, {input_name: stacked}), budget_s, min_iterations
    )
    cursor = 0

    def end_to_end() -> None:
        nonlocal cursor
        items = [
            preprocess_image_bytes(images[(cursor + i) % len(images)], pre) for i in range(batch)
        ]
        cursor += batch
        session.run(None, {input_name: np.stack(items)})

    e2e, e2e_s = _timed_loop(end_to_end, budget_s, min_iterations)
    return {
        "batch": batch,
        "run_images_per_s": runs * batch / run_s,
        "run_ms_per_batch": run_s / runs * 1e3,
        "e2e_images_per_s": e2e * batch / e2e_s,
        "e2e_ms_per_batch": e2e_s / e2e * 1e3,
        "run_iterations": runs,
        "e2e_iterations": e2e,
    }
