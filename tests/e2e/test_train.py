"""modelgate.train: train a classifier from a query through modelgate, export it, attach it.

The digits live in documents as BinData PNGs and as URLs served by a real local HTTP
server; the model is trained through the same fetcher and preprocessing as serving."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pymongo
import pytest
import trio
from PIL import Image

from bench.support.image_server import ImageServer
from bench.support.processes import ROOT, ProxyProcess
from engine.fetch import FetchSettings
from modelgate import admin
from tests.e2e.digits import PREPROCESS, SIZE, load_digits

torch = pytest.importorskip("torch", reason="needs the train extra (torch)")

from modelgate import train  # noqa: E402

pytestmark = pytest.mark.train

LABELS = [str(d) for d in range(10)]
LOOPBACK = FetchSettings(allow_private=True)


def small_cnn() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 7 * 7, 10),
    )


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
def fast_proxy(
    upstream_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy that sweeps often (deferred models) and may fetch from loopback."""
    log_dir = tmp_path_factory.mktemp("train-proxy")
    args = ("--data-dir", str(log_dir), "--sweep-interval", "0.5", "--fetch-allow-private")
    with ProxyProcess(upstream_uri, log_dir / "modelgate.log", args=args) as process:
        yield process


@pytest.fixture(scope="module")
def gate(fast_proxy: ProxyProcess) -> Iterator[pymongo.MongoClient]:  # type: ignore[type-arg]
    with pymongo.MongoClient(fast_proxy.uri) as mongo_client:
        yield mongo_client


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_digits(test_size=100)


@pytest.fixture(scope="module")
def trained(gate, images, digits, direct) -> Iterator[tuple[train.ImageClassifierTrainer, str]]:  # type: ignore[no-untyped-def]
    """A trainer fitted on ~1,700 digits: even ones as BinData, odd ones as URLs."""
    db_name = "t_train_digits"
    direct.drop_database(db_name)
    docs = []
    for i, (png, label) in enumerate(zip(digits.train_png, digits.train_labels, strict=True)):
        if i % 2:
            images.images[f"d{i}"] = png
            value: Any = images.url(f"/img/d{i}.png")
        else:
            value = bson.Binary(png)
        docs.append({"i": i, "img": value, "label": int(label)})
    gate[db_name].users.insert_many(docs)
    trainer = train.ImageClassifierTrainer(
        small_cnn(),
        labels=LABELS,
        preprocess=PREPROCESS,
        client=gate,
        collection=gate[db_name].users,
        filter={"label": {"$exists": True}},
        input_field="img",
        label_field="label",
        fetch=LOOPBACK,
    )
    trainer.fit(epochs=6, lr=3e-3, progress=False)
    yield trainer, db_name
    direct.drop_database(db_name)


# --------------------------------------------------------------------------- fit


def test_fit_reaches_90_percent_validation_accuracy(trained, images, digits) -> None:  # type: ignore[no-untyped-def]
    trainer, _ = trained
    metrics = trainer.metrics
    assert metrics["validationAccuracy"] >= 0.9, metrics
    assert metrics["trainSize"] + metrics["validationSize"] == len(digits.train_png)
    assert 0.1 < metrics["validationSize"] / len(digits.train_png) < 0.3
    assert metrics["skipped"] == {
        "missingInput": 0,
        "missingLabel": 0,
        "unknownLabel": 0,
        "badImages": 0,
    }
    assert 1 <= len(trainer.history) <= 6
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(trainer.history[0])
    # The URL half came through the fetcher from the image server.
    assert images.count("/img/d1.png") >= 1
    assert trainer.evaluate()["accuracy"] == pytest.approx(metrics["validationAccuracy"])


