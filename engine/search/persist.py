"""A local index on disk: written atomically, read back with every byte checked.

A directory per local index holds generations, each complete in its own folder:

    CURRENT            "g000042 <sha256 of g000042/manifest.bson>"
    g000042/manifest.bson   {format, dim, similarity, count, graphNodes,
                             connectivity, expansionAdd (the graph's M, efConstruction),
                             files: {name: {size, sha256}},
                             state: {...the upkeep's (resume token, definition, ...)}}
    g000042/vectors.npy     float32 [count, dim], the stored rows
    g000042/rows.bson       one BSON document per row: {s: slot, i: _id, f: filter values}
    g000042/graph.hnsw      the HNSW graph (engine.search.ann), nodes by slot

`save` writes a new generation, flushes it to disk, then replaces CURRENT (temporary
file + rename, the one atomic step) and removes older generations. A crash leaves
either the old generation or the new one current, never half of one. `load` checks
CURRENT's digest of the manifest, the format version and every file's size and
digest, and raises IndexDamaged for anything amiss: the caller rebuilds from MongoDB.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from bson import decode, decode_file_iter, encode
from bson.errors import BSONError

from engine.documents import FAITHFUL
from engine.search.ann import CONNECTIVITY, EXPANSION_ADD
from engine.search.local_index import LocalIndex, Snapshot

__all__ = ["FORMAT", "IndexDamaged", "load", "load_index", "remove", "save", "save_index"]

#: The version of the layout; a directory written by another version is rebuilt.
FORMAT = 1
_CURRENT = "CURRENT"
_FILES = ("vectors.npy", "rows.bson", "graph.hnsw")


class IndexDamaged(Exception):
    """The directory holds no readable index (missing, damaged, another format)."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(path: Path, data: bytes | bytearray | memoryview) -> dict[str, Any]:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _digest_file(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(source.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _generations(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("g[0-9]*") if p.is_dir())


def save(directory: Path, snapshot: Snapshot, state: Mapping[str, Any]) -> None:
    """Write `snapshot` and the upkeep's `state` (BSON-encodable) as the directory's
    current generation."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = _generations(directory)
    number = int(existing[-1].name[1:]) + 1 if existing else 1
    generation = directory / f"g{number:06d}"
    if generation.exists():
        shutil.rmtree(generation)
    generation.mkdir()
    vectors = io.BytesIO()
    np.save(vectors, np.ascontiguousarray(snapshot.vectors, dtype=np.float32))
    rows = b"".join(
        encode({"s": int(slot), "i": doc_id, "f": dict(values)}, codec_options=FAITHFUL)
        for slot, doc_id, values in zip(snapshot.slots, snapshot.ids, snapshot.values, strict=True)
    )
    graph = generation / "graph.hnsw"
    if snapshot.graph_file is not None:
        os.replace(snapshot.graph_file, graph)
    else:
        graph.write_bytes(b"")
    files = {
        "vectors.npy": _write(generation / "vectors.npy", vectors.getbuffer()),
        "rows.bson": _write(generation / "rows.bson", rows),
        "graph.hnsw": _digest_file(graph),
    }
    manifest = encode(
        {
            "format": FORMAT,
            "dim": snapshot.dim,
            "similarity": snapshot.similarity,
            "count": len(snapshot.ids),
            "graphNodes": snapshot.graph_nodes,
            "connectivity": snapshot.connectivity,
            "expansionAdd": snapshot.expansion_add,
            "files": files,
            "state": dict(state),
        },
        codec_options=FAITHFUL,
    )
    digest = _write(generation / "manifest.bson", manifest)["sha256"]
    _fsync_dir(generation)
    temporary = directory / f"{_CURRENT}.tmp"
    _write(temporary, f"{generation.name} {digest}\n".encode())
    os.replace(temporary, directory / _CURRENT)
    _fsync_dir(directory)
    for old in _generations(directory):
        if old != generation:
            shutil.rmtree(old, ignore_errors=True)


def _read_checked(path: Path, expected: Mapping[str, Any]) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IndexDamaged(f"{path.name}: {exc}") from exc
    if len(data) != expected.get("size") or hashlib.sha256(data).hexdigest() != expected.get(
        "sha256"
    ):
        raise IndexDamaged(f"{path.name}: size or checksum differs from the manifest")
    return data


def load(directory: Path) -> tuple[Snapshot, dict[str, Any]]:
    """(snapshot, state) of the current generation; IndexDamaged if there is none or
    anything in it fails a check."""
    try:
        current = (directory / _CURRENT).read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexDamaged(f"no current generation: {exc}") from exc
    if len(current) != 2 or not current[0].startswith("g") or "/" in current[0]:
        raise IndexDamaged("CURRENT is unreadable")
    generation = directory / current[0]
    try:
        raw = (generation / "manifest.bson").read_bytes()
    except OSError as exc:
        raise IndexDamaged(f"manifest: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != current[1]:
        raise IndexDamaged("manifest: checksum differs from CURRENT")
    try:
        manifest = decode(raw, codec_options=FAITHFUL)
        if manifest.get("format") != FORMAT:
            raise IndexDamaged(f"format {manifest.get('format')!r}, expected {FORMAT}")
        files = manifest["files"]
        data = {name: _read_checked(generation / name, files[name]) for name in _FILES}
        count, dim = int(manifest["count"]), int(manifest["dim"])
        vectors = np.load(io.BytesIO(data["vectors.npy"]), allow_pickle=False)
        rows = list(decode_file_iter(io.BytesIO(data["rows.bson"]), codec_options=FAITHFUL))
        if len(rows) != count or vectors.shape != (count, dim) or vectors.dtype != np.float32:
            raise IndexDamaged("the rows disagree with the manifest")
        snapshot = Snapshot(
            dim=dim,
            similarity=str(manifest["similarity"]),
            slots=np.array([row["s"] for row in rows], dtype=np.int64),
            vectors=vectors,
            ids=[row["i"] for row in rows],
            values=[row["f"] for row in rows],
            graph_file=(generation / "graph.hnsw") if data["graph.hnsw"] else None,
            graph_nodes=int(manifest.get("graphNodes", 0)),
            connectivity=int(manifest.get("connectivity", CONNECTIVITY)),
            expansion_add=int(manifest.get("expansionAdd", EXPANSION_ADD)),
        )
    except IndexDamaged:
        raise
    except (BSONError, KeyError, TypeError, ValueError, OSError) as exc:
        raise IndexDamaged(f"unreadable: {exc}") from exc
    return snapshot, dict(manifest.get("state") or {})


def remove(directory: Path) -> None:
    """Delete a local index's directory (its index was dropped)."""
    shutil.rmtree(directory, ignore_errors=True)


def save_index(directory: Path, index: LocalIndex, state: Mapping[str, Any]) -> None:
    """Save a local index (its rows copied and its graph saved under its lock, the
    rest written without it)."""
    directory.mkdir(parents=True, exist_ok=True)
    graph = directory / "graph.tmp"
    try:
        save(directory, index.snapshot(graph), state)
    finally:
        graph.unlink(missing_ok=True)


def load_index(directory: Path, *, threads: int = 1) -> tuple[LocalIndex, dict[str, Any]]:
    """(index, state) saved in `directory`; IndexDamaged if it cannot be had whole."""
    snapshot, state = load(directory)
    try:
        return LocalIndex.from_snapshot(snapshot, threads=threads), state
    except ValueError as exc:
        raise IndexDamaged(str(exc)) from exc
