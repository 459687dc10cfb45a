"""The declaration as the engine holds it: validated by `ModelSpec.from_document`, stored
by the registry with `to_document` and reloaded equal. The refusals of each wrong value
are pinned where clients meet them, in tests/proxy/test_register_command.py."""

from __future__ import annotations

from typing import Any

import bson
import pytest

from engine.errors import BadValue
from engine.spec import (
    BatchPolicy,
    ClassifyPostprocess,
    EmbeddingPostprocess,
    ImagePreprocess,
    ModelSpec,
    RawPostprocess,
    TensorPreprocess,
)

IMAGE = {"kind": "image", "size": [28, 28], "mode": "L", "mean": [0.5], "std": [0.5]}
DIGITS = {"kind": "classify", "labels": list("0123456789"), "topK": 3}


def declaration(**changes: Any) -> dict[str, Any]:
    return {
        "name": "digits",
        "collection": "shop.users",
        "input": "img",
        "preprocess": IMAGE,
        "postprocess": DIGITS,
        **changes,
    }


def test_defaults() -> None:
    spec = ModelSpec.from_document({"name": "m", "collection": "a.b.c", "input": "x.y"})
    assert spec.output_field == "_outputs.m"
    assert spec.mode == "inline"
    assert spec.preprocess == TensorPreprocess()
    assert spec.postprocess == RawPostprocess()
    assert spec.batch == BatchPolicy()
    assert spec.on_error == "reject"
    assert spec.filter is None and spec.metadata is None
    assert (spec.db, spec.collection) == ("a", "b.c")


def test_image_preprocess_shapes() -> None:
    gray = ModelSpec.from_document(declaration()).preprocess
    assert isinstance(gray, ImagePreprocess)
    assert (gray.channels, gray.item_shape) == (1, (1, 28, 28))
    rgb = ModelSpec.from_document(
        declaration(
            preprocess={
                "kind": "image",
                "size": [4, 6],
                "mode": "RGB",
                "mean": [0.1, 0.2, 0.3],
                "layout": "NHWC",
            }
        )
    ).preprocess
    assert isinstance(rgb, ImagePreprocess)
    assert rgb.mean == (0.1, 0.2, 0.3)
    assert rgb.std == (1.0, 1.0, 1.0)  # one value serves every channel
    assert rgb.item_shape == (4, 6, 3)


@pytest.mark.parametrize(
    "document",
    [
        declaration(filter={"status": "new"}, metadata={"accuracy": 0.98}, onError="reject"),
        declaration(
            postprocess={"kind": "embedding"},
            preprocess={"kind": "tensor"},
            mode="deferred",
            onError="record",
        ),
        declaration(postprocess={"kind": "raw"}, batch={"maxSize": 1, "maxDelayMs": 0.5}),
        declaration(postprocess={"kind": "classify", "labels": [3, 1, 2], "softmax": False}),
    ],
)
def test_document_round_trip(document: dict[str, Any]) -> None:
    spec = ModelSpec.from_document(document)
    # Through real BSON, as the registry stores it, plus keys the registry adds.
    stored = bson.decode(bson.encode({**spec.to_document(), "_id": "x", "version": 3}))
    assert ModelSpec.from_document(stored) == spec


def test_postprocess_kinds() -> None:
    assert ModelSpec.from_document(declaration()).postprocess == ClassifyPostprocess(
        labels=tuple("0123456789"), top_k=3, softmax="auto"
    )
    embedding = ModelSpec.from_document(declaration(postprocess={"kind": "embedding"}))
    assert embedding.postprocess == EmbeddingPostprocess()


def test_a_stored_document_is_validated_as_a_declaration() -> None:
    # A registry document changed by hand into something unservable is refused on reload.
    stored = {**ModelSpec.from_document(declaration()).to_document(), "mode": "sometimes"}
    with pytest.raises(BadValue, match="'mode' must be one of"):
        ModelSpec.from_document(stored)
    with pytest.raises(BadValue, match="missing required field 'name'"):
        ModelSpec.from_document({"collection": "a.b", "input": "x"})
