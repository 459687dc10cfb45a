"""Turning document field values into model inputs: one item (a numpy array) per value
for tensor models (`tensors_from_values` converts a whole request's at once); image models'
items are their bytes (`image_bytes`: URLs fetched), decoded with the rest of their batch
in the run's thread (engine.runtime); text models tokenize a whole batch
(engine.inputs.text). `prepare_input` does one value's whole way, decoding included."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import trio

from engine.errors import PredictionError
from engine.inputs.image import (
    BadImage,
    EncodedImage,
    decode_image,
    decode_item,
    image_to_array,
    preprocess_image_bytes,
)
from engine.inputs.tensor import tensor_from_value, tensors_from_values
from engine.inputs.text import TextEncoder, check_text
from engine.spec import ImagePreprocess, TextPreprocess

if TYPE_CHECKING:  # engine.runtime imports engine.inputs.text: no import cycle at run time
    from engine.runtime import CompiledModel

__all__ = [
    "BadImage",
    "EncodedImage",
    "ImageSource",
    "TextEncoder",
    "check_text",
    "decode_image",
    "decode_item",
    "image_bytes",
    "image_to_array",
    "prepare_input",
    "preprocess_image_bytes",
    "tensor_from_value",
    "tensors_from_values",
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
    item = await image_bytes(value, image_source)
    # Decoding and resizing run in a worker thread: PIL releases the GIL for most of it.
    arr = await trio.to_thread.run_sync(decode_item, item, pre)
    return arr.astype(model.input_dtype, copy=False)


async def image_bytes(value: Any, image_source: ImageSource | None) -> EncodedImage:
    """An image field's value -> its bytes (fetched, for a URL), not decoded yet."""
    if isinstance(value, str):
        if image_source is None:
            raise PredictionError("image URLs are not enabled")
        return EncodedImage(await image_source.fetch(value), value)
    if isinstance(value, bytes | bytearray | memoryview):  # bson.Binary is a bytes
        return EncodedImage(bytes(value))
    if value is None:
        raise PredictionError("expected image bytes or a URL, got null")
    raise PredictionError(f"expected image bytes or a URL, got {type(value).__name__}")
