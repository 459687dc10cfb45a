"""registerModel: store an ONNX model as the next version of `name` and serve it."""

from __future__ import annotations

from typing import Any

import trio

from engine.spec import parse_register_command
from proxy.commands.common import command_fields, models_of, require_admin_db, require_db_admin
from proxy.session import CommandContext

__all__ = ["handle"]


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("registerModel", command)
    models = models_of(context)
    # Reading a `path` touches the disk: off the event loop.
    spec, onnx_bytes = await trio.to_thread.run_sync(
        parse_register_command, command_fields(command)
    )
    await require_db_admin(context, "registerModel", spec.db)
    record = await models.register(spec, onnx_bytes)
    server = models.get(spec.name)
    providers = list(server.model.providers) if server is not None else []
    context.log.info("registered model '%s' v%d on %s", spec.name, record.version, spec.namespace)
    return {"ok": 1.0, "name": spec.name, "version": record.version, "providers": providers}
