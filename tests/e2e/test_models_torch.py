"""The Python user's path: train a torch CNN, export it with `modelgate.admin.export_onnx`,
register it with `modelgate.admin.register_model`, and let modelgate classify the digit
images written through pymongo."""

from __future__ import annotations

import bson
import numpy as np
import pymongo.errors
import pytest

from modelgate import admin
from tests.e2e.digits import PREPROCESS, SIZE, load_digits, train_cnn

torch = pytest.importorskip("torch", reason="needs the train extra (torch)")

pytestmark = pytest.mark.train

LABELS = [str(d) for d in range(10)]


def test_trained_digits_cnn_classifies_documents(client, db, db_name, direct) -> None:
    digits = load_digits(test_size=100)
    model = train_cnn(digits.train_png, digits.train_labels)
    name = f"{db_name}_digits"
    reply = admin.register_model(
        client,
        name,
        collection=f"{db_name}.digits",
        input="png",
        model=model,
        example_input=torch.zeros(1, 1, SIZE, SIZE),
        preprocess=PREPROCESS,
        postprocess={"kind": "classify", "labels": LABELS, "topK": 3},
        metadata={"dataset": "sklearn digits"},
    )
    try:
        assert reply["version"] == 1
        listed = {m["name"]: m for m in admin.list_models(client)}
        assert listed[name]["metadata"] == {"dataset": "sklearn digits"}
        assert model.training is False  # export left the module as it was (eval)

        db.digits.insert_many(
            [
                {"i": i, "png": bson.Binary(png), "truth": str(label)}
                for i, (png, label) in enumerate(
                    zip(digits.test_png, digits.test_labels, strict=True)
                )
            ]
        )
        docs = list(direct[db_name].digits.find().sort("i", 1))
        assert len(docs) == len(digits.test_png)
        predicted = [doc["_outputs"][name]["label"] for doc in docs]
        accuracy = np.mean([p == doc["truth"] for p, doc in zip(predicted, docs, strict=True)])
        assert accuracy >= 0.9, f"accuracy {accuracy:.2f}"
        first = docs[0]["_outputs"][name]
        assert len(first["top"]) == 3
        assert 0.0 < first["score"] <= 1.0
        assert sum(t["score"] for t in first["top"]) <= 1.0 + 1e-6

        status = admin.model_status(client, name)
        assert status["predicted"] == len(digits.test_png)
        assert status["version"] == 1
    finally:
        assert admin.drop_model(client, name)["version"] == 1
    assert name not in {m["name"] for m in admin.list_models(client)}
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        admin.model_status(client, name)
    assert failure.value.code == 4


def test_export_onnx_has_a_dynamic_batch_dimension() -> None:
    import onnxruntime as ort

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    module.train()
    onnx_bytes = admin.export_onnx(module, torch.zeros(2, 4))
    assert module.training is True  # restored after the export
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] not in (1, 2)  # symbolic
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_register_model_errors_are_operation_failures(client, db_name) -> None:
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        admin.register_model(
            client, f"{db_name}_bad", collection=f"{db_name}.x", input="x", model=b"not onnx"
        )
    assert failure.value.code == 2
    with pytest.raises(ValueError, match="exactly one"):
        admin.register_model(client, "n", collection="d.c", input="x")
    with pytest.raises(ValueError, match="example_input"):
        admin.register_model(client, "n", collection="d.c", input="x", model=torch.nn.Linear(2, 2))
