"""What the commands on a deferred model's documents (backfillModel, retryFailed) share:
their arguments (`{<command>: <model>, filter: {...}}`), the checks on them, and who may
run them (a user who may administer the model's database)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.batching import ModelServer
from engine.deferred import DeferredWorkers
from engine.errors import BadValue, ModelNotFound, TypeMismatch
from proxy.commands.common import (
    command_fields,
    models_of,
    require_admin_db,
    require_db_admin,
    string_arg,
)
from proxy.session import CommandContext

__all__ = ["DeferredTarget", "deferred_target"]


@dataclass(frozen=True)
class DeferredTarget:
    name: str
    server: ModelServer
    deferred: DeferredWorkers
    # Only the model's documents matching it, when given.
    filter: dict[str, Any] | None


async def deferred_target(
    context: CommandContext, command_name: str, command: dict[str, Any]
) -> DeferredTarget:
    require_admin_db(command_name, command)
    name = string_arg(command_name, command)
    fields = command_fields(command)
    unknown = set(fields) - {command_name, "filter"}
    if unknown:
        raise BadValue(f"{command_name}: unknown field '{sorted(unknown)[0]}'")
    extra_filter = fields.get("filter")
    if extra_filter is not None and not isinstance(extra_filter, dict):
        raise TypeMismatch(
            f"{command_name}: filter must be a document, got {type(extra_filter).__name__}"
        )
    models = models_of(context)
    await models.refresh()
    server = models.get(name)
    if server is None or context.deferred is None:
        raise ModelNotFound(f"no model named '{name}'")
    if server.model.spec.mode != "deferred":
        raise BadValue(f"model '{name}' is inline; {command_name} applies to deferred models")
    await require_db_admin(context, command_name, server.model.spec.db)
    return DeferredTarget(name, server, context.deferred, extra_filter)