def test_early_stopping_keeps_the_best_epoch(gate, direct, images, digits) -> None:  # type: ignore[no-untyped-def]
    db_name = "t_train_early"
    direct.drop_database(db_name)
    gate[db_name].d.insert_many(
        [
            {"img": bson.Binary(p), "label": int(y)}
            for p, y in zip(digits.train_png[:300], digits.train_labels[:300], strict=True)
        ]
    )
    try:
        trainer = train.ImageClassifierTrainer(
            small_cnn(),
            labels=LABELS,
            preprocess=PREPROCESS,
            client=gate,
            collection=gate[db_name].d,
            input_field="img",
            label_field="label",
        )
        # A huge learning rate makes the validation loss worse after the first epochs.
        trainer.fit(epochs=30, lr=0.5, patience=2, progress=False)
        assert len(trainer.history) < 30
        best = min(trainer.history, key=lambda e: e["val_loss"])
        assert trainer.metrics["bestEpoch"] == best["epoch"]
        assert trainer.evaluate()["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    finally:
        direct.drop_database(db_name)


# --------------------------------------------------------------------------- export


def test_export_matches_torch_with_a_dynamic_batch(trained) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    trainer, _ = trained
    onnx_bytes = trainer.export()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for n in (1, 5):
        (out,) = session.run(None, {"x": np.zeros((n, 1, SIZE, SIZE), np.float32)})
        assert out.shape == (n, 10)


def test_onnx_agreement_check_refuses_mismatches() -> None:
    expected = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    assert train.check_onnx_agreement(expected, expected + 1e-6) < 1e-5
    tampered = expected.copy()
    tampered[2, 3] += 0.5
    with pytest.raises(train.OnnxMismatchError, match="disagrees with torch"):
        train.check_onnx_agreement(expected, tampered)
    with pytest.raises(train.OnnxMismatchError, match="shape"):
        train.check_onnx_agreement(expected, expected[:, :9])
    with pytest.raises(train.OnnxMismatchError, match="non-finite"):
        train.check_onnx_agreement(expected, np.full_like(expected, np.nan))


# --------------------------------------------------------------------------- preprocessing


def test_training_and_serving_preprocess_identically(trained, digits) -> None:  # type: ignore[no-untyped-def]
    from engine.inputs import prepare_input
    from engine.runtime import RuntimeSettings, load_model
    from engine.spec import ModelSpec

    trainer, _ = trained
    spec = ModelSpec.from_document(
        {
            "name": "same",
            "collection": "a.b",
            "input": "img",
            "preprocess": PREPROCESS,
            "postprocess": {"kind": "classify", "labels": LABELS},
        }
    )
    model = load_model(
        spec, 1, trainer.onnx_bytes or trainer.export(), RuntimeSettings(("CPUExecutionProvider",))
    )
    for png in digits.test_png[:20]:
        training_side = trainer.tensor(png)
        serving_side = trio.run(prepare_input, bson.Binary(png), model)
        assert training_side.dtype == serving_side.dtype == np.float32
        assert np.array_equal(training_side, serving_side)


def digit_transform(mean: float = 0.5, size: int = SIZE) -> Any:
    """torchvision's spelling of PREPROCESS (with `mean` and `size` to make it differ)."""
    transforms = pytest.importorskip("torchvision.transforms", reason="needs torchvision")
    return transforms.Compose(
        [
            transforms.Grayscale(),
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize([mean], [0.5]),
        ]
    )


def test_torchvision_transform_trains_and_serves_identically(gate, errors_coll, digits) -> None:  # type: ignore[no-untyped-def]
    pairs = zip(digits.train_png[:400], digits.train_labels[:400], strict=True)
    errors_coll.insert_many([{"img": bson.Binary(p), "label": int(y)} for p, y in pairs])
    trainer = make_trainer(
        gate, errors_coll, preprocess=digit_transform(), serving_preprocess=PREPROCESS
    )
    trainer.fit(epochs=4, lr=3e-3, progress=False)
    assert trainer.metrics["validationAccuracy"] >= 0.6, trainer.metrics
    name = "t_train_transform"
    probe = errors_coll.database.probe
    trainer.register(name, mode="inline", collection=f"{probe.database.name}.probe")
    try:
        probe.insert_many([{"img": bson.Binary(p)} for p in digits.test_png[:30]])
        served = [d["_outputs"][name]["label"] for d in probe.find()]
        # The ONNX model on the serving preprocess answers as torch did on the transform.
        module = trainer.module.eval()
        with torch.no_grad():
            batch = torch.stack(
                [digit_transform()(Image.open(io.BytesIO(p))) for p in digits.test_png[:30]]
            )
            trained = [LABELS[i] for i in module(batch).argmax(dim=1).tolist()]
        assert served == trained
    finally:
        admin.drop_model(gate, name)


def test_transform_that_serving_cannot_reproduce_is_refused(gate, errors_coll, digits) -> None:  # type: ignore[no-untyped-def]
    pairs = zip(digits.train_png[:20], digits.train_labels[:20], strict=True)
    errors_coll.insert_many([{"img": bson.Binary(p), "label": int(y)} for p, y in pairs])
    other_mean = make_trainer(
        gate, errors_coll, preprocess=digit_transform(mean=0.4), serving_preprocess=PREPROCESS
    )
    with pytest.raises(train.TrainingError, match=r"disagree on document .*largest difference"):
        other_mean.fit(epochs=1, progress=False)
    # 32x32 on both paths is accepted; the same pixels in another layout (NHWC) are not.
    bigger = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
    other_size = make_trainer(
        gate,
        errors_coll,
        module=bigger,
        preprocess=digit_transform(size=32),
        serving_preprocess={**PREPROCESS, "size": [32, 32]},
    )
    other_size.fit(epochs=1, progress=False)  # consistent: accepted
    with pytest.raises(train.TrainingError, match=r"shape \[1, 32, 32\] but serving_preprocess"):
        make_trainer(
            gate,
            errors_coll,
            module=bigger,
            preprocess=digit_transform(size=32),
            serving_preprocess={**PREPROCESS, "size": [32, 32], "layout": "NHWC"},
        ).fit(epochs=1, progress=False)
    unregistrable = make_trainer(gate, errors_coll, preprocess=digit_transform())
    unregistrable.fit(epochs=1, progress=False)
    with pytest.raises(train.TrainingError, match="pass serving_preprocess"):
        unregistrable.register("t_train_no_serving")


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_and_stable_as_data_grows(gate, direct, digits) -> None:  # type: ignore[no-untyped-def]
    ids = [bson.ObjectId() for _ in range(2000)]
    sides = [train.is_validation(i, 0.2) for i in ids]
    assert sides == [train.is_validation(i, 0.2) for i in ids]
    assert 0.15 < sum(sides) / len(sides) < 0.25
    # Integer and string ids are split too (any BSON value).
    assert isinstance(train.is_validation(7, 0.2), bool)

    db_name = "t_train_split"
    direct.drop_database(db_name)
    coll = gate[db_name].d

    def insert(start: int, stop: int) -> None:
        coll.insert_many(
            [
                {"_id": i, "img": bson.Binary(digits.train_png[i]), "label": int(label)}
                for i, label in zip(
                    range(start, stop), digits.train_labels[start:stop], strict=True
                )
            ]
        )

    def split() -> tuple[set[Any], set[Any]]:
        trainer = train.ImageClassifierTrainer(
            small_cnn(),
            labels=LABELS,
            preprocess=PREPROCESS,
            client=gate,
            collection=coll,
            input_field="img",
            label_field="label",
        )
        train_ids, val_ids = trainer.split()
        return set(train_ids), set(val_ids)

    try:
        insert(0, 200)
        first = split()
        assert split() == first  # deterministic
        assert first[1] and first[0]
        insert(200, 400)
        grown = split()
        assert first[0] <= grown[0] and first[1] <= grown[1]  # nobody moved
        assert grown[1] - first[1]  # some new documents went to validation
    finally:
        direct.drop_database(db_name)


# --------------------------------------------------------------------------- errors


def make_trainer(gate, coll, **overrides: Any) -> Any:  # type: ignore[no-untyped-def]
    options: dict[str, Any] = {
        "labels": LABELS,
        "preprocess": PREPROCESS,
        "client": gate,
        "collection": coll,
        "input_field": "img",
        "label_field": "label",
        "fetch": LOOPBACK,
    }
    options.update(overrides)
    module = options.pop("module", None) or small_cnn()
    return train.ImageClassifierTrainer(module, **options)


@pytest.fixture
def errors_coll(gate, direct):  # type: ignore[no-untyped-def]
    db_name = "t_train_errors"
    direct.drop_database(db_name)
    yield gate[db_name].d
    direct.drop_database(db_name)


def test_empty_query_is_refused(gate, errors_coll) -> None:  # type: ignore[no-untyped-def]
    trainer = make_trainer(gate, errors_coll, filter={"label": 99})
    with pytest.raises(train.TrainingError, match="matched no documents"):
        trainer.fit(epochs=1, progress=False)


def test_documents_missing_fields_are_skipped_and_counted_or_refused(
    gate, errors_coll, digits
) -> None:  # type: ignore[no-untyped-def]
    good = [
        {"img": bson.Binary(p), "label": int(y)}
        for p, y in zip(digits.train_png[:150], digits.train_labels[:150], strict=True)
    ]
    errors_coll.insert_many(
        [
            *good,
            {"img": bson.Binary(digits.train_png[0])},  # no label
            {"label": 3},  # no image
            {"img": bson.Binary(digits.train_png[1]), "label": "eleven"},  # unknown label
            {"img": 12, "label": 1},  # not an image
        ]
    )
    trainer = make_trainer(gate, errors_coll)
    with pytest.warns(train.TrainingWarning, match="skipped 4 of 154 documents"):
        report = trainer.load()
    assert report.skipped == {
        "missingInput": 2,
        "missingLabel": 1,
        "unknownLabel": 1,
        "badImages": 0,
    }
    assert report.train + report.validation == 150

    strict = make_trainer(gate, errors_coll, missing="error")
    with pytest.raises(train.TrainingError, match=r"has no 'label'|has no 'img'|not one of"):
        strict.load()

    none_usable = make_trainer(gate, errors_coll, filter={"img": {"$exists": False}})
    with pytest.raises(train.TrainingError, match="none of the 1 documents"):
        none_usable.load()


def test_unfetchable_images_are_counted_and_named(gate, errors_coll, digits, images) -> None:  # type: ignore[no-untyped-def]
    for i in range(120):
        images.images[f"e{i}"] = digits.train_png[i]
    docs: list[dict[str, Any]] = [
        {"img": images.url(f"/img/e{i}.png"), "label": int(digits.train_labels[i])}
        for i in range(120)
    ]
    docs += [{"img": images.url(f"/img/gone{i}.png"), "label": 1} for i in range(5)]
    docs.append({"img": images.url("/notimage"), "label": 2})
    errors_coll.insert_many(docs)

    with pytest.warns(train.TrainingWarning, match=r"6 of 126 images .*/img/gone"):
        report = make_trainer(gate, errors_coll).load()
    assert report.bad_images == 6
    assert len(report.failures) == 3

    with pytest.raises(train.ImageFetchError, match="/img/gone") as failure:
        make_trainer(gate, errors_coll, missing="error").load()
    assert failure.value.failures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", train.TrainingWarning)
        only_bad = make_trainer(gate, errors_coll, filter={"img": {"$regex": "gone"}})
        with pytest.raises(train.ImageFetchError, match="could not be fetched"):
            only_bad.load()

    # Loopback is refused by default, as when serving.
    five = {"img": {"$regex": r"/img/e[0-4]\.png$"}}
    guarded = make_trainer(gate, errors_coll, fetch=None, filter=five)
    with pytest.raises(train.ImageFetchError, match=r"private|loopback|not allowed|refused"):
        guarded.load()


def test_output_size_must_match_the_labels(gate, errors_coll) -> None:  # type: ignore[no-untyped-def]
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 7))
    with pytest.raises(train.TrainingError, match=r"\(1, 7\).*10 labels"):
        make_trainer(gate, errors_coll, module=wrong)
    wrong_input = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 10))
    with pytest.raises(train.TrainingError, match="cannot take a batch"):
        make_trainer(gate, errors_coll, module=wrong_input)


