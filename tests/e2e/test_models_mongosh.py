"""mongosh users register models exactly as the README shows, with `db.adminCommand`."""

from __future__ import annotations

from collections.abc import Iterator

import pymongo
import pymongo.errors
import pytest
from bson import json_util

from bench.support import onnx_models
from tests.support import MONGOSH, mongosh

pytestmark = pytest.mark.skipif(
    not MONGOSH.exists(), reason=f"mongosh is not installed ({MONGOSH}): run `npm install`"
)


@pytest.fixture
def name(client: pymongo.MongoClient, db_name: str) -> Iterator[str]:  # type: ignore[type-arg]
    model_name = f"{db_name}_sh"
    yield model_name
    try:
        client.admin.command("dropModel", model_name)
    except pymongo.errors.OperationFailure as exc:
        assert exc.code == 4, exc


def test_register_and_insert_from_mongosh(proxy, name, db_name, direct, tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(onnx_models.linear_classifier())
    script = f"""
const reply = db.adminCommand({{
  registerModel: "{name}",
  collection: "{db_name}.items",
  input: "x",
  mode: "inline",
  onnx: Binary(fs.readFileSync("model.onnx")),
  postprocess: {{kind: "classify", labels: ["a", "b", "c"], topK: 2}}
}});
print(EJSON.stringify(reply));
const items = db.getSiblingDB("{db_name}").items;
const inserted = items.insertOne({{x: [0, 0, 1, 0]}});
print(EJSON.stringify(items.findOne({{_id: inserted.insertedId}})));
"""
    result = mongosh(proxy.uri, script, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    reply, document = (json_util.loads(line) for line in lines[-2:])
    assert reply["ok"] == 1
    assert (reply["name"], reply["version"]) == (name, 1)
    prediction = document["_outputs"][name]
    assert prediction["label"] == "c"
    assert prediction["version"] == 1
    assert [t["label"] for t in prediction["top"]] == ["c", "b"]
    # What mongosh printed is what MongoDB stored.
    assert direct[db_name].items.find_one({"_id": document["_id"]})["_outputs"] == {
        name: prediction
    }


def test_bad_register_from_mongosh_is_a_server_error(proxy, name, db_name, tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(onnx_models.linear_classifier())
    script = f"""
db.adminCommand({{
  registerModel: "{name}",
  collection: "{db_name}.items",
  input: "x",
  onnx: Binary(fs.readFileSync("model.onnx")),
  onError: "ignore"
}});
"""
    result = mongosh(proxy.uri, script, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "MongoServerError" in output
    assert "'onError' must be one of 'reject', 'record', got 'ignore'" in output
