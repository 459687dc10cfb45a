"""Training an image classifier from a query on a collection, and attaching it.

    trainer = ImageClassifierTrainer(
        model, labels=[str(d) for d in range(10)], preprocess=PREPROCESS,
        client=client, query=db.users.find({"label": {"$exists": 1}}),
        input_field="img", label_field="label",
    )
    trainer.fit(epochs=5)                      # -> metrics (validation accuracy, ...)
    trainer.predict("img", select={"label": {"$exists": 0}}, watch=True)

The documents are streamed in chunks; images referenced by URL come through the same
`engine.fetch.Fetcher` and `engine.cache.ImageCache` as serving, and with a preprocess
document they are turned into tensors by `preprocess_image_bytes`, the function serving
uses, so the model sees the same numbers at training time as behind the proxy. The
train/validation split is a hash of each `_id`, so it is the same on every run and a
document never changes side as the collection grows.

torch is an optional extra (`pip install 'modelgate[train]'`), imported when a trainer
is created."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import bson
import bson.json_util
import numpy as np
import trio

from engine.cache import ImageCache
from engine.documents import MISSING, get_path
from engine.errors import ModelgateError, PredictionError
from engine.fetch import Fetcher, FetchSettings
from engine.inputs.image import decode_image, preprocess_image_bytes
from engine.spec import ImagePreprocess, ModelSpec
from modelgate import admin

if TYPE_CHECKING:
    import pymongo
    import pymongo.collection
    import pymongo.cursor
    import torch

__all__ = [
    "ImageClassifierTrainer",
    "ImageFetchError",
    "LoadReport",
    "OnnxMismatchError",
    "TrainingError",
    "TrainingWarning",
    "check_onnx_agreement",
    "is_validation",
    "wait_for_backfill",
]

log = logging.getLogger("modelgate.engine.train")

_TORCH_MISSING = "training needs torch: pip install 'modelgate[train]'"
_CHUNK = 256  # documents read, fetched and preprocessed together
_FETCH_CONCURRENCY = 32
_NAMED_FAILURES = 3  # failures quoted in an error or warning
# Images on which a training transform is compared with the serving preprocess document.
_SERVING_CHECKS = 16
# Largest difference allowed between the two paths: far below one 8-bit pixel step.
_SERVING_TOLERANCE = 1e-4


class TrainingError(ModelgateError):
    """The data or the model cannot be trained on (or exported, or attached)."""

    code_name = "BadValue"


class ImageFetchError(TrainingError):
    """Images could not be fetched or decoded; `failures` holds (_id, message) pairs."""

    def __init__(self, message: str, failures: Sequence[tuple[Any, str]]) -> None:
        super().__init__(message)
        self.failures = list(failures)


class OnnxMismatchError(TrainingError):
    """onnxruntime's outputs of the exported model differ from torch's."""


class TrainingWarning(UserWarning):
    """Documents were skipped (missing fields, unknown labels, unfetchable images)."""


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(_TORCH_MISSING) from exc
    return torch


# --------------------------------------------------------------------------- split


def is_validation(document_id: Any, fraction: float) -> bool:
    """Whether a document belongs to the validation split: sha1 of its BSON-encoded `_id`,
    read as a number in [0, 1). Depends on the `_id` only, so it is stable across runs
    and as documents are added."""
    digest = hashlib.sha1(bson.encode({"_id": document_id})).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


# --------------------------------------------------------------------------- ONNX check


def check_onnx_agreement(
    expected: np.ndarray, actual: np.ndarray, *, atol: float = 1e-4, rtol: float = 1e-3
) -> float:
    """Raise OnnxMismatchError unless onnxruntime's `actual` outputs match torch's
    `expected` within the tolerances; returns the largest absolute difference."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        raise OnnxMismatchError(
            f"the exported ONNX model gives outputs of shape {actual.shape}, "
            f"torch gives {expected.shape}"
        )
    if not np.all(np.isfinite(actual)):
        raise OnnxMismatchError("the exported ONNX model gives non-finite outputs")
    largest = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    if not np.allclose(actual, expected, atol=atol, rtol=rtol):
        raise OnnxMismatchError(
            f"the exported ONNX model disagrees with torch: largest difference {largest:.3g} "
            f"(atol={atol}, rtol={rtol}); the module may use an operation the exporter "
            "translates differently, or behave differently in eval mode"
        )
    return largest


