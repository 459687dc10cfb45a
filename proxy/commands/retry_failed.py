"""retryFailed: a deferred model's documents whose output is an error record (optionally
only those matching `filter`) are predicted again, once what failed is fixed (an image
server back, a bad input corrected around the model's watch). A model paused because it
failed for every document resumes at once in this process."""

from __future__ import annotations

from typing import Any

import trio

from engine.fetch import Fetcher
from proxy.commands.common import models_of
from proxy.commands.deferred_target import deferred_target
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    target = await deferred_target(context, "retryFailed", command)
    server = target.server
    queue = target.deferred.queue_for(server)
    marked = await trio.to_thread.run_sync(queue.retry_failed, target.filter)
    fetcher = models_of(context).image_source
    if isinstance(fetcher, Fetcher):
        # A URL that failed a moment ago would otherwise fail again from memory.
        fetcher.forget_failures()
    target.deferred.resume(target.name)
    context.log.info("retry of model '%s': %d failed documents pending again", target.name, marked)
    return {"ok": 1.0, "name": target.name, "version": server.version, "marked": marked}
