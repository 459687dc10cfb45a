"""Registering a benchmark's model with `modelgate.admin.register_model`.

A model that fits in a registerModel command is sent in it; a larger one (ResNet-50 and
up) is written to a file under `scratch` and registered by `path`, which works because
the benchmarks run modelgate on this same machine."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from modelgate import admin

__all__ = ["register_bench_model"]


def register_bench_model(
    client: Any, name: str, onnx: bytes, scratch: Path, **fields: Any
) -> dict[str, Any]:
    """`register_model(client, name, model=onnx or path=..., **fields)`; the reply."""
    if len(onnx) <= admin.MAX_COMMAND_ONNX_BYTES:
        return admin.register_model(client, name, model=onnx, **fields)
    # Named by content: runs that register the same model again reuse the file.
    path = scratch / f"{hashlib.sha1(onnx).hexdigest()[:16]}.onnx"
    if not path.exists():
        path.write_bytes(onnx)
    return admin.register_model(client, name, path=str(path), **fields)