def test_bad_arguments(gate, errors_coll) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(train.TrainingError, match="collection must be a pymongo Collection"):
        make_trainer(gate, errors_coll, collection=errors_coll.find())
    with pytest.raises(train.TrainingError, match="filter must be a document"):
        make_trainer(gate, errors_coll, filter=[{"a": 1}])
    with pytest.raises(train.TrainingError, match="missing must be"):
        make_trainer(gate, errors_coll, missing="ignore")
    with pytest.raises(train.TrainingError, match="invalid preprocess"):
        make_trainer(gate, errors_coll, preprocess={"kind": "image"})
    with pytest.raises(train.TrainingError, match="validation_fraction"):
        make_trainer(gate, errors_coll, validation_fraction=1.0)
    with pytest.raises(train.TrainingError, match="call fit"):
        make_trainer(gate, errors_coll).register("x")


# --------------------------------------------------------------------------- attach


def test_register_keeps_the_metrics_in_the_registry(trained, gate) -> None:  # type: ignore[no-untyped-def]
    trainer, db_name = trained
    name = "t_train_inline"
    reply = trainer.register(name, collection=f"{db_name}.incoming")
    try:
        assert reply["version"] >= 1
        listed = {m["name"]: m for m in admin.list_models(gate)}[name]
        assert listed["metadata"]["validationAccuracy"] == trainer.metrics["validationAccuracy"]
        assert listed["metadata"]["labels"] == LABELS
        status = admin.model_status(gate, name)
        assert status["metadata"]["trainSize"] == trainer.metrics["trainSize"]
        assert status["mode"] == "inline"

        # Inline: the prediction is in the document when the insert returns.
        png = load_digits(test_size=100).test_png[0]
        gate[db_name].incoming.insert_one({"_id": 1, "img": bson.Binary(png)})
        doc = gate[db_name].incoming.find_one({"_id": 1})
        assert doc["_outputs"][name]["label"] in LABELS
    finally:
        admin.drop_model(gate, name)


