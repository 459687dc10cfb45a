"""modelgate's Python client: what runs in the user's own process.

It talks to a modelgate proxy over the wire, through any pymongo client pointed at it,
like any other client: export a torch module to ONNX, register, list, inspect, backfill,
retry and drop models (the helpers of `modelgate.admin`, exported here), and train an image
classifier from a query on a collection (`modelgate.train`, with the `train` extra).
torch is imported only by the functions that need it, so `import modelgate` works
without it."""

from modelgate.admin import (
    backfill_model,
    drop_model,
    export_onnx,
    list_models,
    model_status,
    register_model,
    retry_failed,
    wait_for_backfill,
)

__all__ = [
    "backfill_model",
    "drop_model",
    "export_onnx",
    "list_models",
    "model_status",
    "register_model",
    "retry_failed",
    "wait_for_backfill",
]
