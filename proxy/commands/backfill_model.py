"""backfillModel: recompute a deferred model's outputs (optionally only those matching
`filter`), e.g. after fixing an input. New versions reprocess by themselves."""

from __future__ import annotations

from typing import Any

import trio

from proxy.commands.deferred_target import deferred_target
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    target = await deferred_target(context, "backfillModel", command)
    server = target.server
    queue = target.deferred.queue_for(server)
    marked = await trio.to_thread.run_sync(queue.mark_stale, target.filter)
    target.deferred.kick_namespace(server.model.spec.namespace)
    context.log.info("backfill of model '%s': %d outputs to recompute", target.name, marked)
    return {"ok": 1.0, "name": target.name, "version": server.version, "marked": marked}
