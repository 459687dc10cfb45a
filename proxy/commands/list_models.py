"""listModels: every model with its current version, as this process serves it."""

from __future__ import annotations

from typing import Any

from proxy.commands.common import models_of, require_admin_db
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("listModels", command)
    models = models_of(context)
    await models.refresh()
    listed = []
    for name, record in sorted(models.records.items()):
        server = models.get(name)
        summary = record.summary()
        summary["providers"] = list(server.model.providers) if server is not None else []
        if record.spec.metadata:
            summary["metadata"] = record.spec.metadata
        listed.append(summary)
    return {"ok": 1.0, "models": listed}