def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_predict_watch_backfills_and_classifies_new_documents(trained, gate, digits) -> None:  # type: ignore[no-untyped-def]
    trainer, db_name = trained
    users = gate[db_name].users
    unlabeled = [
        {"img": bson.Binary(p), "truth": int(y), "new": True}
        for p, y in zip(digits.test_png[:40], digits.test_labels[:40], strict=True)
    ]
    users.insert_many(unlabeled)
    name = "t_train_deferred"
    out = f"_outputs.{name}"
    reply = trainer.predict("img", select={"label": {"$exists": False}}, name=name)
    try:
        assert reply["version"] >= 1
        wait_until(lambda: users.count_documents({out: {"$exists": True}}) >= 40)
        done = list(users.find({"new": True, out: {"$exists": True}}))
        assert len(done) == 40
        accuracy = np.mean([d["_outputs"][name]["label"] == str(d["truth"]) for d in done])
        assert accuracy >= 0.85
        # Out of scope: the labelled training documents are left alone.
        assert users.count_documents({"label": {"$exists": True}, out: {"$exists": True}}) == 0

        status = admin.model_status(gate, name)
        assert status["mode"] == "deferred"
        assert status["metadata"]["validationAccuracy"] >= 0.9

        # A new user, written as a web application would: classified in the background.
        new_id = users.insert_one({"img": bson.Binary(digits.test_png[50]), "new": True})
        wait_until(lambda: (users.find_one({"_id": new_id.inserted_id}) or {}).get("_outputs"))
        predicted = users.find_one({"_id": new_id.inserted_id})["_outputs"][name]
        assert predicted["label"] in LABELS and 0 < predicted["score"] <= 1

        # backfillModel through the client: only the documents of its filter are redone.
        assert admin.backfill_model(gate, name, filter={"new": True})["marked"] == 41
        status = admin.wait_for_backfill(gate, name, timeout=60)
        assert status["deferred"]["pending"] == 0
        # Recomputed: each output has a version again (a stale one has only backfillOf).
        assert users.count_documents({"new": True, f"{out}.version": {"$exists": True}}) == 41
    finally:
        admin.drop_model(gate, name)


