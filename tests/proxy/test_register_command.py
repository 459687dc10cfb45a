"""registerModel's command: a declaration named by `registerModel` plus where the model's
bytes are (`onnx`, a `path` under --model-dir, a `gridfs` upload; reading them is
test_model_sources'). Every refusal is pinned here, with its code."""

from __future__ import annotations

from typing import Any

import bson
import pytest
from bson import ObjectId

from bench.support.onnx_models import linear_classifier
from engine.errors import BadValue, ModelgateError, TypeMismatch
from engine.spec import BatchPolicy, ClassifyPostprocess, ImagePreprocess, ModelSpec
from proxy.commands.model_sources import GridFSUpload, InlineModel, ModelFile
from proxy.commands.register_model import parse_register_command

ONNX = linear_classifier()


def example(**changes: Any) -> dict[str, Any]:
    command: dict[str, Any] = {
        "registerModel": "digits",
        "collection": "shop.users",
        "input": "img",
        "output": "_outputs.digits",
        "mode": "inline",
        "onnx": bson.Binary(ONNX),
        "preprocess": {
            "kind": "image",
            "size": [28, 28],
            "mode": "L",
            "scale": 255,
            "mean": [0.5],
            "std": [0.5],
            "layout": "NCHW",
        },
        "postprocess": {
            "kind": "classify",
            "labels": list("0123456789"),
            "topK": 3,
            "softmax": "auto",
        },
        "batch": {"maxSize": 64, "maxDelayMs": 2},
        "onError": "reject",
        "filter": {"status": "new"},
        "metadata": {"accuracy": 0.98},
    }
    for key, value in changes.items():
        if value is _DELETE:
            command.pop(key, None)
        else:
            command[key] = value
    return command


_DELETE = object()


def test_example_parses() -> None:
    spec, source = parse_register_command(example())
    assert source == InlineModel(ONNX)
    assert spec == ModelSpec(
        name="digits",
        namespace="shop.users",
        input_field="img",
        output_field="_outputs.digits",
        mode="inline",
        preprocess=ImagePreprocess(
            size=(28, 28), mode="L", scale=255.0, mean=(0.5,), std=(0.5,), layout="NCHW"
        ),
        postprocess=ClassifyPostprocess(labels=tuple("0123456789"), top_k=3, softmax="auto"),
        batch=BatchPolicy(max_size=64, max_delay_ms=2.0),
        on_error="reject",
        filter={"status": "new"},
        metadata={"accuracy": 0.98},
    )
    assert spec.db == "shop"
    assert spec.collection == "users"
    assert spec.preprocess.item_shape == (1, 28, 28)  # type: ignore[union-attr]


def test_path_and_gridfs_name_where_the_bytes_are() -> None:
    # Nothing is read while parsing: the command is authorized first.
    spec, source = parse_register_command(example(onnx=_DELETE, path="/no/such/m.onnx"))
    assert source == ModelFile("/no/such/m.onnx")
    assert spec.name == "digits"
    upload = ObjectId()
    assert parse_register_command(example(onnx=_DELETE, gridfs=upload))[1] == GridFSUpload(upload)
    assert parse_register_command(example(onnx=_DELETE, gridfs="m.onnx"))[1] == GridFSUpload(
        "m.onnx"
    )


