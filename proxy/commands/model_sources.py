"""Where registerModel takes a model's bytes from, each checked before a byte is read.

- `onnx`: the bytes, inside the command (so at most one 16 MiB message).
- `path`: a file on the proxy's host, only under the folder the operator names with
  --model-dir (off by default): a client never picks what the proxy reads from its disk.
  Only regular files, whose real path (symlinks resolved) stays inside that folder;
  opened with O_NONBLOCK | O_NOFOLLOW, so nothing swapped in after the checks (a FIFO, a
  symlink) can block a thread or lead elsewhere.
- `gridfs`: an upload in the bucket UPLOAD_BUCKET (`modelgate_uploads`) of the model's own database,
  read through the client's own upstream connection: the proxy reads only what the
  client itself may read, and the client needs no rights on modelgate's registry
  database. The upload is the client's: the proxy leaves it where it is
  (modelgate.admin.register_model removes its uploads itself).

Every source is bounded by --max-model-bytes, checked against the stated size (file
status, upload length) before reading and again on what was read."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from engine.errors import BadValue
from engine.registry import UPLOAD_BUCKET
from engine.upstream_failures import UpstreamRefusal
from proxy.session import CommandContext
from proxy.settings import ModelSourceSettings

__all__ = [
    "GridFSUpload",
    "InlineModel",
    "ModelFile",
    "ModelSource",
    "read_model_file",
]


class ModelSource(Protocol):
    async def read(
        self, context: CommandContext, database: str, limits: ModelSourceSettings
    ) -> bytes: ...


@dataclass(frozen=True)
class InlineModel:
    data: bytes

    async def read(
        self, context: CommandContext, database: str, limits: ModelSourceSettings
    ) -> bytes:
        _check_size(len(self.data), limits, "'onnx'")
        return self.data


@dataclass(frozen=True)
class ModelFile:
    path: str

    async def read(
        self, context: CommandContext, database: str, limits: ModelSourceSettings
    ) -> bytes:
        return await trio.to_thread.run_sync(read_model_file, self.path, limits)


@dataclass(frozen=True)
class GridFSUpload:
    file: Any  # the upload's _id, or (a string) its filename: the latest upload of that name

    async def read(
        self, context: CommandContext, database: str, limits: ModelSourceSettings
    ) -> bytes:
        files = f"{UPLOAD_BUCKET}.files"
        query = {"filename": self.file} if isinstance(self.file, str) else {"_id": self.file}
        found = await _run(
            context,
            {
                "find": files,
                "filter": query,
                "sort": {"uploadDate": -1},
                "limit": 1,
                "singleBatch": True,
                "$db": database,
            },
        )
        batch = found["cursor"]["firstBatch"]
        where = f"GridFS upload {self.file!r} in {database}.{UPLOAD_BUCKET}"
        if not batch:
            raise BadValue(f"no {where}")
        length = batch[0].get("length")
        # An int or bson.Int64 (drivers write either), never a bool.
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise BadValue(f"{where} has no valid 'length'")
        _check_size(length, limits, where)
        if length == 0:
            raise BadValue(f"{where} is empty")
        return await _read_chunks(context, database, batch[0]["_id"], length, where)


def read_model_file(path: str, limits: ModelSourceSettings) -> bytes:
    """The bytes of `path`, a regular file under `limits.directory` (a relative path is
    taken from there), refused with BadValue otherwise."""
    if limits.directory is None:
        raise BadValue(
            "registerModel: 'path' is off on this modelgate (the operator has named no "
            "--model-dir); send the model in 'onnx', or upload it to GridFS and name the "
            "upload in 'gridfs'"
        )
    if "\x00" in path:
        raise BadValue("'path' may not contain NUL characters")
    root = os.path.realpath(limits.directory)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise BadValue(
            f"model file '{path}' is not under the model directory (--model-dir), "
            "or a symlink leads out of it"
        )
    try:
        status = os.stat(real)
        if not stat.S_ISREG(status.st_mode):
            raise BadValue(f"model file '{path}' is not a regular file")
        _check_size(status.st_size, limits, f"model file '{path}'")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            opened = os.fstat(file.fileno())
            if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):
                raise BadValue(f"model file '{path}' was replaced while it was being opened")
            data = file.read(limits.max_bytes + 1)
    except OSError as e:
        raise BadValue(f"cannot read model file '{path}': {e.strerror or e}") from e
    _check_size(len(data), limits, f"model file '{path}'")
    if not data:
        raise BadValue(f"model file '{path}' is empty")
    return data


def _check_size(size: int, limits: ModelSourceSettings, what: str) -> None:
    if size > limits.max_bytes:
        raise BadValue(
            f"{what} is {size} bytes, over this modelgate's limit of {limits.max_bytes} "
            "bytes (--max-model-bytes)"
        )


async def _read_chunks(
    context: CommandContext, database: str, file_id: Any, length: int, where: str
) -> bytes:
    """The upload's chunks in order, refused if one is missing or they exceed `length`."""
    chunks = f"{UPLOAD_BUCKET}.chunks"
    data = bytearray()
    expected = 0
    reply = await _run(
        context,
        {"find": chunks, "filter": {"files_id": file_id}, "sort": {"n": 1}, "$db": database},
    )
    cursor = reply["cursor"]
    while True:
        for chunk in cursor.get("firstBatch", cursor.get("nextBatch", [])):
            piece = chunk.get("data")
            if chunk.get("n") != expected or not isinstance(piece, bytes):
                raise BadValue(f"{where}: chunk {expected} is missing or has no binary 'data'")
            data += piece
            if len(data) > length:
                raise BadValue(f"{where} holds more bytes than its length, {length}")
            expected += 1
        if not cursor["id"]:
            break
        reply = await _run(
            context, {"getMore": cursor["id"], "collection": chunks, "$db": database}
        )
        cursor = reply["cursor"]
    if len(data) != length:
        raise BadValue(f"{where} is incomplete: {len(data)} of its {length} bytes")
    return bytes(data)


async def _run(context: CommandContext, command: dict[str, Any]) -> dict[str, Any]:
    """`command` on the client's own upstream connection; a refusal keeps its code."""
    reply = await context.upstream_command(command)
    if not reply.get("ok"):
        raise UpstreamRefusal(
            str(reply.get("errmsg", "the upstream refused reading the upload")),
            code=int(reply.get("code", 1)),
            code_name=str(reply.get("codeName", "InternalError")),
        )
    return reply
