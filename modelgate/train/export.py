"""Exporting the trained module through `modelgate.admin.export_onnx`, checked: the ONNX
model must answer as torch does before it is registered."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from modelgate import admin
from modelgate._torch import import_torch
from modelgate.train.errors import OnnxMismatchError

if TYPE_CHECKING:
    import torch

__all__ = ["check_onnx_agreement", "export_checked"]


def export_checked(
    module: torch.nn.Module, batch: np.ndarray, *, atol: float, rtol: float
) -> bytes:
    """ONNX bytes of `module` (on the CPU, in eval mode) with a dynamic batch dimension;
    onnxruntime's outputs on `batch` must match torch's (OnnxMismatchError otherwise)."""
    torch = import_torch()
    import onnxruntime as ort

    module.to("cpu").eval()
    onnx_bytes = admin.export_onnx(module, torch.from_numpy(batch[:2]))
    with torch.no_grad():
        expected = module(torch.from_numpy(batch)).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: batch})
    check_onnx_agreement(expected, actual, atol=atol, rtol=rtol)
    return onnx_bytes


def check_onnx_agreement(
    expected: np.ndarray, actual: np.ndarray, *, atol: float = 1e-4, rtol: float = 1e-3
) -> float:
    """Raise OnnxMismatchError unless onnxruntime's `actual` outputs match torch's
    `expected` within the tolerances; returns the largest absolute difference."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        raise OnnxMismatchError(
            f"the exported ONNX model gives outputs of shape {actual.shape}, "
            f"torch gives {expected.shape}"
        )
    if not np.all(np.isfinite(actual)):
        raise OnnxMismatchError("the exported ONNX model gives non-finite outputs")
    largest = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    if not np.allclose(actual, expected, atol=atol, rtol=rtol):
        raise OnnxMismatchError(
            f"the exported ONNX model disagrees with torch: largest difference {largest:.3g} "
            f"(atol={atol}, rtol={rtol}); the module may use an operation the exporter "
            "translates differently, or behave differently in eval mode"
        )
    return largest
