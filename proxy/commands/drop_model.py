"""dropModel: stop predicting for new writes; outputs already stored stay."""

from __future__ import annotations

from typing import Any

import trio

from proxy.commands.common import models_of, require_admin_db, require_db_admin, string_arg
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("dropModel", command)
    name = string_arg("dropModel", command)
    models = models_of(context)
    record = await trio.to_thread.run_sync(models.registry.get, name)
    await require_db_admin(context, "dropModel", record.spec.db)
    dropped = await models.drop(name)
    context.log.info("dropped model '%s' (was v%d)", name, dropped.version)
    return {"ok": 1.0, "name": name, "version": dropped.version}
