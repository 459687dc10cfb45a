"""Every runnable example in README.md is run here, against modelgate, so it cannot rot.

Python blocks run as written, with the URI replaced by the test proxy's; a block that
makes no client of its own continues the block before it, as the README's text says, and
runs after it in the same namespace. mongosh blocks run through mongosh. Shell blocks are
the set-up commands CI itself runs. The text model story (MiniLM exported, an autoEmbed
index, queries from pymongo and mongosh) runs when its packages are there: the train and
minilm extras, as in CI."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import numpy as np
import onnx
import pymongo
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.support.onnx_models import image_classifier
from bench.support.processes import ROOT, ProxyProcess
from proxy.embedded import EmbeddedUpstream
from tests.conftest import REAL_UPSTREAM

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
MONGOSH = [code for lang, code in BLOCKS if lang == "js"]
MONGOSH_BIN = ROOT / "node_modules" / ".bin" / "mongosh"
README_URI = "mongodb://localhost:27017/"
Client = pymongo.MongoClient[dict[str, Any]]


def _groups(blocks: list[str]) -> list[str]:
    """The python blocks as they run: one that makes no client continues the one before."""
    groups: list[str] = []
    for code in blocks:
        if groups and "MongoClient(" not in code:
            groups[-1] += "\n" + code
        else:
            groups.append(code)
    return groups


GROUPS = _groups(PYTHON)
TEXT_STORY = "register_text_model("
#: What the text story needs beyond the base install: the train and minilm extras.
TEXT_PACKAGES = ("torch", "transformers", "all_minilm_l6_v2")


def _drop_search_indexes(client: Any, direct: Any) -> None:
    """The shop's search indexes, dropped through modelgate (with their autoEmbed models)."""
    for index in direct.modelgate.searchIndexes.find({"namespace": {"$regex": "^shop[.]"}}):
        collection = index["namespace"].split(".", 1)[1]
        client.shop[collection].drop_search_index(index["name"])


@pytest.fixture
def clean_shop(direct, client):  # type: ignore[no-untyped-def]
    """The README's examples use the `shop` database; start and end with it empty."""
    with _empty_shop(client, direct):
        yield


@contextlib.contextmanager
def _empty_shop(client: Client, direct: Client) -> Iterator[None]:
    _drop_search_indexes(client, direct)
    direct.drop_database("shop")
    yield
    _drop_search_indexes(client, direct)
    for model in client.admin.command("listModels")["models"]:
        if model["namespace"].startswith("shop."):
            client.admin.command("dropModel", model["name"])
    direct.drop_database("shop")


def digits_sized_model() -> bytes:
    """A linear model over 28x28 grayscale images with ten outputs, like the README's."""
    weights = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["y"]),
        ],
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_readme_has_examples() -> None:
    assert len(PYTHON) >= 3
    assert len(MONGOSH) >= 2
    assert len([code for code in GROUPS if TEXT_STORY in code]) == 1