# --------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What reading the query found."""

    documents: int = 0
    train: int = 0
    validation: int = 0
    missing_input: int = 0
    missing_label: int = 0
    unknown_label: int = 0
    bad_images: int = 0
    seconds: float = 0.0
    failures: list[tuple[Any, str]] = field(default_factory=list)  # the first few images

    @property
    def skipped(self) -> dict[str, int]:
        return {
            "missingInput": self.missing_input,
            "missingLabel": self.missing_label,
            "unknownLabel": self.unknown_label,
            "badImages": self.bad_images,
        }


@dataclass
class _Dataset:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_ids: list[Any]
    val_ids: list[Any]
    report: LoadReport


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    chunk = []
    for document in iterator:
        chunk.append(document)
        if len(chunk) == n:
            break
    return chunk


# --------------------------------------------------------------------------- trainer


class ImageClassifierTrainer:
    """Trains a torch module that maps one image batch to `len(labels)` logits.

    `preprocess` is the serving preprocess document (`{"kind": "image", "size": [28, 28],
    "mode": "L", ...}`, preferred: training and serving then share `preprocess_image_bytes`)
    or a callable taking a PIL image to a tensor (torchvision transforms); with a callable,
    `serving_preprocess` is the document to register, checked against the callable on the
    first images read (they must give the same input). `query` is a pymongo cursor
    (`db.users.find({...})`), a `(collection, filter)` pair or a collection. Missing
    fields, unknown labels and unusable images are skipped and counted with
    `missing="skip"`, refused with `missing="error"`. URLs are fetched with `fetch`
    settings (private addresses are refused by default, as when serving) and cached in
    `cache_dir` (give the proxy's to share its cache)."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        labels: Sequence[str | int],
        preprocess: Mapping[str, Any] | Callable[[Any], Any],
        client: pymongo.MongoClient[Any],
        query: Any,
        input_field: str,
        label_field: str,
        validation_fraction: float = 0.2,
        missing: str = "skip",
        fetch: FetchSettings | None = None,
        cache_dir: str | None = None,
        serving_preprocess: Mapping[str, Any] | None = None,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        torch = _import_torch()
        if not labels:
            raise TrainingError("labels may not be empty")
        if len(set(map(str, labels))) != len(labels):
            raise TrainingError(f"labels must be distinct, got {list(labels)}")
        if not 0.0 <= validation_fraction < 1.0:
            raise TrainingError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if missing not in ("skip", "error"):
            raise TrainingError(f"missing must be 'skip' or 'error', got {missing!r}")
        self.module = module
        self.labels = list(labels)
        self.client = client
        self.input_field = input_field
        self.label_field = label_field
        self.validation_fraction = validation_fraction
        self.missing = missing
        self.fetch_settings = fetch or FetchSettings()
        self.cache_dir = cache_dir
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.collection, self.filter, self._cursor_factory = _query_source(client, query)
        self._label_index: dict[Any, int] = {}
        for i, label in enumerate(self.labels):
            self._label_index[str(label)] = i
        self._transform: Callable[[Any], Any] | None = None
        self._image_pre: ImagePreprocess | None = None
        # With a transform: the serving preprocess, checked against it on the first images.
        self._serving_pre: ImagePreprocess | None = None
        if isinstance(preprocess, Mapping):
            self.preprocess_document: dict[str, Any] | None = dict(preprocess)
            self._image_pre = _image_preprocess(preprocess)
        elif callable(preprocess):
            self._transform = preprocess
            self.preprocess_document = dict(serving_preprocess) if serving_preprocess else None
            if serving_preprocess:
                self._serving_pre = _image_preprocess(serving_preprocess)
        else:
            raise TrainingError("preprocess must be a preprocess document or a callable")
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.report: LoadReport | None = None
        self.onnx_bytes: bytes | None = None
        self._data: _Dataset | None = None
        if declared := self._image_pre or self._serving_pre:
            # Catch a model that does not fit the labels before any document is read.
            self.check_output_size(np.zeros((1, *declared.item_shape), np.float32))

    # -- checks ---------------------------------------------------------------------

    def check_output_size(self, batch: np.ndarray) -> None:
        """One forward pass: the module must give (batch, len(labels)) outputs."""
        torch = _import_torch()
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                out = self.module.to(self.device)(torch.from_numpy(batch).to(self.device))
        except Exception as exc:  # any torch error: the module cannot take this input
            raise TrainingError(
                f"the model cannot take a batch of shape {tuple(batch.shape)}: {exc}"
            ) from exc
        finally:
            self.module.train(was_training)
        shape = tuple(out.shape)
        if len(shape) != 2 or shape[1] != len(self.labels):
            raise TrainingError(
                f"the model's output has shape {shape} for a batch of {batch.shape[0]}, but "
                f"there are {len(self.labels)} labels: its last layer must give "
                f"{len(self.labels)} values per image"
            )

    # -- reading the data -----------------------------------------------------------

    def load(self) -> LoadReport:
        """Read the query (again): fetch, preprocess and split the documents."""
        started = time.monotonic()
        data = trio.run(self._load)
        data.report.seconds = time.monotonic() - started
        self._check_report(data.report)
        self._data, self.report = data, data.report
        log.info(
            "read %d documents in %.1fs: %d train, %d validation, skipped %s",
            self.report.documents,
            time.monotonic() - started,
            self.report.train,
            self.report.validation,
            self.report.skipped,
        )
        return self.report

    async def _load(self) -> _Dataset:
        report = LoadReport()
        xs: dict[bool, list[np.ndarray]] = {False: [], True: []}
        ys: dict[bool, list[int]] = {False: [], True: []}
        ids: dict[bool, list[Any]] = {False: [], True: []}
        cursor = await trio.to_thread.run_sync(self._cursor_factory)
        iterator = iter(cursor)
        cache = ImageCache(self.cache_dir) if self.cache_dir else None
        try:
            async with Fetcher(self.fetch_settings, cache) as fetcher:
                while chunk := await trio.to_thread.run_sync(_take, iterator, _CHUNK):
                    report.documents += len(chunk)
                    items = self._usable(chunk, report)
                    images = await _fetch_all(fetcher, items)
                    for (document_id, _, label), data in zip(items, images, strict=True):
                        if isinstance(data, PredictionError):
                            report.bad_images += 1
                            if len(report.failures) < _NAMED_FAILURES:
                                report.failures.append((document_id, data.message))
                            continue
                        try:
                            array = await trio.to_thread.run_sync(self._tensor, data)
                        except PredictionError as exc:
                            report.bad_images += 1
                            if len(report.failures) < _NAMED_FAILURES:
                                report.failures.append((document_id, exc.message))
                            continue
                        loaded = len(ys[False]) + len(ys[True])
                        if self._serving_pre is not None and loaded < _SERVING_CHECKS:
                            self._check_serving_agrees(document_id, data, array)
                        side = is_validation(document_id, self.validation_fraction)
                        xs[side].append(array)
                        ys[side].append(label)
                        ids[side].append(document_id)
        finally:
            cursor.close()
            if cache is not None:
                cache.close()
        report.train, report.validation = len(ys[False]), len(ys[True])
        return _Dataset(
            _stack(xs[False]),
            np.asarray(ys[False], np.int64),
            _stack(xs[True]),
            np.asarray(ys[True], np.int64),
            ids[False],
            ids[True],
            report,
        )

    def _usable(
        self, chunk: list[Mapping[str, Any]], report: LoadReport
    ) -> list[tuple[Any, Any, int]]:
        """(_id, image bytes or URL, label index) of the documents that have both fields."""
        items = []
        for document in chunk:
            if "_id" not in document:
                raise TrainingError("the query's documents must include _id (used for the split)")
            document_id = document["_id"]
            value = get_path(document, self.input_field)
            label = get_path(document, self.label_field)
            problem = None
            if value is MISSING or value is None:
                report.missing_input += 1
                problem = f"has no '{self.input_field}'"
            elif label is MISSING or label is None:
                report.missing_label += 1
                problem = f"has no '{self.label_field}'"
            elif str(label) not in self._label_index:
                report.unknown_label += 1
                problem = f"has label {label!r}, which is not one of {self.labels}"
            elif not isinstance(value, str | bytes):
                report.missing_input += 1
                problem = (
                    f"has '{self.input_field}' of type {type(value).__name__}, "
                    "expected image bytes or a URL"
                )
            if problem is not None:
                if self.missing == "error":
                    raise TrainingError(
                        f"document {document_id!r} {problem} (pass missing='skip' to skip "
                        "such documents)"
                    )
                continue
            items.append((document_id, value, self._label_index[str(label)]))
        return items

    def _check_serving_agrees(self, document_id: Any, data: bytes, trained: np.ndarray) -> None:
        """The training transform and serving_preprocess must give the model the same
        input, or the registered model would see other numbers than it was trained on."""
        assert self._serving_pre is not None
        served = preprocess_image_bytes(data, self._serving_pre)
        if served.shape != trained.shape:
            raise TrainingError(
                f"the transform gives shape {list(trained.shape)} but serving_preprocess "
                f"{list(served.shape)} (document {document_id!r})"
            )
        difference = float(np.max(np.abs(served - trained)))
        if not difference <= _SERVING_TOLERANCE:
            raise TrainingError(
                f"the transform and serving_preprocess disagree on document {document_id!r} "
                f"(largest difference {difference:.4g}): serving would not see what "
                "training saw; make serving_preprocess describe the transform"
            )

    def _tensor(self, data: bytes) -> np.ndarray:
        if self._image_pre is not None:
            return preprocess_image_bytes(data, self._image_pre)
        assert self._transform is not None
        image = decode_image(data)
        try:
            out = self._transform(image)
        finally:
            image.close()
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)

    def _check_report(self, report: LoadReport) -> None:
        where = f"{self.collection.full_name} {bson.json_util.dumps(self.filter)}"
        if report.documents == 0:
            raise TrainingError(f"the query matched no documents ({where})")
        if report.bad_images:
            named = "; ".join(message for _, message in report.failures)
            message = (
                f"{report.bad_images} of {report.documents} images could not be fetched or "
                f"decoded, e.g. {named}"
            )
            if self.missing == "error" or report.train + report.validation == 0:
                raise ImageFetchError(message, report.failures)
            warnings.warn(f"{message} (skipped)", TrainingWarning, stacklevel=3)
        skipped = report.missing_input + report.missing_label + report.unknown_label
        if report.train + report.validation == 0:
            raise TrainingError(
                f"none of the {report.documents} documents can be trained on ({where}): "
                f"skipped {report.skipped}"
            )
        if skipped:
            warnings.warn(
                f"skipped {skipped} of {report.documents} documents: {report.skipped}",
                TrainingWarning,
                stacklevel=3,
            )
        if report.train == 0:
            raise TrainingError(
                f"all {report.validation} usable documents fell into the validation split; "
                "add documents or lower validation_fraction"
            )
        if self.validation_fraction > 0 and report.validation == 0:
            raise TrainingError(
                f"none of the {report.train} usable documents fell into the validation "
                "split; add documents or raise validation_fraction"
            )

    def split(self) -> tuple[list[Any], list[Any]]:
        """The `_id`s of the training and validation documents (after `load`/`fit`)."""
        if self._data is None:
            self.load()
        assert self._data is not None
        return list(self._data.train_ids), list(self._data.val_ids)

    def tensor(self, data: bytes) -> np.ndarray:
        """One image's bytes as the model input item, exactly as training sees it."""
        return self._tensor(data)

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
        torch = _import_torch()
        from tqdm.auto import tqdm

        if epochs < 1 or batch_size < 1:
            raise TrainingError("epochs and batch_size must be at least 1")
        started = time.monotonic()
        if self._data is None or reload:
            self.load()
        data = self._data
        assert data is not None and self.report is not None
        self.check_output_size(data.train_x[:1])
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        module = self.module.to(self.device)
        train_x = torch.from_numpy(data.train_x).to(self.device)
        train_y = torch.from_numpy(data.train_y).to(self.device)
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        loss_fn = torch.nn.CrossEntropyLoss()
        batches = math.ceil(len(train_y) / batch_size)
        best: tuple[float, int, dict[str, Any]] | None = None
        self.history = []
        bar = tqdm(total=epochs * batches, desc="training", unit="batch", disable=not progress)
        try:
            for epoch in range(1, epochs + 1):
                epoch_started = time.monotonic()
                module.train()
                order = torch.randperm(len(train_y), generator=generator).to(self.device)
                total_loss, correct = 0.0, 0
                for start in range(0, len(train_y), batch_size):
                    index = order[start : start + batch_size]
                    optimizer.zero_grad()
                    logits = module(train_x[index])
                    loss = loss_fn(logits, train_y[index])
                    loss.backward()
                    optimizer.step()
                    total_loss += float(loss.detach()) * len(index)
                    correct += int((logits.argmax(1) == train_y[index]).sum())
                    bar.update(1)
                entry: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": total_loss / len(train_y),
                    "accuracy": correct / len(train_y),
                }
                if len(data.val_y):
                    entry["val_loss"], entry["val_accuracy"] = self._evaluate(
                        data.val_x, data.val_y, batch_size
                    )
                entry["seconds"] = time.monotonic() - epoch_started
                self.history.append(entry)
                bar.set_postfix(
                    epoch=epoch,
                    loss=f"{entry['loss']:.3f}",
                    val_acc=f"{entry.get('val_accuracy', float('nan')):.3f}",
                )
                watched = entry.get("val_loss", entry["loss"])
                if best is None or watched < best[0]:
                    best = (watched, epoch, copy.deepcopy(module.state_dict()))
                elif patience is not None and epoch - best[1] >= patience:
                    log.info("early stop after epoch %d (best %d)", epoch, best[1])
                    break
        finally:
            bar.close()
        assert best is not None
        module.load_state_dict(best[2])
        module.eval()
        self.onnx_bytes = None
        chosen = self.history[best[1] - 1]
        self.metrics = {
            "task": "image-classification",
            "labels": [str(label) for label in self.labels],
            "trainSize": self.report.train,
            "validationSize": self.report.validation,
            "documents": self.report.documents,
            "skipped": self.report.skipped,
            "epochs": len(self.history),
            "bestEpoch": best[1],
            "trainLoss": chosen["loss"],
            "trainAccuracy": chosen["accuracy"],
            "validationLoss": chosen.get("val_loss"),
            "validationAccuracy": chosen.get("val_accuracy"),
            "seconds": round(time.monotonic() - started, 3),
            "loadSeconds": round(self.report.seconds, 3),
            "device": str(self.device),
            "trainedAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "query": {
                "collection": self.collection.full_name,
                "filter": bson.json_util.dumps(self.filter),
            },
            "history": [
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()}
                for e in self.history
            ],
        }
        return self.metrics

    def _evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
        torch = _import_torch()
        self.module.eval()
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(y), batch_size):
                xb = torch.from_numpy(x[start : start + batch_size]).to(self.device)
                yb = torch.from_numpy(y[start : start + batch_size]).to(self.device)
                logits = self.module(xb)
                total_loss += float(loss_fn(logits, yb))
                correct += int((logits.argmax(1) == yb).sum())
        return total_loss / len(y), correct / len(y)

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the validation split with the current weights."""
        if self._data is None:
            self.load()
        assert self._data is not None
        if not len(self._data.val_y):
            raise TrainingError("there is no validation split (validation_fraction is 0)")
        loss, accuracy = self._evaluate(self._data.val_x, self._data.val_y, 256)
        return {"loss": loss, "accuracy": accuracy}

    # -- export and attach -------------------------------------------------------------

    def export(self, *, atol: float = 1e-4, rtol: float = 1e-3, samples: int = 64) -> bytes:
        """ONNX bytes (dynamic batch dimension), checked: onnxruntime's outputs on up to
        `samples` validation images must match torch's (OnnxMismatchError otherwise)."""
        torch = _import_torch()
        import onnxruntime as ort

        if self._data is None:
            raise TrainingError("call fit() before export()")
        data = self._data
        batch = data.val_x[:samples] if len(data.val_y) else data.train_x[:samples]
        self.module.to("cpu").eval()
        onnx_bytes = admin.export_onnx(self.module, torch.from_numpy(batch[:2]))
        with torch.no_grad():
            expected = self.module(torch.from_numpy(batch)).numpy()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, {session.get_inputs()[0].name: batch})
        check_onnx_agreement(expected, actual, atol=atol, rtol=rtol)
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

        `collection` ("db.coll") defaults to the query's; `input_field` to the trained one."""
        if not self.metrics:
            raise TrainingError("call fit() before register()")
        if self.preprocess_document is None:
            raise TrainingError(
                "trained with a transform: pass serving_preprocess (the preprocess document "
                "serving should use) to the trainer to register"
            )
        onnx_bytes = self.onnx_bytes or self.export()
        return admin.register_model(
            self.client,
            name,
            collection=collection or self.collection.full_name,
            input=input_field or self.input_field,
            model=onnx_bytes,
            output=output,
            mode=mode,
            preprocess=self.preprocess_document,
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
        name = name or f"{self.collection.name}-{self.label_field}"
        reply = self.register(
            name,
            collection=collection,
            input_field=input_field,
            mode="deferred",
            filter=dict(select) if select else None,
            output=output,
        )
        if not watch:
            status = wait_for_backfill(self.client, name, timeout=timeout)
            admin.drop_model(self.client, name)
            reply["backfilled"] = status.get("deferred", {}).get("done", 0)
        return reply


# --------------------------------------------------------------------------- helpers


def wait_for_backfill(
    client: pymongo.MongoClient[Any], name: str, *, timeout: float = 600.0, poll: float = 0.25
) -> dict[str, Any]:
    """Poll `modelStatus` until a deferred model has nothing pending or in progress;
    returns the last status. TrainingError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = admin.model_status(client, name)
        deferred = status.get("deferred", {})
        if deferred.get("pending", 1) == 0 and deferred.get("inProgress", 0) == 0:
            return status
        if time.monotonic() > deadline:
            raise TrainingError(
                f"model '{name}' still has {deferred.get('pending')} documents pending "
                f"after {timeout:.0f}s"
            )
        time.sleep(poll)


def _query_source(
    client: Any, query: Any
) -> tuple[pymongo.collection.Collection[Any], dict[str, Any], Callable[[], Any]]:
    """(collection, filter, a function returning a fresh cursor) from the query forms."""
    import pymongo.collection
    import pymongo.cursor

    if isinstance(query, pymongo.cursor.Cursor):
        template = query.clone()
        filter_doc = dict(getattr(query, "_spec", None) or {})
        return query.collection, filter_doc, template.clone
    if isinstance(query, pymongo.collection.Collection):
        return query, {}, query.find
    if isinstance(query, tuple) and len(query) == 2:
        coll, filter_doc = query
        if isinstance(coll, str):
            db, _, name = coll.partition(".")
            if not name:
                raise TrainingError(f"collection must be 'db.collection', got {coll!r}")
            coll = client[db][name]
        if not isinstance(coll, pymongo.collection.Collection):
            raise TrainingError("query must be (collection, filter)")
        filter_doc = dict(filter_doc or {})
        return coll, filter_doc, lambda: coll.find(filter_doc)
    raise TrainingError(
        "query must be a pymongo cursor (collection.find(...)), a (collection, filter) "
        f"pair or a collection, got {type(query).__name__}"
    )


def _image_preprocess(document: Mapping[str, Any]) -> ImagePreprocess:
    """Parse a preprocess document exactly as registerModel will."""
    try:
        spec = ModelSpec.from_document(
            {"name": "train", "collection": "a.b", "input": "x", "preprocess": dict(document)}
        )
    except ModelgateError as exc:
        raise TrainingError(f"invalid preprocess document: {exc.message}") from exc
    if not isinstance(spec.preprocess, ImagePreprocess):
        raise TrainingError("preprocess must be an image preprocess document (kind: 'image')")
    return spec.preprocess


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros((0,), np.float32)
    return np.ascontiguousarray(np.stack(arrays), dtype=np.float32)


async def _fetch_all(fetcher: Fetcher, items: list[tuple[Any, Any, int]]) -> list[Any]:
    """Bytes (or the PredictionError) for every item; URLs fetched concurrently."""
    results: list[Any] = [None] * len(items)
    limiter = trio.CapacityLimiter(_FETCH_CONCURRENCY)

    async def one(i: int, url: str) -> None:
        async with limiter:
            try:
                results[i] = await fetcher.fetch(url)
            except PredictionError as exc:
                results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, (_, value, _) in enumerate(items):
            if isinstance(value, str):
                nursery.start_soon(one, i, value)
            else:
                results[i] = bytes(value)
    return results
