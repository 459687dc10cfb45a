"""Models and documents for the model benchmarks (`bench inline`, `bench/gpu_check.py`).

Builders return what a user would hand to `registerModel`: ONNX bytes with a dynamic
batch dimension, the preprocess and postprocess documents that fit them, and generated
PNG bytes of the right size and mode. Weights are random (from a fixed seed): the
benchmarks measure throughput and latency, never accuracy, and the cost of a forward
pass does not depend on the weights' values. torch and torchvision are imported only
when a model is built, so that importing this module stays cheap."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "BenchModel",
    "build_digits",
    "build_model",
    "build_resnet18",
    "noise_pngs",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPSET = 17
SEED = 1234


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: its ONNX bytes and how documents reach it."""

    name: str
    onnx: bytes
    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    image_size: tuple[int, int]  # (H, W) of the generated PNGs (= the preprocess size)
    image_mode: str  # "RGB" or "L"
    build_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "onnx_bytes": len(self.onnx),
            "image_size": list(self.image_size),
            "image_mode": self.image_mode,
            "preprocess": self.preprocess,
            "postprocess": {k: v for k, v in self.postprocess.items() if k != "labels"}
            | {"labels": len(self.postprocess.get("labels", []))},
            "build_s": self.build_s,
            **self.info,
        }


def _export_onnx(module: Any, example: Any) -> bytes:
    """The module as ONNX (TorchScript exporter), batch dimension dynamic."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    # dynamo=False is asked for on purpose (small, plain graphs; no onnxscript needed):
    # its deprecation warning is not news to anyone running a benchmark.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def build_resnet18(seed: int = SEED) -> BenchModel:
    """torchvision's ResNet-18 with random weights, 224x224 RGB, 1000 classes."""
    import torch
    import torchvision

    started = time.perf_counter()
    torch.manual_seed(seed)
    module = torchvision.models.resnet18(weights=None)
    onnx = _export_onnx(module, torch.zeros(1, 3, 224, 224))
    return BenchModel(
        name="resnet18",
        onnx=onnx,
        preprocess={
            "kind": "image",
            "size": [224, 224],
            "mode": "RGB",
            "scale": 255,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "layout": "NCHW",
        },
        postprocess={"kind": "classify", "labels": [f"class_{i}" for i in range(1000)], "topK": 5},
        image_size=(224, 224),
        image_mode="RGB",
        build_s=time.perf_counter() - started,
        info={"architecture": "torchvision resnet18, random weights", "opset": OPSET},
    )


def _digits_module() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 14 x 14
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 7 x 7
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def build_digits(seed: int = SEED) -> BenchModel:
    """A small MNIST-shaped CNN (two conv layers, one linear), random weights,
    28x28 grayscale, 10 classes."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(seed)
    onnx = _export_onnx(_digits_module(), torch.zeros(1, 1, 28, 28))
    return BenchModel(
        name="digits",
        onnx=onnx,
        preprocess={
            "kind": "image",
            "size": [28, 28],
            "mode": "L",
            "scale": 255,
            "mean": [0.1307],
            "std": [0.3081],
            "layout": "NCHW",
        },
        postprocess={"kind": "classify", "labels": list(range(10)), "topK": 3},
        image_size=(28, 28),
        image_mode="L",
        build_s=time.perf_counter() - started,
        info={"architecture": "conv16-conv32-linear10, random weights", "opset": OPSET},
    )


MODELS: dict[str, Callable[[], BenchModel]] = {
    "resnet18": build_resnet18,
    "digits": build_digits,
}


def build_model(name: str) -> BenchModel:
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    return builder()


def noise_pngs(
    count: int, size: tuple[int, int], mode: str = "RGB", seed: int = SEED
) -> list[bytes]:
    """`count` PNGs of uniform random noise, `size` = (H, W), mode "RGB" or "L"; the
    same bytes for the same arguments. Noise barely compresses, so these are about the
    largest PNGs of that size (a 224x224 RGB one is ~150 KB): decoding them is the
    worst case, which is the honest one for a throughput benchmark."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images
