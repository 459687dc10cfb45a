"""registerModel: store an ONNX model as the next version of `name` and serve it.

The command is a declaration (validated by engine.spec) named by `registerModel`, plus
the model's bytes: inline in `onnx`, or a `path` on the disk of the modelgate process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from engine.errors import BadValue, TypeMismatch
from engine.spec import DECLARATION_FIELDS, ModelSpec
from proxy.commands.common import command_fields, models_of, require_admin_db, require_db_admin
from proxy.session import CommandContext

__all__ = ["handle", "parse_register_command"]

_COMMAND_FIELDS = frozenset({"registerModel", "onnx", "path", *DECLARATION_FIELDS})


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
    if server is not None and spec.mode == "deferred" and context.deferred is not None:
        await context.deferred.prepare(server)
    providers = list(server.model.providers) if server is not None else []
    context.log.info("registered model '%s' v%d on %s", spec.name, record.version, spec.namespace)
    return {"ok": 1.0, "name": spec.name, "version": record.version, "providers": providers}


def parse_register_command(fields: Mapping[str, Any]) -> tuple[ModelSpec, bytes]:
    """Validate a `registerModel` command; return the spec and the ONNX bytes.

    `fields` is the command document without the generic fields ($db, lsid, ...)."""
    for key in fields:
        if key not in _COMMAND_FIELDS:
            raise BadValue(f"registerModel: unknown field '{key}'")
    if "registerModel" not in fields:
        raise BadValue("missing required field 'registerModel'")
    spec = ModelSpec.from_document({**fields, "name": fields["registerModel"]})
    return spec, _model_bytes(fields)


def _model_bytes(fields: Mapping[str, Any]) -> bytes:
    has_onnx = fields.get("onnx") is not None
    has_path = fields.get("path") is not None
    if has_onnx == has_path:
        raise BadValue("registerModel needs exactly one of 'onnx' (bytes) or 'path'")
    if has_onnx:
        data = fields["onnx"]
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeMismatch(f"'onnx' must be binary data, got {type(data).__name__}")
        if not data:
            raise BadValue("'onnx' is empty")
        return bytes(data)
    path = fields["path"]
    if not isinstance(path, str):
        raise TypeMismatch(f"'path' must be a string, got {type(path).__name__}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadValue(f"cannot read model file '{path}': {e.strerror or e}") from e
    if not data:
        raise BadValue(f"model file '{path}' is empty")
    return data
