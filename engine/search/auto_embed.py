"""autoEmbed: a vector index field `{type: "autoEmbed", modality: "text", path, model}`
whose vectors modelgate makes itself, with a derived DEFERRED model.

The derived model is the named text embedding model (same ONNX, same pre/postprocess)
declared on the index's collection: input = the field's path, output =
`_autoEmbed.<index name>`, so its vectors are at `_autoEmbed.<index name>.vector`. The
deferred machinery then gives what MongoDB's automated embedding gives: an initial sync
of the documents already there, and every new or changed document embedded at least once
(writes around modelgate included). It is an ordinary model in the registry (listModels
and modelStatus show it, named `autoEmbed:<db>.<collection>:<index>`), registered and
dropped by the catalog with its index, so every modelgate process serves it.

A derived model's versions restart at 1 after a drop, and an output records the version
that made it: so outputs left by an earlier index of the same name are cleared when an
index is created (and when it is dropped), or a new index would take them as done."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pymongo
import pymongo.errors
import trio

from engine.batching import ModelServer, Prediction
from engine.errors import BadValue, ModelNotFound
from engine.models import ModelSet
from engine.registry import ModelRecord
from engine.search.definitions import (
    AUTO_EMBED_ROOT,
    MAX_DIMENSIONS,
    AutoEmbedField,
    auto_embed_output,
)
from engine.spec import MAX_NAME_LENGTH, ModelSpec
from engine.upstream_failures import upstream_failure

__all__ = [
    "ACCEPTED_PREPROCESS",
    "DERIVED_PREFIX",
    "AutoEmbedSource",
    "AutoEmbedder",
    "derived_model_name",
]

DERIVED_PREFIX = "autoEmbed:"
#: The preprocess kinds a model named by an autoEmbed field of modality "text" may have.
ACCEPTED_PREPROCESS: tuple[str, ...] = ("text",)
#: What a text model embeds to learn its dimension.
_PROBE_TEXT = "modelgate autoEmbed dimension probe"

Prepare = Callable[[ModelServer], Awaitable[None]]


def derived_model_name(namespace: str, index_name: str) -> str:
    """`autoEmbed:<db>.<collection>:<index>`, or, when that is no valid model name
    (over 120 characters, '$' or NUL in it), `autoEmbed:<hash of namespace and name>`."""
    name = f"{DERIVED_PREFIX}{namespace}:{index_name}"
    if len(name) > MAX_NAME_LENGTH or "$" in name or "\x00" in name:
        digest = hashlib.sha256(f"{namespace}\x00{index_name}".encode()).hexdigest()[:32]
        name = f"{DERIVED_PREFIX}{digest}"
    return name


@dataclass(frozen=True)
class AutoEmbedSource:
    """The served model an autoEmbed field names, and the dimension of its vectors."""

    model: str
    version: int
    num_dimensions: int


class AutoEmbedder:
    def __init__(
        self,
        models: ModelSet,
        client: pymongo.MongoClient[dict[str, Any]],
        *,
        prepare: Prepare | None = None,
    ) -> None:
        self.models = models
        self.client = client
        # DeferredWorkers.prepare: the derived model's queue indexes, before the reply.
        self.prepare = prepare

    async def resolve(self, field: AutoEmbedField) -> AutoEmbedSource:
        """The model `field` names, checked: registered, a text model, embeddings out."""
        server = self.models.get(field.model)
        if server is None:
            await self.models.refresh()  # registered through another process just now?
            server = self.models.get(field.model)
        if server is None:
            raise BadValue(
                f"autoEmbed model '{field.model}' is not a registered model: register a "
                "text embedding model with registerModel first"
            )
        spec = server.model.spec
        preprocess = spec.preprocess.to_document().get("kind")
        postprocess = spec.postprocess.to_document().get("kind")
        if preprocess not in ACCEPTED_PREPROCESS or postprocess != "embedding":
            raise BadValue(
                f"autoEmbed model '{field.model}' is not a text embedding model (its "
                f"preprocess is '{preprocess}' and its postprocess '{postprocess}'; "
                "modality 'text' needs preprocess 'text' and postprocess 'embedding')"
            )
        if spec.name.startswith(DERIVED_PREFIX):
            raise BadValue(f"autoEmbed model '{field.model}' is itself an index's derived model")
        dimensions = await self._dimensions(server)
        if field.given_dimensions and field.num_dimensions != dimensions:
            raise BadValue(
                f"autoEmbed numDimensions is {field.num_dimensions} but model "
                f"'{field.model}' makes vectors of {dimensions} dimensions"
            )
        return AutoEmbedSource(spec.name, server.version, dimensions)

    async def _dimensions(self, server: ModelServer) -> int:
        """The length of the vectors the model makes: one prediction on a probe value."""
        model = server.model
        if model.spec.preprocess.to_document().get("kind") == "text":
            probe: Any = _PROBE_TEXT
        else:
            probe = np.zeros(model.item_shape, dtype=model.input_dtype).tolist()
        [outcome] = await server.predict_values([probe])
        if not isinstance(outcome, Prediction):
            raise BadValue(
                f"autoEmbed model '{model.spec.name}' cannot embed a test value: {outcome.message}"
            )
        vector = outcome.value.get("vector")
        if not isinstance(vector, list) or not 1 <= len(vector) <= MAX_DIMENSIONS:
            size = len(vector) if isinstance(vector, list) else "no"
            raise BadValue(
                f"autoEmbed model '{model.spec.name}' makes {size} vector values; a vector "
                f"index takes 1 to {MAX_DIMENSIONS} dimensions"
            )
        return len(vector)

    async def derive(
        self, namespace: str, index_name: str, field: AutoEmbedField, source: AutoEmbedSource
    ) -> ModelRecord:
        """Register (or re-register, as a new version) the index's derived model."""
        record = self.models.records.get(source.model)
        if record is None:
            raise BadValue(f"autoEmbed model '{source.model}' was dropped")
        onnx_bytes = await trio.to_thread.run_sync(self.models.registry.onnx_bytes, record)
        name = derived_model_name(namespace, index_name)
        metadata = {
            "autoEmbed": {
                "namespace": namespace,
                "index": index_name,
                "path": field.path,
                "model": source.model,
                "modelVersion": record.version,
            }
        }
        derived = replace(
            record.spec,
            name=name,
            namespace=namespace,
            input_field=field.path,
            output_field=auto_embed_output(index_name),
            mode="deferred",
            on_error="record",
            filter=None,
            metadata=metadata,
        )
        # The one validation of a declaration (a namespace or path it refuses).
        derived = ModelSpec.from_document(derived.to_document())
        registered = await self.models.register(derived, onnx_bytes)
        server = self.models.get(name)
        if server is not None and self.prepare is not None:
            await self.prepare(server)
        return registered

    async def drop(self, namespace: str, index_name: str) -> None:
        """Drop the index's derived model (if any) and clear its outputs."""
        with contextlib.suppress(ModelNotFound):
            await self.models.drop(derived_model_name(namespace, index_name))
        await self.clear_outputs(namespace, index_name)

    async def clear_outputs(self, namespace: str, index_name: str) -> None:
        """Remove the outputs of an index of this name from the collection's documents."""
        db, collection = namespace.split(".", 1)
        output = auto_embed_output(index_name)

        def clear() -> None:
            try:
                documents = self.client[db][collection]
                documents.update_many({output: {"$exists": True}}, {"$unset": {output: ""}})
                # ...and the root, once no index's outputs are left in it.
                documents.update_many({AUTO_EMBED_ROOT: {}}, {"$unset": {AUTO_EMBED_ROOT: ""}})
            except pymongo.errors.PyMongoError as exc:
                raise upstream_failure(exc, f"clearing {output} in {namespace}") from exc

        await trio.to_thread.run_sync(clear)
