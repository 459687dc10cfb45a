"""Publishing a model from Python: export a torch module to ONNX, register it, and
list, inspect, backfill, retry and drop models.

The helpers send modelgate's admin commands through any pymongo client pointed at
modelgate, so errors arrive as pymongo's usual `OperationFailure`. A model too large for
one command travels as a GridFS upload in the model's database, through the same client.
torch is an optional extra (`pip install 'modelgate[train]'`), imported only by
`export_onnx`."""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import bson
import gridfs
import gridfs.errors

from engine.registry import UPLOAD_BUCKET
from modelgate._torch import import_torch

if TYPE_CHECKING:
    import pymongo
    import torch

__all__ = [
    "MAX_COMMAND_ONNX_BYTES",
    "backfill_model",
    "drop_model",
    "export_onnx",
    "list_models",
    "model_status",
    "register_model",
    "retry_failed",
    "wait_for_backfill",
]

#: The largest ONNX model sent inside a registerModel command: a command is one BSON
#: document of at most 16 MiB, and the rest of the command needs some room. A larger
#: model is uploaded to GridFS and registerModel names the upload (`gridfs`).
MAX_COMMAND_ONNX_BYTES = 16 * 1024 * 1024 - 64 * 1024


def export_onnx(module: torch.nn.Module, example_input: torch.Tensor, *, opset: int = 17) -> bytes:
    """The module as ONNX bytes, with input `x` and output `y` whose first (batch)
    dimension is dynamic. `example_input` is one batch (any batch size)."""
    torch = import_torch()
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about its own deprecation and about tracing;
            # neither concerns the caller (the dynamo exporter needs onnxscript).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example_input,),
                buffer,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                opset_version=opset,
                dynamo=False,
            )
    finally:
        module.train(was_training)
    return buffer.getvalue()


def register_model(
    client: pymongo.MongoClient[Any],
    name: str,
    *,
    collection: str,
    input: str,
    model: bytes | torch.nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    output: str | None = None,
    mode: str = "inline",
    preprocess: Mapping[str, Any] | None = None,
    postprocess: Mapping[str, Any] | None = None,
    batch: Mapping[str, Any] | None = None,
    on_error: str | None = None,
    filter: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """Send `registerModel` and return the reply ({name, version, providers}).

    `model` is ONNX bytes or a torch module (exported with `example_input`). One over
    MAX_COMMAND_ONNX_BYTES is uploaded to GridFS (bucket UPLOAD_BUCKET in the database of
    `collection`) for the command to name, and the upload is removed once the command
    has answered, whatever its answer. Instead of `model`, an operator may name with
    `path` an ONNX file under the proxy's own --model-dir."""
    command: dict[str, Any] = {
        "registerModel": name,
        "collection": collection,
        "input": input,
        "mode": mode,
    }
    if (model is None) == (path is None):
        raise ValueError("pass exactly one of model (bytes or a torch module) or path")
    onnx: bytes | None = None
    if model is None:
        command["path"] = path
    elif isinstance(model, bytes | bytearray | memoryview):
        onnx = bytes(model)
    else:
        if example_input is None:
            raise ValueError("a torch module needs an example_input to be exported")
        onnx = export_onnx(model, example_input)
    optional = {
        "output": output,
        "preprocess": preprocess,
        "postprocess": postprocess,
        "batch": batch,
        "onError": on_error,
        "filter": filter,
        "metadata": metadata,
    }
    for key, value in optional.items():
        if value is not None:
            command[key] = dict(value) if isinstance(value, Mapping) else value
    if onnx is None or len(onnx) <= MAX_COMMAND_ONNX_BYTES:
        if onnx is not None:
            command["onnx"] = bson.Binary(onnx)
        return dict(client.admin.command(command))
    uploads = gridfs.GridFSBucket(client[collection.split(".", 1)[0]], bucket_name=UPLOAD_BUCKET)
    command["gridfs"] = uploads.upload_from_stream(f"{name}.onnx", onnx)
    try:
        return dict(client.admin.command(command))
    finally:
        with contextlib.suppress(gridfs.errors.NoFile):
            uploads.delete(command["gridfs"])


def list_models(client: pymongo.MongoClient[Any]) -> list[dict[str, Any]]:
    return list(client.admin.command("listModels")["models"])


def model_status(client: pymongo.MongoClient[Any], name: str) -> dict[str, Any]:
    return dict(client.admin.command("modelStatus", name))


def drop_model(client: pymongo.MongoClient[Any], name: str) -> dict[str, Any]:
    return dict(client.admin.command("dropModel", name))


def backfill_model(
    client: pymongo.MongoClient[Any], name: str, filter: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Send `backfillModel`: a deferred model recomputes its outputs (only those of the
    documents matching `filter`, when given). The reply counts them in `marked`."""
    command: dict[str, Any] = {"backfillModel": name}
    if filter is not None:
        command["filter"] = dict(filter)
    return dict(client.admin.command(command))


def wait_for_backfill(
    client: pymongo.MongoClient[Any], name: str, *, timeout: float = 600.0, poll: float = 0.25
) -> dict[str, Any]:
    """Poll `modelStatus` until a deferred model has nothing pending or in progress;
    returns the last status. TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = model_status(client, name)
        deferred = status.get("deferred", {})
        if deferred.get("pending", 1) == 0 and deferred.get("inProgress", 0) == 0:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"model '{name}' still has {deferred.get('pending')} documents pending "
                f"after {timeout:.0f}s"
            )
        time.sleep(poll)


def retry_failed(
    client: pymongo.MongoClient[Any], name: str, filter: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Send `retryFailed`: a deferred model predicts again the documents it stored an
    error record for (only those matching `filter`, when given), e.g. once their images
    are served again; a model paused for failing on everything resumes. The reply
    counts them in `marked`; `model_status(...)["failuresByReason"]` says what failed."""
    command: dict[str, Any] = {"retryFailed": name}
    if filter is not None:
        command["filter"] = dict(filter)
    return dict(client.admin.command(command))
