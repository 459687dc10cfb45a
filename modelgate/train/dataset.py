"""What training reads: the labelled documents a filter selects on a collection, which of
them can be used, and the report of what was read."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bson.json_util
import numpy as np

from engine.documents import MISSING, get_path
from modelgate.train.errors import ImageFetchError, TrainingError, TrainingWarning

if TYPE_CHECKING:
    import pymongo.collection

__all__ = ["Dataset", "LabelledQuery", "LoadReport"]

_NAMED_FAILURES = 3  # failures quoted in an error or warning


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

    def bad_image(self, document_id: Any, message: str) -> None:
        self.bad_images += 1
        if len(self.failures) < _NAMED_FAILURES:
            self.failures.append((document_id, message))


@dataclass
class Dataset:
    """Model inputs and label indices of both sides of the split, with their `_id`s."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_ids: list[Any]
    val_ids: list[Any]
    report: LoadReport


class LabelledQuery:
    """The documents of `collection` matching `filter`, each with an image (bytes or a
    URL) at `input_field` and one of `labels` at `label_field`. Documents without them are
    skipped and counted with `missing="skip"`, refused with `missing="error"`."""

    def __init__(
        self,
        collection: pymongo.collection.Collection[Any],
        filter: Mapping[str, Any] | None,
        *,
        input_field: str,
        label_field: str,
        labels: Sequence[str | int],
        missing: str,
    ) -> None:
        import pymongo.collection

        if not isinstance(collection, pymongo.collection.Collection):
            raise TrainingError(
                "collection must be a pymongo Collection (client.db.collection), got "
                f"{type(collection).__name__}"
            )
        if filter is not None and not isinstance(filter, Mapping):
            raise TrainingError(f"filter must be a document, got {type(filter).__name__}")
        if missing not in ("skip", "error"):
            raise TrainingError(f"missing must be 'skip' or 'error', got {missing!r}")
        self.collection = collection
        self.filter = dict(filter or {})
        self.input_field = input_field
        self.label_field = label_field
        self.labels = list(labels)
        self.missing = missing
        self._label_index = {str(label): i for i, label in enumerate(self.labels)}

    def describe(self) -> str:
        return f"{self.collection.full_name} {bson.json_util.dumps(self.filter)}"

    def usable(
        self, chunk: Sequence[Mapping[str, Any]], report: LoadReport
    ) -> list[tuple[Any, Any, int]]:
        """(_id, image bytes or URL, label index) of the documents that have both fields;
        the others are counted in `report`."""
        items = []
        for document in chunk:
            if "_id" not in document:
                raise TrainingError("the query's documents must include _id (used for the split)")
            document_id = document["_id"]
            value = get_path(document, self.input_field)
            label = get_path(document, self.label_field)
            problem = self._problem(value, label, report)
            if problem is not None:
                if self.missing == "error":
                    raise TrainingError(
                        f"document {document_id!r} {problem} (pass missing='skip' to skip "
                        "such documents)"
                    )
                continue
            items.append((document_id, value, self._label_index[str(label)]))
        return items

    def _problem(self, value: Any, label: Any, report: LoadReport) -> str | None:
        """Why a document with this input and label cannot be trained on (counted in
        `report`), or None."""
        if value is MISSING or value is None:
            report.missing_input += 1
            return f"has no '{self.input_field}'"
        if label is MISSING or label is None:
            report.missing_label += 1
            return f"has no '{self.label_field}'"
        if str(label) not in self._label_index:
            report.unknown_label += 1
            return f"has label {label!r}, which is not one of {self.labels}"
        if not isinstance(value, str | bytes):
            report.missing_input += 1
            return (
                f"has '{self.input_field}' of type {type(value).__name__}, "
                "expected image bytes or a URL"
            )
        return None

    def check(self, report: LoadReport, validation_fraction: float) -> None:
        """Refuse a read that cannot be trained on; warn about what was skipped."""
        if report.documents == 0:
            raise TrainingError(f"the query matched no documents ({self.describe()})")
        usable = report.train + report.validation
        if report.bad_images:
            named = "; ".join(message for _, message in report.failures)
            message = (
                f"{report.bad_images} of {report.documents} images could not be fetched or "
                f"decoded, e.g. {named}"
            )
            if self.missing == "error" or usable == 0:
                raise ImageFetchError(message, report.failures)
            warnings.warn(f"{message} (skipped)", TrainingWarning, stacklevel=3)
        skipped = report.missing_input + report.missing_label + report.unknown_label
        if usable == 0:
            raise TrainingError(
                f"none of the {report.documents} documents can be trained on "
                f"({self.describe()}): skipped {report.skipped}"
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
        if validation_fraction > 0 and report.validation == 0:
            raise TrainingError(
                f"none of the {report.train} usable documents fell into the validation "
                "split; add documents or raise validation_fraction"
            )
