"""Models and their versions, persisted in MongoDB so that every modelgate process on
the same upstream serves the same models and a restart loses nothing.

Database `modelgate`:
  models          one document per model name: the current version and its spec
  model_versions  one document per (name, version): spec, ONNX file id, checksum, time
  onnx.files/.chunks  GridFS bucket with the ONNX bytes (models can exceed 16 MB)

and in a model's own database, the GridFS bucket UPLOAD_BUCKET: models uploaded by
clients for registerModel's `gridfs` (the client's data: the registry copies them).

Everything here is synchronous pymongo; the async side calls it in worker threads. An
upstream failure is raised as a ModelgateError (engine.upstream_failures), so that the
admin command in progress replies with it and the background refresh logs it."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from dataclasses import dataclass
from typing import Any

import gridfs
import pymongo
import pymongo.errors

from engine.errors import ModelNotFound
from engine.spec import ModelSpec
from engine.upstream_failures import upstream_failure

__all__ = ["DATABASE", "UPLOAD_BUCKET", "ModelRecord", "ModelRegistry"]

DATABASE = "modelgate"
UPLOAD_BUCKET = "modelgate_uploads"


@dataclass(frozen=True)
class ModelRecord:
    """The current version of one model, as stored."""

    spec: ModelSpec
    version: int
    onnx_file_id: Any
    sha256: str
    size: int
    created: datetime.datetime

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "version": self.version,
            "namespace": self.spec.namespace,
            "input": self.spec.input_field,
            "output": self.spec.output_field,
            "mode": self.spec.mode,
            "created": self.created,
            "sha256": self.sha256,
            "size": self.size,
        }


class ModelRegistry:
    def __init__(self, client: pymongo.MongoClient[dict[str, Any]], database: str = DATABASE):
        self.db = client[database]
        self.models = self.db.models
        self.versions = self.db.model_versions
        self.files = gridfs.GridFSBucket(self.db, bucket_name="onnx")

    def register(self, spec: ModelSpec, onnx_bytes: bytes) -> ModelRecord:
        """Store a new version and make it current; returns its record (version n+1).

        The version number comes from an atomic counter on the model's document, so two
        processes registering the same name at once get distinct versions."""
        try:
            counter = self.models.find_one_and_update(
                {"_id": spec.name},
                {"$inc": {"latest": 1}},
                upsert=True,
                return_document=pymongo.ReturnDocument.AFTER,
            )
            assert counter is not None  # upsert with ReturnDocument.AFTER always returns one
            version = int(counter["latest"])
            digest = hashlib.sha256(onnx_bytes).hexdigest()
            file_id = self.files.upload_from_stream(
                f"{spec.name}.v{version}.onnx",
                onnx_bytes,
                metadata={"model": spec.name, "version": version, "sha256": digest},
            )
            created = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
            record = ModelRecord(spec, version, file_id, digest, len(onnx_bytes), created)
            document = self._document(record)
            self.versions.insert_one({"_id": f"{spec.name}@{version}", **document})
            # Only move forward: a slower concurrent registration of an older version
            # must not replace a newer one.
            self.models.update_one(
                {"_id": spec.name, "$or": [{"version": {"$lt": version}}, {"version": None}]},
                {"$set": document},
            )
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, f"storing model '{spec.name}'") from exc
        return record

    @staticmethod
    def _document(record: ModelRecord) -> dict[str, Any]:
        return {
            "name": record.spec.name,
            "version": record.version,
            "spec": record.spec.to_document(),
            "onnx_file_id": record.onnx_file_id,
            "sha256": record.sha256,
            "size": record.size,
            "created": record.created,
        }

    def current_versions(self) -> dict[str, int]:
        """Every model's current version by name (models whose registration is half done,
        with a counter but no version yet, are left out). Read without the specs: a text
        model's spec carries its tokenizer, hundreds of kB, and this is read every few
        seconds by every process."""
        try:
            documents = list(self.models.find({"version": {"$exists": True}}, {"version": 1}))
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, "reading the model registry") from exc
        return {document["_id"]: int(document["version"]) for document in documents}

    def get(self, name: str) -> ModelRecord:
        try:
            document = self.models.find_one({"_id": name, "version": {"$exists": True}})
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, f"reading model '{name}'") from exc
        if document is None:
            raise ModelNotFound(f"no model named '{name}'")
        return self._record(document)

    @staticmethod
    def _record(document: dict[str, Any]) -> ModelRecord:
        return ModelRecord(
            spec=ModelSpec.from_document(document["spec"]),
            version=int(document["version"]),
            onnx_file_id=document["onnx_file_id"],
            sha256=document["sha256"],
            size=int(document["size"]),
            created=document["created"],
        )

    def onnx_bytes(self, record: ModelRecord) -> bytes:
        which = f"the ONNX file of model '{record.spec.name}' v{record.version}"
        try:
            return self.files.open_download_stream(record.onnx_file_id).read()
        except gridfs.errors.NoFile as exc:
            raise ModelNotFound(f"{which} is missing from the registry") from exc
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, f"reading {which}") from exc

    def drop(self, name: str) -> ModelRecord:
        """Remove a model and its stored versions; outputs already written stay."""
        record = self.get(name)
        try:
            for version in self.versions.find({"name": name}, {"onnx_file_id": 1}):
                with contextlib.suppress(gridfs.errors.NoFile):
                    self.files.delete(version["onnx_file_id"])
            self.versions.delete_many({"name": name})
            self.models.delete_one({"_id": name})
        except pymongo.errors.PyMongoError as exc:
            raise upstream_failure(exc, f"dropping model '{name}'") from exc
        return record
