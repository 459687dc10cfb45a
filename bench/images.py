"""`python -m bench images [--quick] [--json PATH]`: images/s through an inline model
whose input field holds image URLs.

For each model (the digits CNN on 28x28 grayscale PNGs, ResNet-18 on 224x224 RGB PNGs;
both from bench/models.py, or a one-layer stand-in when torch is missing), documents
`{"img": URL}` are inserted through `modelgate serve` by `--concurrency` threads:

- cold cache: a fresh --cache-dir, every URL new (each image is fetched over HTTP);
- warm cache: the same URLs again (each image is an LMDB hit);

against the same files decoded from local disk in this process (read, then
engine.inputs.image.preprocess_image_bytes, then onnxruntime session.run at the
proxy's mean batch size). The images are served by bench/support/image_server.py in
a process of its own, so that it does not share a GIL with anything measured. Also
reported: LMDB cache lookups/s for hits (bench.bench_cache's measurement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_cache import _lookup_rate
from bench.harness import add_common_arguments, finish, format_table, machine_info
from bench.support.image_server import serve_files_in_process
from bench.support.processes import BenchError, bench_stack, connect, redact_uri
from engine.stats import percentile
from modelgate.admin import register_model
from proxy.settings import positive

__all__ = ["SUMMARY", "main"]

SUMMARY = "images/s of an inline model on image URLs: cold cache, warm cache, local disk"

DB_NAME = "bench_images"


# --------------------------------------------------------------------------- models


def _models(names: Sequence[str]) -> list[Any]:
    """bench.models' builders, or stand-ins of the same input shapes without torch."""
    from bench.models import BenchModel, build_model

    built = []
    for name in names:
        try:
            built.append(build_model(name))
        except ImportError as exc:
            from bench.support.onnx_models import image_classifier

            side, mode = (28, "L") if name == "digits" else (224, "RGB")
            channels = 1 if mode == "L" else 3
            print(f"({name}: {exc}; using a one-layer stand-in)", file=sys.stderr)
            built.append(
                BenchModel(
                    name=f"{name}-standin",
                    onnx=image_classifier(channels=channels, size=(side, side)),
                    preprocess={"kind": "image", "size": [side, side], "mode": mode},
                    postprocess={"kind": "classify", "labels": ["black", "white"]},
                    image_size=(side, side),
                    image_mode=mode,
                    info={"architecture": "mean + linear stand-in (torch missing)"},
                )
            )
    return built


def _register(client: Any, model: Any, name: str) -> None:
    register_model(
        client,
        name,
        model=model.onnx,
        collection=f"{DB_NAME}.{name}",
        input="img",
        mode="inline",
        on_error="record",
        preprocess=model.preprocess,
        postprocess=model.postprocess,
    )


# --------------------------------------------------------------------------- runs


def _insert_all(
    client: Any, collection: str, urls: Sequence[str], concurrency: int
) -> dict[str, Any]:
    """Insert one document per URL from `concurrency` threads; images/s and latency."""
    coll = client[DB_NAME][collection]
    latencies: list[float] = []
    lock = threading.Lock()
    next_index = iter(range(len(urls)))

    def worker() -> None:
        own: list[float] = []
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            start = time.perf_counter()
            coll.insert_one({"i": i, "img": urls[i]})
            own.append(time.perf_counter() - start)
        with lock:
            latencies.extend(own)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - started
    return {
        "images": len(urls),
        "seconds": elapsed,
        "images_per_s": len(urls) / elapsed,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
        },
    }


