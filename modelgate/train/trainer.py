"""`ImageClassifierTrainer`: reads a labelled query, trains, exports and attaches.

It composes the concerns of this package: `dataset` (what is read), `loading` (the one
bridge to the trio-based fetcher), `loop` (the training loop), `export` (ONNX, checked)
and `modelgate.admin` (registration)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import bson.json_util
import numpy as np

from engine.fetch import FetchSettings
from modelgate import admin
from modelgate._torch import import_torch
from modelgate.train.dataset import Dataset, LabelledQuery, LoadReport
from modelgate.train.errors import TrainingError
from modelgate.train.export import export_checked
from modelgate.train.inputs import TrainingInput
from modelgate.train.loading import load_dataset
from modelgate.train.loop import Fitted, check_output_size, evaluate, fit_module

if TYPE_CHECKING:
    import pymongo
    import pymongo.collection
    import torch

__all__ = ["ImageClassifierTrainer"]

log = logging.getLogger("modelgate.train")


class ImageClassifierTrainer:
    """Trains a torch module that maps one image batch to `len(labels)` logits on the
    documents of `collection` (a pymongo Collection) that match `filter` (all by default).

    `preprocess` is the serving preprocess document (`{"kind": "image", "size": [28, 28],
    "mode": "L", ...}`, preferred: training and serving then share `preprocess_image_bytes`)
    or a callable taking a PIL image to a tensor (torchvision transforms); with a callable,
    `serving_preprocess` is the document to register, checked against the callable on the
    first images read (they must give the same input). Missing fields, unknown labels and
    unusable images are skipped and counted with `missing="skip"`, refused with
    `missing="error"`. URLs are fetched with `fetch` settings (private addresses are
    refused by default, as when serving) and cached in `cache_dir` (give the proxy's to
    share its cache). `client`, pointed at modelgate, registers the trained model."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        labels: Sequence[str | int],
        preprocess: Mapping[str, Any] | Callable[[Any], Any],
        client: pymongo.MongoClient[Any],
        collection: pymongo.collection.Collection[Any],
        input_field: str,
        label_field: str,
        filter: Mapping[str, Any] | None = None,
        validation_fraction: float = 0.2,
        missing: str = "skip",
        fetch: FetchSettings | None = None,
        cache_dir: str | None = None,
        serving_preprocess: Mapping[str, Any] | None = None,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        torch = import_torch()
        if not labels:
            raise TrainingError("labels may not be empty")
        if len(set(map(str, labels))) != len(labels):
            raise TrainingError(f"labels must be distinct, got {list(labels)}")
        if not 0.0 <= validation_fraction < 1.0:
            raise TrainingError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.module = module
        self.labels = list(labels)
        self.client = client
        self.query = LabelledQuery(
            collection,
            filter,
            input_field=input_field,
            label_field=label_field,
            labels=self.labels,
            missing=missing,
        )
        self.inputs = TrainingInput(preprocess, serving_preprocess)
        self.validation_fraction = validation_fraction
        self.fetch_settings = fetch or FetchSettings()
        self.cache_dir = cache_dir
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.report: LoadReport | None = None
        self.onnx_bytes: bytes | None = None
        self._data: Dataset | None = None
        if (item_shape := self.inputs.item_shape) is not None:
            # Catch a model that does not fit the labels before any document is read.
            self._check_output_size(np.zeros((1, *item_shape), np.float32))

    def _check_output_size(self, batch: np.ndarray) -> None:
        check_output_size(self.module, batch, len(self.labels), self.device)

    # -- reading the data -----------------------------------------------------------

    def load(self) -> LoadReport:
        """Read the query (again): fetch, preprocess and split the documents."""
        data = load_dataset(
            self.query,
            self.inputs,
            fetch=self.fetch_settings,
            cache_dir=self.cache_dir,
            validation_fraction=self.validation_fraction,
        )
        report = data.report
        self.query.check(report, self.validation_fraction)
        self._data, self.report = data, report
        log.info(
            "read %d documents in %.1fs: %d train, %d validation, skipped %s",
            report.documents,
            report.seconds,
            report.train,
            report.validation,
            report.skipped,
        )
        return report

    def _loaded(self) -> Dataset:
        if self._data is None:
            self.load()
        assert self._data is not None
        return self._data

    def split(self) -> tuple[list[Any], list[Any]]:
        """The `_id`s of the training and validation documents (read if not yet)."""
        data = self._loaded()
        return list(data.train_ids), list(data.val_ids)

    def tensor(self, data: bytes) -> np.ndarray:
        """One image's bytes as the model input item, exactly as training sees it."""
        return self.inputs.tensor(data)

    # -- training -------------------------------------------------------------------

    def fit(
        self,
        epochs: int = 10,
        batch_size: int = 64,
        lr: float = 1e-3,
        patience: int | None = 3,
        progress: bool = True,
        reload: bool = False,
    ) -> dict[str, Any]:
        """Train with Adam and cross-entropy; stop when the validation loss has not improved
        for `patience` epochs, and keep the best epoch's weights. Returns `metrics`."""
        if epochs < 1 or batch_size < 1:
            raise TrainingError("epochs and batch_size must be at least 1")
        started = time.monotonic()
        if reload:
            self.load()
        data = self._loaded()
        self._check_output_size(data.train_x[:1])
        fitted = fit_module(
            self.module,
            data,
            device=self.device,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            progress=progress,
            seed=self.seed,
        )
        self.history = fitted.history
        self.onnx_bytes = None
        self.metrics = self._metrics(fitted, data.report, time.monotonic() - started)
        return self.metrics

    def _metrics(self, fitted: Fitted, report: LoadReport, seconds: float) -> dict[str, Any]:
        """What registration stores as the model's metadata."""
        chosen = fitted.history[fitted.best_epoch - 1]
        return {
            "task": "image-classification",
            "labels": [str(label) for label in self.labels],
            "trainSize": report.train,
            "validationSize": report.validation,
            "documents": report.documents,
            "skipped": report.skipped,
            "epochs": len(fitted.history),
            "bestEpoch": fitted.best_epoch,
            "trainLoss": chosen["loss"],
            "trainAccuracy": chosen["accuracy"],
            "validationLoss": chosen.get("val_loss"),
            "validationAccuracy": chosen.get("val_accuracy"),
            "seconds": round(seconds, 3),
            "loadSeconds": round(report.seconds, 3),
            "device": str(self.device),
            "trainedAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "query": {
                "collection": self.query.collection.full_name,
                "filter": bson.json_util.dumps(self.query.filter),
            },
            "history": [
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()}
                for e in fitted.history
            ],
        }

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the validation split with the current weights."""
        data = self._loaded()
        if not len(data.val_y):
            raise TrainingError("there is no validation split (validation_fraction is 0)")
        loss, accuracy = evaluate(
            self.module, data.val_x, data.val_y, batch_size=256, device=self.device
        )
        return {"loss": loss, "accuracy": accuracy}

    # -- export and attach -------------------------------------------------------------

    def export(self, *, atol: float = 1e-4, rtol: float = 1e-3, samples: int = 64) -> bytes:
        """ONNX bytes (dynamic batch dimension), checked: onnxruntime's outputs on up to
        `samples` validation images must match torch's (OnnxMismatchError otherwise)."""
        if self._data is None or not self.metrics:
            raise TrainingError("call fit() before export()")
        data = self._data
        batch = data.val_x[:samples] if len(data.val_y) else data.train_x[:samples]
        onnx_bytes = export_checked(self.module, batch, atol=atol, rtol=rtol)
        self.module.to(self.device)
        self.onnx_bytes = onnx_bytes
        return onnx_bytes

    def register(
        self,
        name: str,
        *,
        collection: str | None = None,
        input_field: str | None = None,
        mode: str = "inline",
        filter: Mapping[str, Any] | None = None,
        output: str | None = None,
        top_k: int = 3,
        on_error: str | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register the trained model (`registerModel`), with `metrics` as its metadata.

        `collection` ("db.coll") defaults to the trained one's; `input_field` likewise."""
        if not self.metrics:
            raise TrainingError("call fit() before register()")
        if self.inputs.document is None:
            raise TrainingError(
                "trained with a transform: pass serving_preprocess (the preprocess document "
                "serving should use) to the trainer to register"
            )
        onnx_bytes = self.onnx_bytes or self.export()
        return admin.register_model(
            self.client,
            name,
            collection=collection or self.query.collection.full_name,
            input=input_field or self.query.input_field,
            model=onnx_bytes,
            output=output,
            mode=mode,
            preprocess=self.inputs.document,
            postprocess={
                "kind": "classify",
                "labels": self.labels,
                "topK": min(top_k, len(self.labels)),
            },
            batch=batch,
            on_error=on_error,
            filter=filter,
            metadata=self.metrics,
        )

    def predict(
        self,
        input_field: str | None = None,
        *,
        select: Mapping[str, Any] | None = None,
        watch: bool = True,
        name: str | None = None,
        collection: str | None = None,
        output: str | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Classify the documents matching `select` (all of the collection by default): a
        deferred model scoped by `filter: select` backfills the ones that exist and, with
        `watch`, keeps classifying new ones. Without `watch`, waits for the backfill and
        drops the model (the predictions stay). Returns the registration reply."""
        name = name or f"{self.query.collection.name}-{self.query.label_field}"
        reply = self.register(
            name,
            collection=collection,
            input_field=input_field,
            mode="deferred",
            filter=dict(select) if select else None,
            output=output,
        )
        if not watch:
            status = admin.wait_for_backfill(self.client, name, timeout=timeout)
            admin.drop_model(self.client, name)
            reply["backfilled"] = status.get("deferred", {}).get("done", 0)
        return reply
