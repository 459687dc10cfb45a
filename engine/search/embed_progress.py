"""How far an autoEmbed index's derived model (engine.search.auto_embed) has come: the
counts its deferred queue gives modelStatus (engine.leases.WorkQueue), read by the
index's keeper (engine.search.keeper) in a worker thread.

MongoDB keeps an index with automated embedding BUILDING, not queryable, until its
initial sync is done: every document that was there has its embedding. Here that is
the first reading, after the keeper started, in which the derived model has nothing
pending (no document whose text has no output of its current version: an embedding,
or an error record once its attempts are spent). Later writes are counted as pending
without the index going back to BUILDING."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pymongo

from engine.errors import ModelNotFound
from engine.leases import WorkQueue
from engine.registry import ModelRecord, ModelRegistry
from engine.search.auto_embed import derived_model_name
from engine.search.definitions import AutoEmbedField

__all__ = ["EmbedCounts", "EmbedProgress"]

_OWNER = "search-index-status"  # a queue that only counts: it never claims


@dataclass(frozen=True)
class EmbedCounts:
    """One reading of the derived model's queue (None: the model is not registered)."""

    version: int | None = None
    pending: int = 0  # text written, no output of this version yet
    embedded: int = 0  # an embedding of this version
    failed: int = 0  # an error record of this version


class EmbedProgress:
    """The derived model of one autoEmbed index, read now and then (see the module)."""

    def __init__(
        self,
        client: pymongo.MongoClient[dict[str, Any]],
        namespace: str,
        index_name: str,
        field: AutoEmbedField,
    ) -> None:
        self.client = client
        self.registry = ModelRegistry(client)
        self.name = derived_model_name(namespace, index_name)
        self.namespace = namespace
        self.field = field
        self.counts = EmbedCounts()
        self.synced = False  # the initial sync was seen done
        self.read_seconds = 0.0  # how long the last reading took
        self._registered: ModelRecord | None = None

    def read(self) -> EmbedCounts:
        """Read the counts now (synchronous pymongo: a worker thread). Raises
        ModelgateError / PyMongoError when the upstream fails."""
        started = time.monotonic()
        record = self._record()
        if record is None:
            counts = EmbedCounts()
        else:
            if not self._derived_for_this_index(record.spec.metadata):
                counts = EmbedCounts()  # an earlier index's, not yet replaced
            else:
                queue = WorkQueue.on(self.client, record.spec, record.version, _OWNER)
                counts = EmbedCounts(
                    version=record.version,
                    pending=queue.count_pending(),
                    embedded=queue.count_outputs(failed=False),
                    failed=queue.count_outputs(failed=True),
                )
        self.read_seconds = time.monotonic() - started
        self.counts = counts
        if counts.version is not None and counts.pending == 0:
            self.synced = True
        return counts

    def _record(self) -> ModelRecord | None:
        """The derived model's current registration; its spec (with the tokenizer, hundreds
        of kB) is read again only when its version changed."""
        version = self.registry.current_versions().get(self.name)
        if version is None:
            self._registered = None
        elif self._registered is None or self._registered.version != version:
            try:
                self._registered = self.registry.get(self.name)
            except ModelNotFound:  # dropped since the versions were read
                self._registered = None
        return self._registered

    def _derived_for_this_index(self, metadata: Mapping[str, Any] | None) -> bool:
        about = (metadata or {}).get("autoEmbed")
        if not isinstance(about, Mapping):
            return False
        return (about.get("namespace"), about.get("path"), about.get("model")) == (
            self.namespace,
            self.field.path,
            self.field.model,
        )