BAD = [
    # (changes, error class, message fragment)
    ({"bogus": 1}, BadValue, "bogus"),
    ({"name": "digits"}, BadValue, "unknown field 'name'"),
    ({"registerModel": _DELETE}, BadValue, "missing required field 'registerModel'"),
    ({"collection": _DELETE}, BadValue, "missing required field 'collection'"),
    ({"input": _DELETE}, BadValue, "missing required field 'input'"),
    ({"collection": 5}, TypeMismatch, "collection"),
    ({"collection": "nodot"}, BadValue, "namespace"),
    ({"collection": ".users"}, BadValue, "namespace"),
    ({"collection": "shop."}, BadValue, "namespace"),
    ({"registerModel": ""}, BadValue, "empty"),
    ({"registerModel": "a$b"}, BadValue, r"\$"),
    ({"registerModel": "a\x00b"}, BadValue, "NUL"),
    ({"registerModel": "x" * 121}, BadValue, "120"),
    ({"registerModel": 3}, TypeMismatch, "registerModel"),
    ({"input": 3}, TypeMismatch, "input"),
    ({"input": ""}, BadValue, "input"),
    ({"input": "a..b"}, BadValue, "empty part"),
    ({"output": "img"}, BadValue, "output"),
    ({"output": "img.sub"}, BadValue, "output"),
    ({"input": "out.x", "output": "out"}, BadValue, "output"),
    ({"output": "_id"}, BadValue, "_id"),
    ({"onnx": _DELETE}, BadValue, "exactly one of"),
    ({"path": "/tmp/x.onnx"}, BadValue, "exactly one of"),
    ({"gridfs": "m.onnx"}, BadValue, "exactly one of"),
    ({"onnx": _DELETE, "path": "x.onnx", "gridfs": "m.onnx"}, BadValue, "exactly one of"),
    ({"onnx": _DELETE, "gridfs": 5}, TypeMismatch, "'gridfs' must be an upload's ObjectId"),
    ({"onnx": "not bytes"}, TypeMismatch, "onnx"),
    ({"onnx": b""}, BadValue, "empty"),
    ({"path": 5, "onnx": _DELETE}, TypeMismatch, "path"),
    ({"mode": "sometimes"}, BadValue, "mode"),
    ({"mode": 1}, TypeMismatch, "mode"),
    ({"onError": "ignore"}, BadValue, "onError"),
    ({"preprocess": "image"}, TypeMismatch, "preprocess"),
    ({"preprocess": {"kind": "audio"}}, BadValue, "unknown preprocess kind 'audio'"),
    ({"preprocess": {"size": [2, 2]}}, BadValue, "kind"),
    ({"preprocess": {"kind": "image"}}, BadValue, "size"),
    ({"preprocess": {"kind": "image", "size": [28]}}, BadValue, "size"),
    ({"preprocess": {"kind": "image", "size": "28"}}, TypeMismatch, "size"),
    ({"preprocess": {"kind": "image", "size": [28, 0]}}, BadValue, "size"),
    ({"preprocess": {"kind": "image", "size": [28, "a"]}}, TypeMismatch, "size"),
    ({"preprocess": {"kind": "image", "size": [2, 2], "mode": "CMYK"}}, BadValue, "mode"),
    (
        {"preprocess": {"kind": "image", "size": [2, 2], "mode": "L", "mean": [0.1, 0.2, 0.3]}},
        BadValue,
        "mean",
    ),
    (
        {"preprocess": {"kind": "image", "size": [2, 2], "mode": "RGB", "std": [0.1, 0.2]}},
        BadValue,
        "std",
    ),
    ({"preprocess": {"kind": "image", "size": [2, 2], "std": [0]}}, BadValue, "std"),
    ({"preprocess": {"kind": "image", "size": [2, 2], "mean": ["a"]}}, TypeMismatch, "mean"),
    ({"preprocess": {"kind": "image", "size": [2, 2], "scale": 0}}, BadValue, "scale"),
    ({"preprocess": {"kind": "image", "size": [2, 2], "layout": "CHW"}}, BadValue, "layout"),
    ({"preprocess": {"kind": "image", "size": [2, 2], "extra": 1}}, BadValue, "extra"),
    ({"preprocess": {"kind": "tensor", "size": [2]}}, BadValue, "size"),
    ({"postprocess": {"kind": "segment"}}, BadValue, "unknown postprocess kind 'segment'"),
    ({"postprocess": {"kind": "classify"}}, BadValue, "labels"),
    ({"postprocess": {"kind": "classify", "labels": []}}, BadValue, "labels"),
    ({"postprocess": {"kind": "classify", "labels": "abc"}}, TypeMismatch, "labels"),
    ({"postprocess": {"kind": "classify", "labels": [1.5]}}, TypeMismatch, "labels"),
    ({"postprocess": {"kind": "classify", "labels": ["a", "a"]}}, BadValue, "duplicates"),
    ({"postprocess": {"kind": "classify", "labels": ["a"], "topK": 2}}, BadValue, "topK"),
    ({"postprocess": {"kind": "classify", "labels": ["a"], "topK": 0}}, BadValue, "topK"),
    ({"postprocess": {"kind": "classify", "labels": ["a"], "topK": "1"}}, TypeMismatch, "topK"),
    ({"postprocess": {"kind": "classify", "labels": ["a"], "softmax": "yes"}}, BadValue, "softmax"),
    ({"postprocess": {"kind": "classify", "labels": ["a"], "softmax": 1}}, TypeMismatch, "softmax"),
    ({"batch": {"maxSize": 0}}, BadValue, "maxSize"),
    ({"batch": {"maxSize": 100_001}}, BadValue, "maxSize"),
    ({"batch": {"maxSize": 2.5}}, TypeMismatch, "maxSize"),
    ({"batch": {"maxSize": True}}, TypeMismatch, "maxSize"),
    ({"batch": {"maxDelayMs": -1}}, BadValue, "maxDelayMs"),
    ({"batch": {"maxDelayMs": "1"}}, TypeMismatch, "maxDelayMs"),
    ({"batch": {"size": 3}}, BadValue, "size"),
    ({"batch": 3}, TypeMismatch, "batch"),
    ({"filter": [1]}, TypeMismatch, "filter"),
    ({"metadata": "x"}, TypeMismatch, "metadata"),
]


@pytest.mark.parametrize(("changes", "error", "fragment"), BAD)
def test_bad_arguments(changes: dict[str, Any], error: type[ModelgateError], fragment: str) -> None:
    with pytest.raises(error, match=fragment) as info:
        parse_register_command(example(**changes))
    assert type(info.value) is error
    expected_code = {BadValue: 2, TypeMismatch: 14}[error]
    assert info.value.code == expected_code


def test_whole_number_doubles_accepted() -> None:
    # mongosh sends every number as a double.
    spec, _ = parse_register_command(example(batch={"maxSize": 32.0, "maxDelayMs": 5}))
    assert spec.batch == BatchPolicy(max_size=32, max_delay_ms=5.0)