def _status(admin: Any, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    model = admin.command({"modelStatus": name})
    return model, admin.command("cacheStatus")


def _local_disk(model: Any, files: Sequence[Path], batch: int) -> dict[str, Any]:
    """Read + decode + preprocess + session.run from local files, `batch` at a time."""
    import onnxruntime as ort

    from bench.onnx_baseline import preprocess_spec, session_options
    from engine.inputs.image import preprocess_image_bytes

    pre = preprocess_spec(model)
    session = ort.InferenceSession(
        model.onnx, session_options(), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    # One untimed batch: the first run allocates.
    first = [preprocess_image_bytes(files[0].read_bytes(), pre)] * batch
    session.run(None, {input_name: np.stack(first)})
    started = time.perf_counter()
    decode_s = 0.0
    for start in range(0, len(files), batch):
        t0 = time.perf_counter()
        items = [
            preprocess_image_bytes(path.read_bytes(), pre) for path in files[start : start + batch]
        ]
        decode_s += time.perf_counter() - t0
        session.run(None, {input_name: np.stack(items)})
    elapsed = time.perf_counter() - started
    return {
        "images": len(files),
        "batch": batch,
        "seconds": elapsed,
        "images_per_s": len(files) / elapsed,
        "decode_share": decode_s / elapsed,
    }


def _run_model(
    model: Any,
    proxy_uri: str,
    server_base: str,
    files: Sequence[Path],
    args: argparse.Namespace,
) -> dict[str, Any]:
    name = model.name.replace("-", "_")
    urls = [f"{server_base}/img/{path.stem}.png" for path in files]
    with connect(proxy_uri, maxPoolSize=max(8, args.concurrency * 2)) as client:
        _register(client, model, name)
        admin = client.admin
        _, before = _status(admin, name)
        cold = _insert_all(client, name, urls, args.concurrency)
        status, after_cold = _status(admin, name)
        warm = _insert_all(client, name, urls, args.concurrency)
        status, after_warm = _status(admin, name)
    fetched_cold = after_cold["fetch"]["fetches"] - before["fetch"]["fetches"]
    fetched_warm = after_warm["fetch"]["fetches"] - after_cold["fetch"]["fetches"]
    if status.get("errors"):
        raise BenchError(f"{name}: {status['errors']} predictions failed")
    if fetched_cold != len(urls) or fetched_warm != 0:
        raise BenchError(f"{name}: cold run fetched {fetched_cold}, warm run {fetched_warm}")
    cold["fetch_latency_ms"] = {
        "p50": after_cold["fetch"]["latency_p50_ms"],
        "p99": after_cold["fetch"]["latency_p99_ms"],
    }
    mean_batch = float(status.get("meanBatchSize") or 1.0)
    batch = max(1, round(mean_batch))
    local = _local_disk(model, files, batch)
    for run in (cold, warm):
        run["ratio_to_local_disk"] = run["images_per_s"] / local["images_per_s"]
    return {
        "model": model.describe(),
        "mean_image_bytes": round(statistics.fmean(path.stat().st_size for path in files)),
        "mean_batch_size": mean_batch,
        "cold_cache": cold,
        "warm_cache": warm,
        "local_disk": local,
        "cache_after": after_warm["cache"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.models import noise_pngs
    from engine.cache import EntryMeta, ImageCache

    models = _models(args.models)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelgate-bench-images-") as tmp:
        root = Path(tmp)
        files_by_model: dict[str, list[Path]] = {}
        all_files: list[Path] = []
        for model in models:
            count = args.images if model.image_size[0] <= 64 else args.large_images
            folder = root / "files" / model.name
            folder.mkdir(parents=True)
            paths = []
            pngs = noise_pngs(count, model.image_size, model.image_mode, seed=len(all_files) + 1)
            for i, body in enumerate(pngs):
                path = folder / f"{model.name}-{i}.png"
                path.write_bytes(body)
                paths.append(path)
            files_by_model[model.name] = paths
            all_files += paths

        # LMDB lookups for hits: every image of the run in a cache of its own.
        lookup_urls = [f"http://images.example/{path.name}" for path in all_files]
        with ImageCache(root / "lookups", max_bytes=1 << 30) as cache:
            for url, path in zip(lookup_urls, all_files, strict=True):
                cache.put(url, path.read_bytes(), EntryMeta(content_type="image/png"))
            lookups = {
                f"{n} thread{'s' if n > 1 else ''}": _lookup_rate(
                    cache, lookup_urls, n, args.seconds
                )
                for n in (1, 2)
            }

        server = serve_files_in_process(all_files)
        try:
            base = server.stdout.readline().strip() if server.stdout else ""
            if not base.startswith("http://127.0.0.1:"):
                raise BenchError(f"image server did not start: {base!r}")
            proxy_args = (
                "--data-dir", str(root / "data"),
                "--cache-dir", str(root / "cache"),  # fresh: every URL is new
                "--fetch-allow-private",
            )  # fmt: skip
            with bench_stack(args.upstream, proxy_args=proxy_args) as stack:
                for model in models:
                    print(f"... {model.name}", file=sys.stderr, flush=True)
                    results.append(
                        _run_model(model, stack.proxy_uri, base, files_by_model[model.name], args)
                    )
                upstream_uri = redact_uri(stack.direct_uri)
        finally:
            server.terminate()
            server.wait()
    return {
        "benchmark": "images",
        "quick": args.quick,
        "concurrency": args.concurrency,
        "upstream": "embedded SecantusDB" if not args.upstream else upstream_uri,
        "lookups_per_s": lookups,
        "models": results,
        "machine": machine_info(),
    }


def report(payload: dict[str, Any]) -> str:
    rows = []
    for result in payload["models"]:
        name = result["model"]["name"]
        size = (
            "x".join(map(str, result["model"]["image_size"])) + " " + result["model"]["image_mode"]
        )
        for label, key in (
            ("cold cache (HTTP)", "cold_cache"),
            ("warm cache (LMDB)", "warm_cache"),
        ):
            run_ = result[key]
            rows.append([
                name, size, label, run_["images"], run_["images_per_s"],
                run_["ratio_to_local_disk"], run_["latency_ms"]["p50"], run_["latency_ms"]["p99"],
            ])  # fmt: skip
        local = result["local_disk"]
        rows.append([
            name, size, f"local disk (batch {local['batch']})", local["images"],
            local["images_per_s"], 1.0, "", "",
        ])  # fmt: skip
    lines = [
        f"image URLs through an inline model, concurrency {payload['concurrency']}",
        "",
        format_table(
            ["model", "images", "source", "n", "images/s", "vs disk", "p50 ms", "p99 ms"], rows
        ),
        "",
        format_table(
            ["LMDB cache hits", "lookups/s"],
            [[name, round(rate)] for name, rate in payload["lookups_per_s"].items()],
        ),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, quick="under 90 s", database=DB_NAME)
    parser.add_argument(
        "--models", type=lambda text: [t for t in text.split(",") if t],
        default=["digits", "resnet18"], help="comma-separated (digits,resnet18)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=positive(int), default=8, help="inserting threads (8)"
    )
    parser.add_argument(
        "--images", type=positive(int), default=1000, help="28x28 images per phase (1000)"
    )
    parser.add_argument("--large-images", type=positive(int), default=200,
                        help="224x224 images per phase (200)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.0, help="per lookup measurement")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.images = min(args.images, 200)
        args.large_images = min(args.large_images, 24)
        args.seconds = min(args.seconds, 0.5)
    return finish("images", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
