"""cacheStatus: the image cache and the URL fetcher of this process."""

from __future__ import annotations

from typing import Any

import trio

from engine.fetch import Fetcher
from proxy.commands.common import models_of, require_admin_db
from proxy.session import CommandContext

__all__ = ["handle", "image_stats"]


async def image_stats(context: CommandContext) -> dict[str, Any]:
    """Cache and fetch counters, or {} when image URLs are not served here."""
    fetcher = models_of(context).image_source
    if not isinstance(fetcher, Fetcher):
        return {}
    stats: dict[str, Any] = {"fetch": fetcher.stats()}
    if fetcher.cache is not None:
        # LMDB reads are quick, but they are disk reads: off the event loop.
        stats["cache"] = await trio.to_thread.run_sync(fetcher.cache.stats)
    return stats


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("cacheStatus", command)
    return {"ok": 1.0, **await image_stats(context)}
