"""Where a registered model's bytes may come from, end to end: a `path` only under the
operator's --model-dir (refused everywhere else, and everywhere without it), and models
larger than one message through a GridFS upload that the client makes itself, all under
--max-model-bytes."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pymongo
import pymongo.errors
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.support import onnx_models
from bench.support.processes import ProxyProcess
from modelgate import admin

BAD_VALUE = 2
MIB = 1024 * 1024
CAP = 20 * MIB  # the --max-model-bytes of the proxy here
UPLOADS = "modelgate_uploads"
LABELS = ["a", "b", "c"]


def large_classifier(size: int) -> bytes:
    """`linear_classifier()` (4 features, 3 classes) of about `size` bytes: its bias is
    the mean of a big initializer whose rows all equal the bias."""
    w, b = onnx_models.linear_weights(4, 3)
    rows = np.tile(b, (size // b.nbytes, 1))
    nodes = [
        helper.make_node("ReduceMean", ["rows"], ["b"], axes=[0], keepdims=0),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "large_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(rows, "rows")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def files_client(
    upstream_uri: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    """A client of a proxy with --model-dir and a --max-model-bytes of CAP."""
    log_dir = tmp_path_factory.mktemp("files-proxy")
    args = ("--data-dir", str(log_dir), "--model-dir", str(model_dir))
    args += ("--max-model-bytes", str(CAP))
    with (
        ProxyProcess(upstream_uri, log_dir / "modelgate.log", args=args) as process,
        # A proxy blocked on a FIFO would show as a timeout, not a hung test.
        pymongo.MongoClient(process.uri, socketTimeoutMS=60_000) as client,
    ):
        yield client


@pytest.fixture
def name(files_client: pymongo.MongoClient[dict[str, Any]], db_name: str) -> Iterator[str]:
    model_name = f"{db_name}_m"
    yield model_name
    try:
        files_client.admin.command("dropModel", model_name)
    except pymongo.errors.OperationFailure as exc:
        assert exc.code == 4, exc  # NoSuchKey: never registered


def register(client: Any, name: str, db_name: str, **source: Any) -> dict[str, Any]:
    return dict(
        client.admin.command(
            {
                "registerModel": name,
                "collection": f"{db_name}.items",
                "input": "x",
                "postprocess": {"kind": "classify", "labels": LABELS},
                **source,
            }
        )
    )


def refused_with(client: Any, name: str, db_name: str, **source: Any) -> str:
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        register(client, name, db_name, **source)
    assert failure.value.code == BAD_VALUE, failure.value.details
    assert name not in {model["name"] for model in admin.list_models(client)}
    return str((failure.value.details or {})["errmsg"])


def predicted_label(client: Any, db_name: str, name: str) -> str:
    """The label the model gives an input one-hot at feature 2: "c"."""
    items = client[db_name].items
    inserted = items.insert_one({"x": [0, 0, 1, 0]}).inserted_id
    return str(items.find_one({"_id": inserted})["_outputs"][name]["label"])


def test_path_is_refused_without_a_model_dir(client, name, db_name, tmp_path: Path) -> None:
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(onnx_models.linear_classifier())
    errmsg = refused_with(client, name, db_name, path=str(model_file))
    assert "'path' is off on this modelgate" in errmsg
    assert "--model-dir" in errmsg


def test_a_file_under_the_model_dir_is_registered(files_client, name, db_name, model_dir):
    (model_dir / "linear.onnx").write_bytes(onnx_models.linear_classifier())
    reply = register(files_client, name, db_name, path="linear.onnx")
    assert reply["version"] == 1
    assert predicted_label(files_client, db_name, name) == "c"
    reply = register(files_client, name, db_name, path=str(model_dir / "linear.onnx"))
    assert reply["version"] == 2


def test_everything_else_is_refused_before_it_is_read(
    files_client, name, db_name, model_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(onnx_models.linear_classifier())
    (model_dir / "escape.onnx").symlink_to(outside)
    os.mkfifo(model_dir / "pipe.onnx")
    (model_dir / "folder").mkdir()
    with open(model_dir / "huge.onnx", "wb") as huge:
        huge.truncate(CAP + 1)  # sparse: refused by its size alone
    cases = {
        str(outside): "is not under the model directory",
        "../outside.onnx": "is not under the model directory",
        "escape.onnx": "a symlink leads out of it",
        "pipe.onnx": "'pipe.onnx' is not a regular file",
        "folder": "'folder' is not a regular file",
        "huge.onnx": f"is {CAP + 1} bytes, over this modelgate's limit of {CAP} bytes",
        "absent.onnx": "cannot read model file 'absent.onnx'",
    }
    for path, message in cases.items():
        assert message in refused_with(files_client, name, db_name, path=path), path
    # The proxy is still serving (nothing blocked on the FIFO).
    assert files_client.admin.command("ping")["ok"] == 1.0


def test_a_model_over_one_message_is_uploaded_by_the_client(files_client, name, db_name):
    large = large_classifier(17 * MIB)
    assert admin.MAX_COMMAND_ONNX_BYTES < len(large) < CAP
    reply = admin.register_model(
        files_client,
        name,
        collection=f"{db_name}.items",
        input="x",
        model=large,
        postprocess={"kind": "classify", "labels": LABELS},
    )
    assert reply["version"] == 1
    stored = next(m for m in admin.list_models(files_client) if m["name"] == name)
    assert stored["size"] == len(large)
    assert predicted_label(files_client, db_name, name) == "c"
    # The upload was removed once registered (the registry holds its own copy).
    assert files_client[db_name][f"{UPLOADS}.files"].count_documents({}) == 0
    assert files_client[db_name][f"{UPLOADS}.chunks"].count_documents({}) == 0


def test_an_upload_over_the_cap_is_refused_and_removed(files_client, name, db_name) -> None:
    with pytest.raises(pymongo.errors.OperationFailure) as failure:
        admin.register_model(
            files_client,
            name,
            collection=f"{db_name}.items",
            input="x",
            model=bytes(CAP + 1),  # refused by its length: never loaded as ONNX
        )
    assert failure.value.code == BAD_VALUE
    assert f"over this modelgate's limit of {CAP} bytes (--max-model-bytes)" in str(
        (failure.value.details or {})["errmsg"]
    )
    assert name not in {model["name"] for model in admin.list_models(files_client)}
    assert files_client[db_name][f"{UPLOADS}.files"].count_documents({}) == 0


def test_an_upload_made_by_hand_is_named_by_filename(files_client, name, db_name) -> None:
    """What mongosh does without a GridFS helper (README): chunks and a files document
    inserted as plain documents, then registerModel names the upload."""
    onnx = onnx_models.linear_classifier()
    uploads = files_client[db_name]
    file_id = bson.ObjectId()
    size = 100
    for n, start in enumerate(range(0, len(onnx), size)):
        chunk = {"files_id": file_id, "n": n, "data": bson.Binary(onnx[start : start + size])}
        uploads[f"{UPLOADS}.chunks"].insert_one(chunk)
    uploads[f"{UPLOADS}.files"].insert_one(
        {
            "_id": file_id,
            "filename": "linear.onnx",
            "length": len(onnx),
            "chunkSize": size,
            "uploadDate": datetime.datetime.now(datetime.UTC),
        }
    )
    assert register(files_client, name, db_name, gridfs="linear.onnx")["version"] == 1
    assert predicted_label(files_client, db_name, name) == "c"
    # The proxy leaves an upload where it is: it is the client's.
    assert uploads[f"{UPLOADS}.files"].count_documents({"_id": file_id}) == 1
    assert "no GridFS upload 'other.onnx'" in refused_with(
        files_client, f"{name}_2", db_name, gridfs="other.onnx"
    )
