"""Wrong admin commands get MongoDB-shaped errors ({ok: 0, code, codeName, errmsg}), which
pymongo raises as OperationFailure; commands modelgate does not know still reach MongoDB."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import bson
import pymongo
import pymongo.errors
import pytest

from bench.support import onnx_models
from modelgate import admin

BAD_VALUE, TYPE_MISMATCH, UNAUTHORIZED, NO_SUCH_KEY, COMMAND_NOT_FOUND = 2, 14, 13, 4, 59
CODE_NAMES = {2: "BadValue", 14: "TypeMismatch", 13: "Unauthorized", 4: "NoSuchKey"}
IMAGE = {"kind": "image", "size": [28, 28], "mode": "L"}


@pytest.fixture
def name(client: pymongo.MongoClient, db_name: str) -> Iterator[str]:  # type: ignore[type-arg]
    """A model name of the test's own, dropped afterwards should a registration succeed."""
    model_name = f"{db_name}_m"
    yield model_name
    try:
        client.admin.command("dropModel", model_name)
    except pymongo.errors.OperationFailure as exc:
        assert exc.code == NO_SUCH_KEY, exc


def command(name: str, db_name: str, **fields: Any) -> dict[str, Any]:
    """A valid registerModel command, changed by `fields` (a value of None removes it)."""
    base: dict[str, Any] = {
        "registerModel": name,
        "collection": f"{db_name}.items",
        "input": "x",
        "mode": "inline",
        "onnx": bson.Binary(onnx_models.linear_classifier()),
        "postprocess": {"kind": "classify", "labels": ["a", "b", "c"]},
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def refused(client: pymongo.MongoClient, document: dict[str, Any], code: int) -> str:  # type: ignore[type-arg]
    """Run an admin command that must fail with `code`; return its errmsg."""
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        client.admin.command(document)
    details = failure.value.details or {}
    assert failure.value.code == code, details
    assert details["ok"] == 0
    assert details["code"] == code
    if code in CODE_NAMES:
        assert details["codeName"] == CODE_NAMES[code]
    assert isinstance(details["errmsg"], str) and details["errmsg"]
    return str(details["errmsg"])


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"colour": "red"}, BAD_VALUE, "unknown field 'colour'"),
        ({"collection": None}, BAD_VALUE, "'collection'"),
        ({"input": None}, BAD_VALUE, "'input'"),
        ({"collection": "nodot"}, BAD_VALUE, "invalid namespace"),
        ({"collection": 5}, TYPE_MISMATCH, "'collection' must be a string"),
        ({"input": ["x"]}, TYPE_MISMATCH, "'input' must be a string"),
        ({"output": "x"}, BAD_VALUE, "input field"),
        ({"output": "_id"}, BAD_VALUE, "'_id'"),
        ({"onnx": None}, BAD_VALUE, "exactly one of 'onnx'"),
        ({"onnx": "not bytes"}, TYPE_MISMATCH, "'onnx' must be binary"),
        ({"onnx": bson.Binary(b"this is not an ONNX model")}, BAD_VALUE, "cannot load"),
        ({"path": "/no/such/model.onnx"}, BAD_VALUE, "exactly one of 'onnx'"),
        # This proxy has no --model-dir (tests/e2e/test_model_files.py has one).
        ({"onnx": None, "path": "/no/such/model.onnx"}, BAD_VALUE, "'path' is off"),
        ({"preprocess": {"kind": "audio"}}, BAD_VALUE, "unknown preprocess kind 'audio'"),
        ({"preprocess": "image"}, TYPE_MISMATCH, "'preprocess' must be a document"),
        ({"postprocess": {"kind": "segment"}}, BAD_VALUE, "unknown postprocess kind"),
        (
            {"postprocess": {"kind": "classify", "labels": ["a", "b"]}},
            BAD_VALUE,
            "3 classes",
        ),
        (
            {"postprocess": {"kind": "classify", "labels": ["a", "b", "c"], "topK": 4}},
            BAD_VALUE,
            "topK",
        ),
        ({"postprocess": {"kind": "classify", "labels": "abc"}}, TYPE_MISMATCH, "labels"),
        ({"mode": "sometimes"}, BAD_VALUE, "'mode' must be one of"),
        ({"onError": "ignore"}, BAD_VALUE, "'onError' must be one of"),
        ({"onError": 1}, TYPE_MISMATCH, "'onError' must be a string"),
        ({"batch": {"maxSize": 0}}, BAD_VALUE, "batch.maxSize"),
        ({"batch": {"maxSize": "big"}}, TYPE_MISMATCH, "batch.maxSize"),
        ({"registerModel": ""}, BAD_VALUE, "may not be empty"),
        ({"registerModel": 7}, TYPE_MISMATCH, "'registerModel' must be a string"),
        # The image classifier takes 28x28 images: a 32x32 preprocess cannot feed it.
        (
            {
                "onnx": bson.Binary(onnx_models.image_classifier(1, (28, 28))),
                "preprocess": {"kind": "image", "size": [32, 32], "mode": "L"},
                "postprocess": {"kind": "classify", "labels": ["black", "white"]},
            },
            BAD_VALUE,
            "H=32",
        ),
        # ... nor RGB images (3 channels) a 1-channel input.
        (
            {
                "onnx": bson.Binary(onnx_models.image_classifier(1, (28, 28))),
                "preprocess": {"kind": "image", "size": [28, 28], "mode": "RGB"},
                "postprocess": {"kind": "classify", "labels": ["black", "white"]},
            },
            BAD_VALUE,
            "C=3",
        ),
        # A tensor model cannot take images, and an image preprocess needs a rank-4 input.
        ({"preprocess": IMAGE}, BAD_VALUE, "rank-4"),
        ({"onnx": bson.Binary(onnx_models.two_input_model())}, BAD_VALUE, "exactly one input"),
    ],
)
def test_bad_register_model_is_refused(client, name, db_name, fields, code, message) -> None:
    errmsg = refused(client, command(name, db_name, **fields), code)
    assert message in errmsg
    # Nothing was registered.
    assert name not in {m["name"] for m in client.admin.command("listModels")["models"]}


