"""Turning document field values into model inputs: one item (a numpy array) per value
for tensor and image models; text models tokenize a whole batch (engine.inputs.text)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import trio

from engine.errors import PredictionError
from engine.inputs.image import decode_image, image_to_array, preprocess_image_bytes
from engine.inputs.tensor import tensor_from_value
from engine.inputs.text import TextEncoder, check_text
from engine.spec import ImagePreprocess, TextPreprocess

if TYPE_CHECKING:  # engine.runtime imports engine.inputs.text: no import cycle at run time
    from engine.runtime import CompiledModel

__all__ = [
    "ImageSource",
    "TextEncoder",
    "check_text",
    "decode_image",
    "image_to_array",
    "prepare_input",
    "preprocess_image_bytes",
    "tensor_from_value",
]


class ImageSource(Protocol):
    """Fetches image bytes by URL (engine/fetch.py). Raises PredictionError naming the URL."""

    async def fetch(self, url: str) -> bytes: ...


async def prepare_input(
    value: Any, model: CompiledModel, *, image_source: ImageSource | None = None
) -> np.ndarray:
    """One field value -> an array of `model.item_shape` and `model.input_dtype`."""
    pre = model.spec.preprocess
    if isinstance(pre, TextPreprocess):
        raise PredictionError("text models tokenize whole batches: see engine.inputs.text")
    if not isinstance(pre, ImagePreprocess):
        return tensor_from_value(value, model.item_shape, model.input_dtype)
    if isinstance(value, str):
        if image_source is None:
            raise PredictionError("image URLs are not enabled")
        data = await image_source.fetch(value)
    elif isinstance(value, bytes | bytearray | memoryview):  # bson.Binary is a bytes
        data = bytes(value)
    elif value is None:
        raise PredictionError("expected image bytes or a URL, got null")
    else:
        raise PredictionError(f"expected image bytes or a URL, got {type(value).__name__}")
    # Decoding and resizing run in a worker thread: PIL releases the GIL for most of it.
    try:
        arr = await trio.to_thread.run_sync(preprocess_image_bytes, data, pre)
    except PredictionError as exc:
        if not isinstance(value, str):
            raise
        # Name the URL, as fetch errors do: the document may hold several image fields.
        shown = value if len(value) <= 200 else value[:200] + "..."
        raise PredictionError(f"image at {shown}: {exc.message}") from exc
    return arr.astype(model.input_dtype, copy=False)
