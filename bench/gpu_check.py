"""GPU check: ResNet-18 on onnxruntime's CUDA provider, plain and through modelgate.

Run from the repository root on a machine with an NVIDIA GPU, after
`pip uninstall -y onnxruntime && pip install onnxruntime-gpu` (from carried wheels;
nothing here needs the network)::

    python bench/gpu_check.py OUT_DIR [--quick] [--allow-cpu]

It writes to OUT_DIR:

- baseline.json: plain onnxruntime ResNet-18 (random weights, dynamic batch), CUDA
  provider vs CPU provider, batch sizes 1..64: `session.run` images/s, and end to end
  with PNG decode + preprocess in one thread (engine.inputs.image), per batch size.
- inline.json: `python -m bench inline` with modelgate started with
  `--providers CUDAExecutionProvider,CPUExecutionProvider` (the same providers for its
  baseline), both models, clients 1, 8, 32, 64.
- summary.txt: the tables of both, and the GPU's description (nvidia-smi).

It fails (exit status 2, with the reason) when the CUDA provider is not available or
does not actually take the model: onnxruntime would otherwise fall back to the CPU
silently. `--allow-cpu` runs the same steps on the CPU provider instead (a short run),
to test this script where there is no GPU."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: `python bench/gpu_check.py`
    sys.path.insert(0, str(ROOT))

from bench.harness import format_table, machine_info, write_json  # noqa: E402
from bench.models import build_digits, build_resnet18, noise_pngs  # noqa: E402
from bench.onnx_baseline import measure_baseline  # noqa: E402
from bench.support.processes import BenchError  # noqa: E402

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
BATCHES = (1, 2, 4, 8, 16, 32, 64)


class NoCuda(BenchError):
    """The CUDA execution provider cannot run models here."""


def check_cuda() -> list[str]:
    """The active providers of a small model on [CUDA, CPU]; raise NoCuda unless CUDA
    is the one in use."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        raise NoCuda(
            f"onnxruntime {ort.__version__} ({ort.get_device()}) has no {CUDA}; available: "
            f"{available}. Install onnxruntime-gpu (and uninstall onnxruntime) first."
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(build_digits().onnx, options, providers=[CUDA, CPU])
    active: list[str] = session.get_providers()
    if not active or active[0] != CUDA:
        raise NoCuda(
            f"{CUDA} is installed but a session asked for it runs on {active} (CUDA or "
            "cuDNN libraries missing, or no visible GPU: check nvidia-smi and "
            "LD_LIBRARY_PATH)"
        )
    return active


def gpu_description() -> dict[str, Any]:
    info: dict[str, Any] = {}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"nvidia_smi": None}
    query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
    result = subprocess.run(
        [smi, f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    info["nvidia_smi"] = result.stdout.strip() or result.stderr.strip()
    return info


def run_baselines(providers_by_name: dict[str, list[str]], *, short: bool) -> dict[str, Any]:
    model = build_resnet18()
    images = noise_pngs(64, model.image_size, model.image_mode)
    results: dict[str, Any] = {"model": model.describe(), "providers": {}}
    for name, providers in providers_by_name.items():
        print(f"baseline resnet18 on {providers} ...", flush=True)
        results["providers"][name] = measure_baseline(
            model,
            images,
            providers,
            batch_sizes=(1, 8) if short else BATCHES,
            budget_s=0.5 if short else 2.0,
            min_iterations=1 if short else 3,
            require_first=True,
            warmup=1 if short else 3,  # CUDA: first runs pick algorithms
        )
    return results


def baseline_table(results: dict[str, Any]) -> str:
    rows = []
    for name, result in results["providers"].items():
        for row in result["batches"]:
            rows.append(
                [
                    name,
                    row["batch"],
                    row["run_images_per_s"],
                    row["run_ms_per_batch"],
                    row["e2e_images_per_s"],
                ]
            )
    return format_table(
        ["provider", "batch", "run img/s", "run ms/batch", "e2e img/s"], rows, floatfmt=".1f"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/gpu_check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="folder for the JSON and summary")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without a usable CUDA provider, run on the CPU provider instead "
        "of failing (short run; for testing this script)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument(
        "--concurrency",
        default="1,8,32,64",
        help="client threads for the inline runs (default %(default)s)",
    )
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    try:
        active = check_cuda()
        cuda = True
        print(f"CUDA provider in use: {active}", flush=True)
    except NoCuda as exc:
        if not args.allow_cpu:
            print(f"gpu_check: FAILED: {exc}", file=sys.stderr)
            return 2
        print(f"gpu_check: no CUDA ({exc}); --allow-cpu: running on the CPU provider", flush=True)
        cuda = False
    short = args.quick or not cuda

    providers = {"cuda": [CUDA, CPU], "cpu": [CPU]} if cuda else {"cpu": [CPU]}
    try:
        baseline = run_baselines(providers, short=short)
    except BenchError as exc:
        print(f"gpu_check: FAILED: {exc}", file=sys.stderr)
        return 2
    write_json(
        args.out_dir / "baseline.json",
        {
            "benchmark": "gpu_check_baseline",
            "cuda": cuda,
            "gpu": gpu_description(),
            "machine": machine_info(),
            **baseline,
        },
    )
    table = baseline_table(baseline)
    print(table, flush=True)

    inline_json = args.out_dir / "inline.json"
    command = [
        sys.executable,
        "-m",
        "bench",
        "inline",
        "--json",
        str(inline_json),
        "--providers",
        ",".join(providers["cuda" if cuda else "cpu"]),
    ]
    if short:
        command += ["--quick", "--models", "digits,resnet18", "--concurrency", "1,8"]
    else:
        command += ["--concurrency", args.concurrency, "--duration", "8"]
    print("running:", " ".join(command), flush=True)
    inline = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    (args.out_dir / "inline.log").write_text(inline.stdout + inline.stderr)
    print(inline.stdout, flush=True)
    if inline.returncode != 0:
        print(
            f"gpu_check: FAILED: bench inline exited {inline.returncode}:\n{inline.stderr[-4000:]}",
            file=sys.stderr,
        )
        return 1

    summary = "\n".join(
        [
            f"gpu_check — cuda: {cuda}, {json.dumps(gpu_description())}",
            "",
            "plain onnxruntime, ResNet-18 (e2e = PNG decode + preprocess in one thread + run)",
            table,
            "",
            inline.stdout.strip(),
            "",
            f"total {time.perf_counter() - started:.0f} s",
        ]
    )
    (args.out_dir / "summary.txt").write_text(summary + "\n")
    print(f"wrote {args.out_dir}/baseline.json, inline.json, inline.log, summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
