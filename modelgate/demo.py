"""The client's side of `modelgate demo`: the story a user lives through.

`proxy.demo` starts the processes (an upstream, modelgate in front of it, a local image
server) and hands over modelgate's address and the image server's; `tell_story` then
does what a user does from Python: it puts scikit-learn's bundled digits on the image
server as 28x28 PNGs, fills a `users` collection with documents holding an image URL and
a label, trains a small CNN from a query on it with `modelgate.train`, attaches it as a
deferred model (backfilling the users without a label, and watching for new ones) and as
an inline model, then inserts new users through pymongo, as a web application would, and
prints the predictions it reads back next to the true labels."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pymongo
from PIL import Image

from engine.fetch import FetchSettings
from modelgate import admin
from modelgate._torch import import_torch
from modelgate.train import ImageClassifierTrainer

__all__ = [
    "DATABASE",
    "LABELS",
    "PREPROCESS",
    "SIZE",
    "SIZES",
    "Size",
    "Step",
    "say",
    "tell_story",
]

DATABASE = "modelgate_demo"
SIZE = 28
PREPROCESS: dict[str, Any] = {
    "kind": "image",
    "size": [SIZE, SIZE],
    "mode": "L",
    "scale": 255,
    "mean": [0.5],
    "std": [0.5],
}
LABELS = [str(d) for d in range(10)]
INLINE_MODEL = "digits-inline"
DEFERRED_MODEL = "digits"


@dataclass(frozen=True)
class Size:
    users: int  # labelled users: the training data
    unlabelled: int  # users already there without a label: the backfill
    new: int  # users inserted after the model is attached
    epochs: int


SIZES = {"small": Size(800, 40, 5, 10), "full": Size(1200, 200, 10, 10)}


def say(line: str) -> None:
    print(line.rstrip(), flush=True)


class Step:
    """One numbered step of the story: its title now, its outcome and duration at `done`."""

    def __init__(self, number: int, title: str) -> None:
        self.started = time.monotonic()
        say(f"[{number}] {title}")

    def done(self, message: str = "") -> None:
        elapsed = time.monotonic() - self.started
        say(f"    {message + ' ' if message else ''}({elapsed:.1f}s)")


def tell_story(
    uri: str,
    *,
    images: dict[str, bytes],
    image_base: str,
    size: Size,
    cache_dir: str,
    timeout: float,
) -> bool:
    """Steps 2 to 6 of the demo (step 1, starting the processes, is the caller's), against
    modelgate at `uri`. `images` is the image server's table of path to bytes, served at
    `image_base`; `cache_dir` is modelgate's image cache, which training then shares.
    Whether every user was predicted and the backfill finished."""
    with contextlib.ExitStack() as stack:
        client: pymongo.MongoClient[dict[str, Any]] = stack.enter_context(pymongo.MongoClient(uri))
        step = Step(2, "the digits on the image server (scikit-learn's bundled set, 28x28 PNGs)")
        pngs, truths = _digit_pngs()
        # The last images are kept for the users who arrive after the model: never trained on.
        held_out = size.unlabelled + size.new
        pool = len(pngs) - held_out

        def user(number: int, index: int) -> dict[str, Any]:
            path = f"/digits/{index}.png"
            images[path] = pngs[index]
            return {"name": f"user-{number:04d}", "img": image_base + path}

        labelled = [{**user(n, n % pool), "label": truths[n % pool]} for n in range(size.users)]
        unlabelled = [user(size.users + k, pool + k) for k in range(size.unlabelled)]
        arriving = [
            (
                user(size.users + size.unlabelled + k, pool + size.unlabelled + k),
                truths[pool + size.unlabelled + k],
            )
            for k in range(size.new)
        ]
        truth_of = {u["name"]: truths[pool + k] for k, u in enumerate(unlabelled)}
        step.done(f"{len(images)} images at {image_base}/digits/")

        step = Step(3, f"{size.users} users with a label, {size.unlabelled} without")
        users = client[DATABASE].users
        users.insert_many(labelled + unlabelled)
        step.done(f"{users.count_documents({})} documents in {DATABASE}.users")

        trainer, accuracy = _train(client, users, size, cache_dir)

        step = Step(5, "attach: deferred (backfill + watch) and inline")
        reply = trainer.predict("img", select={"label": {"$exists": False}}, name=DEFERRED_MODEL)
        stack.callback(_drop, client, DEFERRED_MODEL)
        trainer.register(INLINE_MODEL, mode="inline", output="inline")
        stack.callback(_drop, client, INLINE_MODEL)
        status = admin.wait_for_backfill(client, DEFERRED_MODEL, timeout=timeout)
        backfilled = list(users.find({"label": {"$exists": False}}))
        right = sum(_label(doc, DEFERRED_MODEL) == str(truth_of[doc["name"]]) for doc in backfilled)
        done = status.get("deferred", {}).get("done", 0)
        step.done(
            f"'{DEFERRED_MODEL}' v{reply['version']} backfilled {done}/{size.unlabelled} users "
            f"({right} right); '{INLINE_MODEL}' predicts on insert"
        )

        predicted, correct = _sign_up(users, arriving, timeout)
        say(
            f"summary: validation accuracy {accuracy:.3f}; backfill {right}/{size.unlabelled} "
            f"right; new users {correct}/{size.new} right"
        )
        return predicted == size.new and done == size.unlabelled


def _train(
    client: pymongo.MongoClient[dict[str, Any]], users: Any, size: Size, cache_dir: str
) -> tuple[ImageClassifierTrainer, float]:
    """Step 4: a CNN trained on the labelled users; the trainer and its validation accuracy."""
    step = Step(
        4, f"train a CNN on db.users.find({{label: {{$exists: 1}}}}), <= {size.epochs} epochs"
    )
    trainer = ImageClassifierTrainer(
        _cnn(),
        labels=LABELS,
        preprocess=PREPROCESS,
        client=client,
        collection=users,
        filter={"label": {"$exists": True}},
        input_field="img",
        label_field="label",
        fetch=FetchSettings(allow_private=True),  # the image server is on loopback
        cache_dir=cache_dir,
    )
    metrics = trainer.fit(epochs=size.epochs, lr=3e-3, progress=sys.stderr.isatty())
    accuracy = float(metrics["validationAccuracy"])
    by_epoch = " ".join(f"{e['val_accuracy']:.2f}" for e in trainer.history)
    training_seconds = metrics["seconds"] - metrics["loadSeconds"]
    say(
        f"    read and preprocessed {metrics['documents']} documents in "
        f"{metrics['loadSeconds']:.1f}s; trained in {training_seconds:.1f}s"
    )
    say(f"    validation accuracy by epoch: {by_epoch} (best: epoch {metrics['bestEpoch']})")
    step.done(
        f"{metrics['trainSize']} train / {metrics['validationSize']} validation documents, "
        f"{metrics['epochs']} epochs on {metrics['device']}; validation accuracy: {accuracy:.3f}"
    )
    return trainer, accuracy


def _sign_up(
    users: Any, arriving: list[tuple[dict[str, Any], int]], timeout: float
) -> tuple[int, int]:
    """Step 6: the new users inserted one by one, their predictions printed; how many
    were predicted by both models, and how many of those rightly."""
    step = Step(6, f"{len(arriving)} new users sign up (pymongo insert_one, as a web app would)")
    say(f"    {'user':<10}  {'true':<4}  {'inline':<10}  {'deferred':<10}")
    predicted = correct = 0
    for document, truth in arriving:
        inserted = users.insert_one(dict(document)).inserted_id
        doc = users.find_one({"_id": inserted}) or {}
        deadline = time.monotonic() + timeout
        while _label(doc, DEFERRED_MODEL) is None and time.monotonic() < deadline:
            time.sleep(0.1)
            doc = users.find_one({"_id": inserted}) or {}
        inline = doc.get("inline") or {}
        deferred = (doc.get("_outputs") or {}).get(DEFERRED_MODEL) or {}
        if inline.get("label") is not None and deferred.get("label") is not None:
            predicted += 1
            correct += deferred["label"] == str(truth)
        say(
            f"    {document['name']:<10}  {truth:<4}  {_shown(inline):<10}  {_shown(deferred):<10}"
            f"{'' if deferred.get('label') == str(truth) else '  (wrong)'}"
        )
    step.done(f"{predicted}/{len(arriving)} predicted, {correct} right")
    return predicted, correct


def _digit_pngs() -> tuple[list[bytes], list[int]]:
    """scikit-learn's 1,797 bundled 8x8 digits as 28x28 grayscale PNGs, shuffled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    pngs, labels = [], []
    for i in order:
        gray = np.clip(data.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="PNG")
        pngs.append(out.getvalue())
        labels.append(int(data.target[i]))
    return pngs, labels


def _cnn() -> Any:
    torch = import_torch()
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # 28x28
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7x7
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def _label(doc: dict[str, Any], model: str) -> Any:
    return ((doc.get("_outputs") or {}).get(model) or {}).get("label")


def _shown(prediction: dict[str, Any]) -> str:
    if prediction.get("label") is None:
        return "-"
    return f"{prediction['label']} ({prediction['score']:.2f})"


def _drop(client: pymongo.MongoClient[dict[str, Any]], name: str) -> None:
    with contextlib.suppress(Exception):  # cleanup: the model may not exist
        admin.drop_model(client, name)
