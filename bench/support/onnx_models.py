"""Small ONNX models with known outputs, built with onnx.helper (no torch needed).

Every builder returns the serialized model bytes. Opset 17 and IR version 8 keep them
loadable by any onnxruntime >= 1.14."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

Dim = int | str | None


def _finish(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    name: str,
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelgate-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _float_input(name: str, shape: list[Dim]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def linear_weights(features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """W is (features, classes) with W[i, i % classes] = 1; b is 0.01 * class index.

    So an input that is one-hot at feature i (i < classes) scores class i highest."""
    w = np.zeros((features, classes), dtype=np.float32)
    for i in range(features):
        w[i, i % classes] = 1.0
    b = np.arange(classes, dtype=np.float32) * 0.01
    return w, b


def linear_classifier(
    features: int = 4,
    classes: int = 3,
    *,
    batch: Dim = "N",
    softmax: bool = False,
) -> bytes:
    """x [batch, features] -> x @ W + b [batch, classes] (logits, or probabilities if softmax)."""
    w, b = linear_weights(features, classes)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits" if softmax else "y"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=-1))
    return _finish(
        nodes,
        [_float_input("x", [batch, features])],
        [_float_input("y", [batch, classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
        "linear_classifier",
    )


def linear_logits(x: np.ndarray, features: int = 4, classes: int = 3) -> np.ndarray:
    """What `linear_classifier` computes, in numpy (for expected values)."""
    w, b = linear_weights(features, classes)
    return np.asarray(x, dtype=np.float32) @ w + b


def reshaped_classifier(
    features: int = 4, classes: int = 6, item: tuple[int, int] = (3, 2)
) -> bytes:
    """x [N, features] -> logits reshaped to [N, *item]: the last dimension is item[-1], but
    an item has classes values. Static checks on the last dimension alone cannot tell."""
    w, b = linear_weights(features, classes)
    shape = np.array([-1, *item], dtype=np.int64)
    return _finish(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Reshape", ["logits", "shape"], ["y"]),
        ],
        [_float_input("x", ["N", features])],
        [_float_input("y", ["N", *item])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(shape, "shape"),
        ],
        "reshaped_classifier",
    )


def embedding_model(dim: int = 8, *, factor: float = 2.0, batch: Dim = "N") -> bytes:
    """x [batch, dim] -> factor * x [batch, dim]."""
    k = np.array(factor, dtype=np.float32)
    return _finish(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        [_float_input("x", [batch, dim])],
        [_float_input("y", [batch, dim])],
        [numpy_helper.from_array(k, "k")],
        "embedding",
    )


def image_classifier(
    channels: int = 1,
    size: tuple[int, int] = (28, 28),
    *,
    layout: str = "NCHW",
    batch: Dim = "N",
    static_spatial: bool = True,
) -> bytes:
    """Image [batch, C, H, W] (or NHWC) -> 2 logits: class 0 "black", class 1 "white".

    Mean over spatial dims and channels m (in preprocessed units): logits = [0.5 - m, m - 0.5].
    With scale 255, mean 0, std 1: black m=0 -> class 0; white m=1 -> class 1."""
    h, w = size
    hd: Dim = h if static_spatial else "H"
    wd: Dim = w if static_spatial else "W"
    if layout == "NCHW":
        shape: list[Dim] = [batch, channels, hd, wd]
        axes = [2, 3]
    else:
        shape = [batch, hd, wd, channels]
        axes = [1, 2]
    weights = np.tile(np.array([[-1.0, 1.0]], dtype=np.float32) / channels, (channels, 1))
    bias = np.array([0.5, -0.5], dtype=np.float32)
    return _finish(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=axes, keepdims=0),
            helper.make_node("MatMul", ["m", "W"], ["mw"]),
            helper.make_node("Add", ["mw", "b"], ["y"]),
        ],
        [_float_input("x", shape)],
        [_float_input("y", [batch, 2])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
        "image_classifier",
    )


def two_input_model() -> bytes:
    """Two inputs: not servable (a model must have exactly one input)."""
    return _finish(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [_float_input("a", ["N", 2]), _float_input("b", ["N", 2])],
        [_float_input("y", ["N", 2])],
        [],
        "two_inputs",
    )


def dynamic_item_model() -> bytes:
    """x [N, D] with a symbolic item dimension: rejected for tensor preprocess."""
    return _finish(
        [helper.make_node("Identity", ["x"], ["y"])],
        [_float_input("x", ["N", "D"])],
        [_float_input("y", ["N", "D"])],
        [],
        "dynamic_item",
    )
