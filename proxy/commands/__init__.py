"""modelgate's admin commands, one module each, in a table {name: handler}.

Every handler in the table replies with a MongoDB error document when anything fails
inside it (proxy.commands.failures). Commands not in the table go to MongoDB as before."""

from __future__ import annotations

from proxy.commands import (
    backfill_model,
    cache_status,
    drop_model,
    list_models,
    model_status,
    register_model,
    retry_failed,
    search_indexes,
)
from proxy.commands.failures import replying_on_failure
from proxy.session import CommandHandler

__all__ = ["COMMANDS"]

COMMANDS: dict[str, CommandHandler] = {
    name: replying_on_failure(name, handler)
    for name, handler in {
        "registerModel": register_model.handle,
        "listModels": list_models.handle,
        "modelStatus": model_status.handle,
        "dropModel": drop_model.handle,
        "backfillModel": backfill_model.handle,
        "retryFailed": retry_failed.handle,
        "cacheStatus": cache_status.handle,
        "createSearchIndexes": search_indexes.create,
        "updateSearchIndex": search_indexes.update,
        "dropSearchIndex": search_indexes.drop,
    }.items()
}
