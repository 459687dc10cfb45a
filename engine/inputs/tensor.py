"""Numbers in a document field -> one model input item."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from bson.int64 import Int64

from engine.errors import PredictionError

__all__ = ["tensor_from_value", "tensors_from_values"]


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


# What a flat list of numbers holds, decoded from BSON (Int64 is an int of its own type).
_INTS = frozenset({int, Int64})
_NUMBERS = frozenset({float, int, Int64})
# What numpy makes of a list of floats, and of a list of ints that int64 holds.
_STACKED = (np.dtype(np.float64), np.dtype(np.int64))


def tensors_from_values(
    values: Sequence[Any], item_shape: tuple[int, ...], dtype: np.dtype[Any]
) -> list[np.ndarray | PredictionError]:
    """`tensor_from_value` of each value (its array, or its PredictionError), the same
    arrays, converted with one numpy call for all the flat lists of numbers of the item's
    size (the common case: a feature vector per document) instead of one per value: one
    call for the lists holding a float, one for those of ints only, as numpy converts
    each list alone. Anything else is converted alone."""
    size = math.prod(item_shape)
    results: list[np.ndarray | PredictionError | None] = [None] * len(values)
    floats: list[int] = []
    ints: list[int] = []
    for index, value in enumerate(values):
        if type(value) is list and len(value) == size:
            kinds = set(map(type, value))
            if kinds <= _INTS:
                ints.append(index)
                continue
            if kinds <= _NUMBERS:
                floats.append(index)
                continue
        results[index] = _one(value, item_shape, dtype)
    for group, kind in ((floats, np.float64), (ints, None)):
        if not group:
            continue
        try:
            stacked = np.asarray([values[i] for i in group], dtype=kind)
        except OverflowError:
            stacked = None
        if stacked is None or stacked.dtype not in _STACKED:  # ints past int64: alone
            for index in group:
                results[index] = _one(values[index], item_shape, dtype)
            continue
        rows = stacked.reshape(len(group), *item_shape).astype(dtype, order="C")
        for index, row in zip(group, rows, strict=True):
            results[index] = row
    return results  # type: ignore[return-value]


def _one(
    value: Any, item_shape: tuple[int, ...], dtype: np.dtype[Any]
) -> np.ndarray | PredictionError:
    try:
        return tensor_from_value(value, item_shape, dtype)
    except PredictionError as e:
        return e