def _run_python(code: str, uri: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code.replace(README_URI, uri), name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("index", [i for i, code in enumerate(GROUPS) if TEXT_STORY not in code])
def test_python_example(index: int, proxy, clean_shop) -> None:  # type: ignore[no-untyped-def]
    code = GROUPS[index]
    if "import torch" in code:
        pytest.importorskip("torch", reason="the train extra is not installed")
    _run_python(code, proxy.uri, f"README python block {index}")


@pytest.fixture
def own_stack(upstream_uri: str, tmp_path: Path) -> Iterator[tuple[ProxyProcess, Client]]:
    """A proxy and its client on an upstream of the text story's own (unless a real one is
    given): MiniLM is 90 MB, stored twice (the upload and the registry's copy), and late in
    a full run the session's shared SecantusDB, holding every other test's data, once
    answered it with InternalError."""
    with contextlib.ExitStack() as stack:
        if not REAL_UPSTREAM:
            upstream = EmbeddedUpstream(":memory:", log_path=tmp_path / "secantus.log")
            upstream_uri = stack.enter_context(upstream).uri
        args = ("--data-dir", str(tmp_path / "proxy"))
        proxy = ProxyProcess(upstream_uri, tmp_path / "modelgate.log", args=args)
        stack.enter_context(proxy)
        client: Client = stack.enter_context(pymongo.MongoClient(proxy.uri))
        direct: Client = stack.enter_context(pymongo.MongoClient(upstream_uri))
        stack.enter_context(_empty_shop(client, direct))
        yield proxy, client


@pytest.mark.slow
def test_text_story(own_stack, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The section on text models, as a reader follows it: MiniLM exported and registered,
    the catalogue and its autoEmbed index, the questions (pymongo), the index dropped and
    made again from mongosh, which asks its own question."""
    absent = [name for name in TEXT_PACKAGES if importlib.util.find_spec(name) is None]
    if absent:
        pytest.skip(f"the train and minilm extras are not installed ({', '.join(absent)})")
    proxy, client = own_stack
    (code,) = [code for code in GROUPS if TEXT_STORY in code]
    namespace = _run_python(code, proxy.uri, "README text story")
    printed = capsys.readouterr().out
    assert "READY True {'indexed': 246, 'pending': 0, 'failed': 0}" in printed, printed
    assert "travel mug" in printed and "noise cancelling headphones" in printed, printed
    toys = namespace["search"](
        "a present for a small child",
        filter={"category": "toys", "price": {"$lt": 30}},
        exact=True,
    )
    assert toys and all(p["price"] < 30 for p in toys), toys

    if not MONGOSH_BIN.exists():
        return
    client.shop.products.drop_search_index("semantic")
    result = _mongosh(proxy.uri, _block_with("createSearchIndex"), tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "MongoServerError" not in result.stdout + result.stderr
    assert "rain jacket" in result.stdout and "score" in result.stdout, result.stdout


def _mongosh(proxy_uri: str, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    path = cwd / "example.js"
    path.write_text(script)
    return subprocess.run(
        [str(MONGOSH_BIN), proxy_uri + "shop", "--quiet", "--norc", "--file", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not MONGOSH_BIN.exists(), reason="mongosh is not installed (npm ci)")
def test_mongosh_examples(proxy, client, clean_shop, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert shutil.which("node"), "mongosh needs node"
    (tmp_path / "digits.onnx").write_bytes(digits_sized_model())
    register, upload, backfill = (
        _block_with('registerModel: "digits"'),
        _block_with("modelgate_uploads"),
        _block_with("backfillModel"),
    )
    result = _mongosh(proxy.uri, register, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    # The block ends with dropModel; the model was there until then.
    assert "MongoServerError" not in result.stdout + result.stderr
    assert "digits" not in [m["name"] for m in client.admin.command("listModels")["models"]]
    # backfillModel needs a deferred model of that name.
    client.admin.command(
        {
            "registerModel": "digits",
            "collection": "shop.users",
            "input": "img",
            "mode": "deferred",
            "onnx": bson.Binary((tmp_path / "digits.onnx").read_bytes()),
            "preprocess": {"kind": "image", "size": [28, 28], "mode": "L"},
        }
    )
    result = _mongosh(proxy.uri, backfill, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "MongoServerError" not in result.stdout + result.stderr

    # The upload by hand: a 224x224 RGB classifier in place of resnet50.onnx, and labels
    # for its two classes in place of ImageNet's.
    (tmp_path / "resnet50.onnx").write_bytes(image_classifier(channels=3, size=(224, 224)))
    labels = 'const imagenetLabels = ["black", "white"]\n'
    result = _mongosh(proxy.uri, labels + upload, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "MongoServerError" not in result.stdout + result.stderr
    assert "resnet" in [m["name"] for m in client.admin.command("listModels")["models"]]
    assert client.shop.modelgate_uploads.files.count_documents({}) == 0
    assert client.shop.modelgate_uploads.chunks.count_documents({}) == 0


def _block_with(text: str) -> str:
    """The README's mongosh block that contains `text`."""
    (block,) = [code for code in MONGOSH if text in code]
    return block
