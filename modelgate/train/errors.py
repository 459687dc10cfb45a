"""What training raises and warns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.errors import ModelgateError

__all__ = ["ImageFetchError", "OnnxMismatchError", "TrainingError", "TrainingWarning"]


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
