"""scikit-learn's bundled digits (8x8, 1797 images) as 28x28 grayscale PNGs, and a small
torch CNN trained on them in a few seconds on two CPU cores.

Training goes through `preprocess_image_bytes`, the function modelgate serves with, so
the model sees at training time exactly what it sees behind the proxy."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from engine.inputs.image import preprocess_image_bytes
from engine.spec import ModelSpec
from modelgate.demo import PREPROCESS, SIZE  # the demo's model: the same preprocess

__all__ = ["PREPROCESS", "SIZE", "Digits", "digit_png", "load_digits", "train_cnn"]

# PREPROCESS as the engine holds it, parsed as registerModel parses it.
_ENGINE_PREPROCESS = ModelSpec.from_document(
    {"name": "digits", "collection": "a.b", "input": "img", "preprocess": PREPROCESS}
).preprocess


def digit_png(pixels: np.ndarray) -> bytes:
    """One 8x8 digit (values 0..16) as a 28x28 grayscale PNG."""
    gray = np.clip(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(gray.reshape(8, 8), mode="L").resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Digits:
    train_png: list[bytes]
    train_labels: np.ndarray
    test_png: list[bytes]
    test_labels: np.ndarray


def load_digits(test_size: int = 200, seed: int = 0) -> Digits:
    """The digits as PNGs, split into a training set and `test_size` held-out images."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    pngs = [digit_png(data.images[i]) for i in order]
    labels = data.target[order].astype(np.int64)
    return Digits(pngs[test_size:], labels[test_size:], pngs[:test_size], labels[:test_size])


def train_cnn(pngs: list[bytes], labels: np.ndarray, *, epochs: int = 3, seed: int = 0) -> Any:
    """A small CNN (1x28x28 -> 10 logits) trained with Adam; returned in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    # One thread: the model is tiny, and on a busy machine worker threads spinning for
    # each small op cost far more than they give.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(torch, nn, pngs, labels, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(torch: Any, nn: Any, pngs: list[bytes], labels: np.ndarray, epochs: int) -> Any:
    x = torch.from_numpy(np.stack([preprocess_image_bytes(p, _ENGINE_PREPROCESS) for p in pngs]))
    y = torch.from_numpy(labels)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),  # 14x14
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 7x7
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        permutation = torch.randperm(len(y))
        for start in range(0, len(y), 32):
            index = permutation[start : start + 32]
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    model.eval()
    return model
