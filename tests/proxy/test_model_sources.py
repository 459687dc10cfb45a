"""Where registerModel reads a model from: a `path` only under --model-dir (regular files,
no way out by symlink, under the size cap), and a `gridfs` upload read chunk by chunk on
the client's own upstream connection, the cap checked before the first chunk."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any, cast

import pytest
from bson import ObjectId

from engine.errors import BadValue
from engine.upstream_failures import UpstreamRefusal
from proxy.commands.model_sources import GridFSUpload, InlineModel, read_model_file
from proxy.session import CommandContext
from proxy.settings import ModelSourceSettings

MODEL = b"onnx model bytes"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(MODEL)
    return folder


def limits(directory: Path | None, max_bytes: int = 1024) -> ModelSourceSettings:
    return ModelSourceSettings(directory=directory, max_bytes=max_bytes)


def test_a_file_under_the_model_dir_is_read(model_dir: Path) -> None:
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "n.onnx").write_bytes(b"other")
    (model_dir / "alias.onnx").symlink_to(model_dir / "sub" / "n.onnx")
    assert read_model_file("m.onnx", limits(model_dir)) == MODEL
    assert read_model_file(str(model_dir / "m.onnx"), limits(model_dir)) == MODEL
    assert read_model_file("sub/../sub/n.onnx", limits(model_dir)) == b"other"
    # A symlink that stays inside the folder is followed.
    assert read_model_file("alias.onnx", limits(model_dir)) == b"other"


def test_path_is_off_without_a_model_dir(model_dir: Path) -> None:
    with pytest.raises(BadValue, match=r"'path' is off .*--model-dir"):
        read_model_file(str(model_dir / "m.onnx"), limits(None))


def test_refusals(model_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(MODEL)
    (model_dir / "escape.onnx").symlink_to(outside)
    (model_dir / "up").symlink_to(tmp_path)
    os.mkfifo(model_dir / "fifo.onnx")
    (model_dir / "folder").mkdir()
    (model_dir / "empty.onnx").write_bytes(b"")
    with open(model_dir / "big.onnx", "wb") as big:
        big.truncate(1025)  # one byte over the cap, sparse: never read
    cases = {
        str(outside): "not under the model directory",
        "../outside.onnx": "not under the model directory",
        "escape.onnx": "a symlink leads out of it",
        "up/outside.onnx": "a symlink leads out of it",
        # Opening a FIFO for reading would block until a writer came: refused unopened.
        "fifo.onnx": "not a regular file",
        "folder": "not a regular file",
        ".": "not a regular file",
        "empty.onnx": "is empty",
        "big.onnx": "1025 bytes, over this modelgate's limit of 1024 bytes (--max-model-bytes)",
        "missing.onnx": "cannot read model file 'missing.onnx': No such file",
        "m.onnx\x00.txt": "NUL",
    }
    for path, message in cases.items():
        with pytest.raises(BadValue, match=re.escape(message)):
            read_model_file(path, limits(model_dir))


def test_a_device_is_refused_unread() -> None:
    # /dev as the model folder: /dev/zero is under it, and reading it would never end.
    with pytest.raises(BadValue, match="'zero' is not a regular file"):
        read_model_file("zero", limits(Path("/dev")))


async def test_inline_bytes_are_capped_too() -> None:
    context = cast(CommandContext, object())
    assert await InlineModel(MODEL).read(context, "shop", limits(None)) == MODEL
    with pytest.raises(BadValue, match=r"'onnx' is 16 bytes, over .* limit of 15 bytes"):
        await InlineModel(MODEL).read(context, "shop", limits(None, max_bytes=15))


class FakeUpstream:
    """Answers find and getMore on a GridFS bucket of in-memory documents, two chunks to a
    batch, and records every command (the client's own connection, as CommandContext's)."""

    def __init__(self, files: list[dict[str, Any]], chunks: list[dict[str, Any]]) -> None:
        self.files = files
        self.chunks = chunks
        self.commands: list[dict[str, Any]] = []
        self.refusal: dict[str, Any] | None = None
        self._pending: list[dict[str, Any]] = []

    async def upstream_command(self, document: dict[str, Any]) -> dict[str, Any]:
        self.commands.append(document)
        assert document["$db"] == "shop"
        if self.refusal is not None:
            return self.refusal
        if "getMore" in document:
            batch, self._pending = self._pending[:2], self._pending[2:]
            return {"ok": 1.0, "cursor": {"id": 7 if self._pending else 0, "nextBatch": batch}}
        query = document["filter"]
        if document["find"] == "modelgate_uploads.files":
            found = [f for f in self.files if all(f.get(k) == v for k, v in query.items())]
            found.sort(key=lambda f: f["uploadDate"], reverse=True)
            return {"ok": 1.0, "cursor": {"id": 0, "firstBatch": found[:1]}}
        assert document["find"] == "modelgate_uploads.chunks"
        found = [c for c in self.chunks if c["files_id"] == query["files_id"]]
        found.sort(key=lambda c: c["n"])
        batch, self._pending = found[:2], found[2:]
        return {"ok": 1.0, "cursor": {"id": 7 if self._pending else 0, "firstBatch": batch}}


def uploaded(data: bytes, chunk_size: int = 3, filename: str = "m.onnx") -> FakeUpstream:
    file_id = ObjectId()
    chunks = [
        {"files_id": file_id, "n": n, "data": data[start : start + chunk_size]}
        for n, start in enumerate(range(0, len(data), chunk_size))
    ]
    day = datetime.datetime(2024, 1, 2)
    files = [{"_id": file_id, "filename": filename, "length": len(data), "uploadDate": day}]
    return FakeUpstream(files, chunks)


async def read_upload(upstream: FakeUpstream, file: Any, max_bytes: int = 1024) -> bytes:
    context = cast(CommandContext, upstream)
    return await GridFSUpload(file).read(context, "shop", limits(None, max_bytes))


async def test_an_upload_is_read_by_id_or_by_latest_filename() -> None:
    upstream = uploaded(MODEL)
    assert await read_upload(upstream, upstream.files[0]["_id"]) == MODEL
    # Six chunks of three bytes: a first batch and two getMores.
    assert sum("getMore" in command for command in upstream.commands) == 2
    older = {**upstream.files[0], "_id": ObjectId(), "uploadDate": datetime.datetime(2023, 1, 1)}
    upstream.files.append(older)
    assert await read_upload(upstream, "m.onnx") == MODEL


async def test_an_upload_over_the_cap_is_refused_before_its_chunks_are_read() -> None:
    upstream = uploaded(MODEL)
    with pytest.raises(BadValue, match=r"is 16 bytes, over .* limit of 15 bytes"):
        await read_upload(upstream, "m.onnx", max_bytes=15)
    assert [command["find"] for command in upstream.commands] == ["modelgate_uploads.files"]


async def test_broken_uploads_are_refused() -> None:
    with pytest.raises(BadValue, match=r"no GridFS upload 'other.onnx' in shop\.modelgate_up"):
        await read_upload(uploaded(MODEL), "other.onnx")
    missing_chunk = uploaded(MODEL)
    del missing_chunk.chunks[2]
    with pytest.raises(BadValue, match="chunk 2 is missing"):
        await read_upload(missing_chunk, "m.onnx")
    short = uploaded(MODEL)
    short.files[0]["length"] = 20
    with pytest.raises(BadValue, match="incomplete: 16 of its 20 bytes"):
        await read_upload(short, "m.onnx")
    long = uploaded(MODEL)
    long.files[0]["length"] = 10
    with pytest.raises(BadValue, match="more bytes than its length, 10"):
        await read_upload(long, "m.onnx")
    no_length = uploaded(MODEL)
    del no_length.files[0]["length"]
    with pytest.raises(BadValue, match="no valid 'length'"):
        await read_upload(no_length, "m.onnx")
    with pytest.raises(BadValue, match="is empty"):
        await read_upload(uploaded(b""), "m.onnx")


async def test_a_refusal_of_the_upstream_keeps_its_code() -> None:
    # The client's own connection: what the client may not read, the proxy does not either.
    upstream = uploaded(MODEL)
    upstream.refusal = {"ok": 0.0, "code": 13, "codeName": "Unauthorized", "errmsg": "no"}
    with pytest.raises(UpstreamRefusal) as refusal:
        await read_upload(upstream, "m.onnx")
    assert (refusal.value.code, refusal.value.code_name, refusal.value.message) == (
        13,
        "Unauthorized",
        "no",
    )