def test_model_commands_only_on_the_admin_database(client, name, db_name) -> None:
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        client[db_name].command(command(name, db_name))
    assert failure.value.code == UNAUTHORIZED
    assert "admin database" in str(failure.value.details["errmsg"])
    for other in ("listModels", "modelStatus", "dropModel"):
        with pytest.raises(pymongo.errors.OperationFailure) as failure:
            client[db_name].command(other, name)
        assert failure.value.code == UNAUTHORIZED
    assert name not in {m["name"] for m in client.admin.command("listModels")["models"]}


def test_status_and_drop_of_an_unknown_model(client, name) -> None:
    assert f"'{name}'" in refused(client, {"modelStatus": name}, NO_SUCH_KEY)
    assert f"'{name}'" in refused(client, {"dropModel": name}, NO_SUCH_KEY)
    refused(client, {"dropModel": 3}, TYPE_MISMATCH)
    refused(client, {"modelStatus": ""}, BAD_VALUE)


def test_unknown_commands_still_reach_mongodb(client, db) -> None:
    assert db.command("buildInfo")["ok"] == 1.0
    assert client.admin.command("ping")["ok"] == 1.0
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        db.command("noSuchCommand")
    assert failure.value.code == COMMAND_NOT_FOUND
    assert failure.value.details.get("codeName") == "CommandNotFound"


def test_a_refused_registration_keeps_the_previous_version(client, db, name, db_name) -> None:
    assert client.admin.command(command(name, db_name))["version"] == 1
    refused(client, command(name, db_name, onnx=bson.Binary(b"garbage")), BAD_VALUE)
    status = client.admin.command("modelStatus", name)
    assert status["version"] == 1
    db.items.insert_one({"x": [0, 1, 0, 0]})
    prediction = db.items.find_one()["_outputs"][name]
    assert (prediction["label"], prediction["version"]) == ("b", 1)


def test_export_onnx_without_torch_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'modelgate\[train\]'"):
        admin.export_onnx(object(), object())  # type: ignore[arg-type]
