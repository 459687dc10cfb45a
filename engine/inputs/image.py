"""Image bytes -> one model input item. Shared by serving and training (`preprocess_image_bytes`)
so that both preprocess identically."""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import PredictionError
from engine.spec import ImagePreprocess

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadImage",
    "EncodedImage",
    "decode_image",
    "decode_item",
    "image_to_array",
    "preprocess_image_bytes",
]

DEFAULT_MAX_PIXELS = 50_000_000
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF (first frame)/BMP bytes, EXIF orientation applied.

    The pixel limit is checked from the header, before any pixel is decoded, and per call:
    PIL's global `Image.MAX_IMAGE_PIXELS` is left alone (it still applies as an outer bound)."""
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError as e:
        raise PredictionError("not an image (unrecognised format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own outer limit; the warning only arrives here when warnings are errors.
        raise PredictionError(f"image too large: exceeds {max_pixels} pixels ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise PredictionError(f"truncated or corrupt image: {e}") from e
    try:
        width, height = img.size
        if width * height > max_pixels:
            raise PredictionError(
                f"image too large: {width} x {height} pixels exceeds {max_pixels}"
            )
        if width < 1 or height < 1:
            raise PredictionError(f"image has no pixels: {width} x {height}")
        img.load()  # first frame only for animated formats
        transposed = ImageOps.exif_transpose(img)
    except PredictionError:
        img.close()
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        img.close()
        raise PredictionError(f"truncated or corrupt image: {e}") from e
    if transposed is not img:
        img.close()
    return transposed


def image_to_array(img: Image.Image, pre: ImagePreprocess) -> np.ndarray:
    """Convert to pre.mode, resize to pre.size ([H, W], bilinear), scale and normalise.

    Returns float32 shaped (C, H, W) for NCHW or (H, W, C) for NHWC."""
    try:
        if img.mode != pre.mode:
            if img.mode in ("P", "PA") or (img.mode in ("L", "LA") and "transparency" in img.info):
                img = img.convert("RGBA")  # palette transparency must go through RGBA
            img = img.convert(pre.mode)
        height, width = pre.size
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)
    except (OSError, ValueError) as e:
        raise PredictionError(f"cannot convert image: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    arr = arr / np.float32(pre.scale)
    mean = np.asarray(pre.mean or (0.0,), dtype=np.float32)
    std = np.asarray(pre.std or (1.0,), dtype=np.float32)
    arr = (arr - mean) / std
    if pre.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess_image_bytes(
    data: bytes, pre: ImagePreprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """decode_image + image_to_array: the one preprocessing used for serving and training."""
    img = decode_image(data, max_pixels=max_pixels)
    try:
        return image_to_array(img, pre)
    finally:
        img.close()


class EncodedImage(NamedTuple):
    """An image model's input before decoding: its bytes, and the URL they came from
    (None for bytes stored in the document), which a decoding error names."""

    data: bytes
    url: str | None = None


class BadImage(PredictionError):
    """Bytes that do not decode to an image the model can take (the document's input
    is at fault, not the model)."""


def decode_item(item: EncodedImage, pre: ImagePreprocess) -> np.ndarray:
    """`preprocess_image_bytes` of an EncodedImage; BadImage naming its URL, if any."""
    try:
        return preprocess_image_bytes(item.data, pre)
    except PredictionError as exc:
        if item.url is None:
            raise BadImage(exc.message) from exc
        # Name the URL, as fetch errors do: the document may hold several image fields.
        shown = item.url if len(item.url) <= 200 else item.url[:200] + "..."
        raise BadImage(f"image at {shown}: {exc.message}") from exc