def test_predict_without_watch_backfills_then_detaches(trained, gate, digits) -> None:  # type: ignore[no-untyped-def]
    trainer, db_name = trained
    coll = gate[db_name].once
    coll.insert_many([{"img": bson.Binary(p)} for p in digits.test_png[60:80]])
    name = "t_train_once"
    reply = trainer.predict(select={}, watch=False, name=name, collection=f"{db_name}.once")
    assert reply["backfilled"] == 20
    assert coll.count_documents({f"_outputs.{name}.label": {"$exists": True}}) == 20
    assert name not in {m["name"] for m in admin.list_models(gate)}


def test_without_torch_the_client_imports_and_training_names_the_extra() -> None:
    # torch hidden as if not installed: registering needs no torch, training says what to
    # install. A fresh interpreter, since this one has torch loaded.
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import modelgate, modelgate.train, modelgate.demo\n"
        "try:\n"
        "    modelgate.train.ImageClassifierTrainer(None, labels=['a'], preprocess={},\n"
        "        client=None, collection=None, input_field='x', label_field='y')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'modelgate[train]'" in result.stdout


def test_cache_dir_is_filled_for_serving(gate, errors_coll, digits, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from engine.cache import ImageCache

    images.images["c0"] = digits.train_png[0]
    errors_coll.insert_many([{"img": images.url("/img/c0.png"), "label": 0}] * 1)
    cache_dir = tmp_path / "cache"
    trainer = make_trainer(gate, errors_coll, cache_dir=str(cache_dir), validation_fraction=0.0)
    trainer.load()
    with ImageCache(cache_dir) as cache:
        assert images.url("/img/c0.png") in cache
