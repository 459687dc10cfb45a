"""backfillModel: recompute a deferred model's outputs (optionally only those matching
`filter`), e.g. after fixing an input. New versions reprocess by themselves."""

from __future__ import annotations

from typing import Any

import trio

from engine.errors import BadValue, ModelNotFound, TypeMismatch
from proxy.commands.common import (
    command_fields,
    models_of,
    require_admin_db,
    require_db_admin,
    string_arg,
)
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("backfillModel", command)
    name = string_arg("backfillModel", command)
    fields = command_fields(command)
    unknown = set(fields) - {"backfillModel", "filter"}
    if unknown:
        raise BadValue(f"backfillModel: unknown field '{sorted(unknown)[0]}'")
    extra_filter = fields.get("filter")
    if extra_filter is not None and not isinstance(extra_filter, dict):
        raise TypeMismatch(
            f"backfillModel: filter must be a document, got {type(extra_filter).__name__}"
        )
    models = models_of(context)
    await models.refresh()
    server = models.get(name)
    if server is None or context.deferred is None:
        raise ModelNotFound(f"no model named '{name}'")
    if server.model.spec.mode != "deferred":
        raise BadValue(f"model '{name}' is inline; backfillModel applies to deferred models")
    await require_db_admin(context, "backfillModel", server.model.spec.db)
    queue = context.deferred.queue_for(server)
    marked = await trio.to_thread.run_sync(queue.mark_stale, extra_filter)
    context.deferred.kick_namespace(server.model.spec.namespace)
    context.log.info("backfill of model '%s': %d outputs to recompute", name, marked)
    return {"ok": 1.0, "name": name, "version": server.version, "marked": marked}
