"""Numbers in a document field -> one model input item."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.errors import PredictionError

__all__ = ["tensor_from_value"]


def tensor_from_value(value: Any, item_shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A number or (nested) list of numbers -> an array of `item_shape` and `dtype`.

    Nested lists shaped like the item are used as they are; any other nesting with the right
    number of elements is reshaped (so a flat list can feed a [4, 4] item)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes | dict):
        raise PredictionError(f"expected a number or an array of numbers, got {_describe(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise PredictionError(f"expected a rectangular array of numbers: {e}") from e
    if arr.dtype.kind not in "iuf":
        if arr.dtype.kind == "b":
            raise PredictionError("expected numbers, got booleans")
        raise PredictionError(
            "expected a rectangular array of numbers, got non-numeric or ragged elements"
        )
    expected = math.prod(item_shape)
    if arr.size != expected:
        raise PredictionError(
            f"expected {expected} values (shape {list(item_shape)}), "
            f"got {arr.size} (shape {list(arr.shape)})"
        )
    return arr.reshape(item_shape).astype(dtype, order="C")  # a copy: never aliases the value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return type(value).__name__
