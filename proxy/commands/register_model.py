"""registerModel: store an ONNX model as the next version of `name` and serve it.

The command is a declaration (validated by engine.spec) named by `registerModel`, plus
where the model's bytes are: inline in `onnx`, a `path` under the operator's
--model-dir, or a `gridfs` upload (proxy.commands.model_sources)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import ObjectId

from engine.errors import BadValue, TypeMismatch
from engine.spec import DECLARATION_FIELDS, ModelSpec
from proxy.commands.common import command_fields, models_of, require_admin_db, require_db_admin
from proxy.commands.model_sources import GridFSUpload, InlineModel, ModelFile, ModelSource
from proxy.session import CommandContext

__all__ = ["handle", "parse_register_command"]

_SOURCE_FIELDS = ("onnx", "path", "gridfs")
_COMMAND_FIELDS = frozenset({"registerModel", *_SOURCE_FIELDS, *DECLARATION_FIELDS})


async def handle(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    require_admin_db("registerModel", command)
    models = models_of(context)
    spec, source = parse_register_command(command_fields(command))
    # Authorized before anything is read, from the disk or the upstream.
    await require_db_admin(context, "registerModel", spec.db)
    onnx_bytes = await source.read(context, spec.db, context.model_sources)
    record = await models.register(spec, onnx_bytes)
    server = models.get(spec.name)
    if server is not None and spec.mode == "deferred" and context.deferred is not None:
        await context.deferred.prepare(server)
    providers = list(server.model.providers) if server is not None else []
    context.log.info("registered model '%s' v%d on %s", spec.name, record.version, spec.namespace)
    return {"ok": 1.0, "name": spec.name, "version": record.version, "providers": providers}


def parse_register_command(fields: Mapping[str, Any]) -> tuple[ModelSpec, ModelSource]:
    """Validate a `registerModel` command; return the spec and where its bytes are.

    `fields` is the command document without the generic fields ($db, lsid, ...)."""
    for key in fields:
        if key not in _COMMAND_FIELDS:
            raise BadValue(f"registerModel: unknown field '{key}'")
    if "registerModel" not in fields:
        raise BadValue("missing required field 'registerModel'")
    spec = ModelSpec.from_document({**fields, "name": fields["registerModel"]})
    return spec, _model_source(fields)


def _model_source(fields: Mapping[str, Any]) -> ModelSource:
    given = [key for key in _SOURCE_FIELDS if fields.get(key) is not None]
    if len(given) != 1:
        raise BadValue(
            "registerModel needs exactly one of 'onnx' (bytes), 'path' (a file under the "
            "proxy's --model-dir) or 'gridfs' (an upload's id or filename)"
        )
    value = fields[given[0]]
    if given[0] == "gridfs":
        if not isinstance(value, ObjectId | str):
            raise TypeMismatch(
                f"'gridfs' must be an upload's ObjectId or filename, got {type(value).__name__}"
            )
        return GridFSUpload(value)
    if given[0] == "path":
        if not isinstance(value, str):
            raise TypeMismatch(f"'path' must be a string, got {type(value).__name__}")
        return ModelFile(value)
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeMismatch(f"'onnx' must be binary data, got {type(value).__name__}")
    if not value:
        raise BadValue("'onnx' is empty")
    return InlineModel(bytes(value))
