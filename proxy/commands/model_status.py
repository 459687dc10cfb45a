"""modelStatus: counts, batch sizes, latencies and provider of one model, and its
failures by reason (engine.error_records)."""

from __future__ import annotations

from typing import Any

import trio

from engine.error_records import failure_reasons
from engine.errors import ModelNotFound
from engine.spec import ImagePreprocess
from proxy.commands.cache_status import image_stats
from proxy.commands.common import models_of, require_admin_db, string_arg
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("modelStatus", command)
    name = string_arg("modelStatus", command)
    models = models_of(context)
    await models.refresh()
    server = models.get(name)
    record = models.records.get(name)
    if server is None or record is None:
        raise ModelNotFound(f"no model named '{name}'")
    status: dict[str, Any] = {
        "ok": 1.0,
        **record.summary(),
        "providers": list(server.model.providers),
        **server.stats.snapshot(),
    }
    if record.spec.metadata:
        status["metadata"] = record.spec.metadata
    if isinstance(record.spec.preprocess, ImagePreprocess):
        status["images"] = await image_stats(context)
    if context.deferred is not None:
        spec = record.spec
        collection = context.deferred.client[spec.db][spec.collection]
        status["failuresByReason"] = await trio.to_thread.run_sync(
            failure_reasons, collection, spec
        )
        if spec.mode == "deferred":
            status["deferred"] = await context.deferred.status(server)
    return status
