from __future__ import annotations

import io
import re
import struct
import zlib
from typing import Any

import bson
import numpy as np
import pytest
from PIL import Image

from bench.support import onnx_models
from engine.errors import PredictionError
from engine.inputs import (
    decode_image,
    image_to_array,
    prepare_input,
    preprocess_image_bytes,
    tensor_from_value,
)
from engine.runtime import CompiledModel, RuntimeSettings, load_model
from engine.spec import ClassifyPostprocess, ImagePreprocess, ModelSpec, TensorPreprocess

CPU = RuntimeSettings(providers=("CPUExecutionProvider",))


def png_bytes(mode: str, size: tuple[int, int], color: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def header_only_png(width: int, height: int, color_type: int = 0) -> bytes:
    """A PNG whose header declares width x height; no pixel data is needed to read the size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


GRAY = ImagePreprocess(size=(4, 6), mode="L", scale=255.0, mean=(0.0,), std=(1.0,))
RGB = ImagePreprocess(size=(4, 6), mode="RGB", scale=255.0, mean=(0.0,) * 3, std=(1.0,) * 3)


# ----------------------------------------------------------------------------- tensors


def test_tensor_flat_list() -> None:
    arr = tensor_from_value([1, 2, 3, 4], (4,), np.dtype(np.float32))
    assert arr.dtype == np.float32
    assert arr.tolist() == [1, 2, 3, 4]


def test_tensor_nested_and_reshaped() -> None:
    nested = tensor_from_value([[1, 2], [3, 4]], (2, 2), np.dtype(np.float64))
    assert nested.shape == (2, 2)
    flat_to_matrix = tensor_from_value([1.5, 2, 3, 4], (2, 2), np.dtype(np.float32))
    assert flat_to_matrix.tolist() == [[1.5, 2], [3, 4]]
    as_int = tensor_from_value([1, 2], (2,), np.dtype(np.int64))
    assert as_int.dtype == np.int64


def test_tensor_scalar() -> None:
    assert tensor_from_value(3, (1,), np.dtype(np.float32)).tolist() == [3.0]
    assert tensor_from_value(2.5, (), np.dtype(np.float32)).shape == ()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([1, 2, 3], "expected 4 values .* got 3"),
        ([[1, 2], [3]], "ragged|rectangular"),
        ([1, "2", 3, 4], "non-numeric"),
        ([1, None, 3, 4], "non-numeric"),
        ([True, False, True, False], "booleans"),
        ("1234", "string|str"),
        (None, "null"),
        ({"a": 1}, "dict"),
        (True, "bool"),
    ],
)
def test_tensor_bad_values(value: Any, fragment: str) -> None:
    with pytest.raises(PredictionError, match=fragment):
        tensor_from_value(value, (4,), np.dtype(np.float32))


# ----------------------------------------------------------------------------- images


def test_white_and_black_gray() -> None:
    white = preprocess_image_bytes(png_bytes("L", (20, 10), 255), GRAY)
    black = preprocess_image_bytes(png_bytes("L", (20, 10), 0), GRAY)
    assert white.shape == (1, 4, 6) and white.dtype == np.float32
    np.testing.assert_allclose(white, 1.0)
    np.testing.assert_allclose(black, 0.0)


def test_rgb_to_gray_and_gray_to_rgb() -> None:
    red_as_gray = preprocess_image_bytes(png_bytes("RGB", (8, 8), (255, 0, 0)), GRAY)
    np.testing.assert_allclose(red_as_gray, 76 / 255, atol=1e-6)  # ITU-R 601-2 luma
    gray_as_rgb = preprocess_image_bytes(png_bytes("L", (8, 8), 128), RGB)
    assert gray_as_rgb.shape == (3, 4, 6)
    np.testing.assert_allclose(gray_as_rgb, 128 / 255, atol=1e-6)


def test_normalisation_and_layout() -> None:
    pre = ImagePreprocess(
        size=(2, 3),
        mode="RGB",
        scale=255.0,
        mean=(0.5, 0.0, 1.0),
        std=(0.5, 1.0, 2.0),
        layout="NHWC",
    )
    arr = preprocess_image_bytes(png_bytes("RGB", (9, 9), (255, 0, 255)), pre)
    assert arr.shape == (2, 3, 3)
    np.testing.assert_allclose(arr[..., 0], 1.0)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(arr[..., 1], 0.0)  # (0 - 0) / 1
    np.testing.assert_allclose(arr[..., 2], 0.0)  # (1 - 1) / 2


def test_jpeg_and_webp_decode() -> None:
    img = Image.new("RGB", (16, 16), (255, 255, 255))
    for fmt in ("JPEG", "WEBP"):
        arr = preprocess_image_bytes(encode(img, fmt), RGB)
        np.testing.assert_allclose(arr, 1.0, atol=0.02)


def test_exif_orientation_applied() -> None:
    # A 20 wide x 10 tall JPEG tagged "rotate 90" (orientation 6) is shown 10 wide x 20 tall.
    img = Image.new("L", (20, 10), 0)
    img.paste(255, (0, 0, 10, 10))  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    assert decoded.size == (10, 20)
    arr = np.asarray(decoded, dtype=np.float32)
    # Orientation 6: rotate 90 clockwise, so the stored left half ends up at the top.
    assert arr[:10].mean() > 200
    assert arr[10:].mean() < 50


def test_gif_first_frame() -> None:
    frames = [Image.new("L", (8, 8), 255), Image.new("L", (8, 8), 0)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    arr = preprocess_image_bytes(data, GRAY)
    np.testing.assert_allclose(arr, 1.0)


def test_gif_with_transparency_converts_without_warning() -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    data = encode(img, "GIF", transparency=0)
    arr = preprocess_image_bytes(data, RGB)
    np.testing.assert_allclose(arr, 1.0)


def test_decompression_bomb_over_pil_limit() -> None:
    with pytest.raises(PredictionError, match="image too large"):
        decode_image(header_only_png(20000, 20000))


def test_too_many_pixels_for_our_limit() -> None:
    with pytest.raises(
        PredictionError, match="image too large: 8000 x 7000 pixels exceeds 50000000"
    ):
        decode_image(header_only_png(8000, 7000))
    with pytest.raises(PredictionError, match="exceeds 100"):
        decode_image(png_bytes("L", (20, 10), 0), max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global left alone


def test_truncated_png() -> None:
    data = png_bytes("RGB", (64, 64), (1, 2, 3))
    noisy = Image.frombytes("L", (64, 64), np.random.default_rng(0).bytes(64 * 64))
    data = encode(noisy, "PNG")
    with pytest.raises(PredictionError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x89PNG not really", bytes(range(256))])
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(PredictionError, match=r"not an image|truncated or corrupt"):
        decode_image(data)


def test_image_to_array_resizes_bilinear() -> None:
    img = Image.new("L", (2, 1))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 255)
    arr = image_to_array(img, ImagePreprocess(size=(1, 4), mode="L", mean=(0.0,), std=(1.0,)))
    assert arr.shape == (1, 1, 4)
    assert list(arr[0, 0]) == sorted(arr[0, 0])  # a ramp from dark to light


# ----------------------------------------------------------------------------- prepare_input


def image_model() -> CompiledModel:
    spec = ModelSpec(
        name="img",
        namespace="db.c",
        input_field="x",
        output_field="_outputs.img",
        mode="inline",
        preprocess=ImagePreprocess(size=(28, 28), mode="L", mean=(0.0,), std=(1.0,)),
        postprocess=ClassifyPostprocess(labels=("black", "white")),
    )
    return load_model(spec, 1, onnx_models.image_classifier(), CPU)


def tensor_model() -> CompiledModel:
    spec = ModelSpec(
        name="t",
        namespace="db.c",
        input_field="x",
        output_field="_outputs.t",
        mode="inline",
        preprocess=TensorPreprocess(),
        postprocess=ClassifyPostprocess(labels=("a", "b", "c")),
    )
    return load_model(spec, 1, onnx_models.linear_classifier(), CPU)


class FakeSource:
    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images

    async def fetch(self, url: str) -> bytes:
        try:
            return self.images[url]
        except KeyError:
            raise PredictionError(f"cannot fetch {url}: 404 Not Found") from None


async def test_prepare_image_bytes_and_binary() -> None:
    model = image_model()
    data = png_bytes("L", (30, 30), 255)
    for value in (data, bson.Binary(data)):
        arr = await prepare_input(value, model)
        assert arr.shape == (1, 28, 28)
        assert arr.dtype == np.float32
        assert model.run(arr[np.newaxis]).argmax() == 1


async def test_prepare_image_url() -> None:
    model = image_model()
    with pytest.raises(PredictionError, match="image URLs are not enabled"):
        await prepare_input("https://example.com/a.png", model)
    source = FakeSource({"https://example.com/a.png": png_bytes("L", (5, 5), 0)})
    arr = await prepare_input("https://example.com/a.png", model, image_source=source)
    assert model.run(arr[np.newaxis]).argmax() == 0
    with pytest.raises(PredictionError, match=re.escape("https://example.com/b.png")):
        await prepare_input("https://example.com/b.png", model, image_source=source)


@pytest.mark.parametrize("value", [None, 3, [1, 2], {"a": 1}])
async def test_prepare_image_wrong_type(value: Any) -> None:
    with pytest.raises(PredictionError, match="expected image bytes or a URL"):
        await prepare_input(value, image_model())


async def test_prepare_tensor() -> None:
    model = tensor_model()
    arr = await prepare_input([0, 0, 1, 0], model)
    assert arr.shape == (4,) and arr.dtype == np.float32
    with pytest.raises(PredictionError, match="expected 4 values"):
        await prepare_input([0, 1], model)
