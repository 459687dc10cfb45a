"""modelgate's admin commands, one module each, in a table {name: handler}.

Commands not in the table go to MongoDB as before."""

from __future__ import annotations

from proxy.commands import (
    backfill_model,
    cache_status,
    drop_model,
    list_models,
    model_status,
    register_model,
)
from proxy.session import CommandHandler

__all__ = ["COMMANDS"]

COMMANDS: dict[str, CommandHandler] = {
    "registerModel": register_model.handle,
    "listModels": list_models.handle,
    "modelStatus": model_status.handle,
    "dropModel": drop_model.handle,
    "backfillModel": backfill_model.handle,
    "cacheStatus": cache_status.handle,
}
