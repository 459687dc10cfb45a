"""`modelgate demo`: the whole story on one machine, with nothing to set up by hand.

An upstream (the embedded SecantusDB, or `--upstream URI`), modelgate in front of it, and
a local image server with scikit-learn's bundled digits as 28x28 PNGs. A `users`
collection gets documents with an image URL and a label; a small CNN is trained from a
query on it with `engine.train`, attached as a deferred model (backfilling the users
without a label, and watching for new ones) and as an inline model; then new users are
inserted through pymongo, as a web application would, and the predictions it reads back
are printed next to the true labels."""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="small: 800 users, 40 to backfill, 5 new (for CI); full: 1,200 users, "
        "200 to backfill, 10 new; 10 epochs at most "
        "(default %(default)s)",
    )
    parser.add_argument("--users", type=int, metavar="N", help="labelled users to train on")
    parser.add_argument("--new-users", type=int, metavar="N", help="users inserted at the end")
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs (at most)")
    parser.add_argument(
        "--upstream",
        metavar="URI",
        help="use this MongoDB (database 'modelgate_demo', dropped afterwards) instead of "
        "the embedded SecantusDB",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where the embedded upstream, modelgate's cache and logs go (default: a "
        "temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the data (folder and database) and print where it is",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)


class _Step:
    def __init__(self, number: int, title: str) -> None:
        self.started = time.monotonic()
        _say(f"[{number}] {title}")

    def done(self, message: str = "") -> None:
        elapsed = time.monotonic() - self.started
        _say(f"    {message + ' ' if message else ''}({elapsed:.1f}s)")


def _say(line: str) -> None:
    print(line.rstrip(), flush=True)


# --------------------------------------------------------------------------- images


def _digit_pngs() -> tuple[list[bytes], list[int]]:
    """scikit-learn's 1,797 bundled 8x8 digits as 28x28 grayscale PNGs, shuffled."""
    import numpy as np
    from PIL import Image
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


class _ImageHandler(BaseHTTPRequestHandler):
    server: _ImageServer

    def do_GET(self) -> None:
        body = self.server.images.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    images: dict[str, bytes]


@contextlib.contextmanager
def _image_server(images: dict[str, bytes]) -> Iterator[str]:
    server = _ImageServer(("127.0.0.1", 0), _ImageHandler)
    server.images = images
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def _modelgate(upstream: str, data_dir: Path) -> Iterator[str]:
    import pymongo
    import pymongo.errors

    from proxy.embedded import free_port

    port = free_port()
    log_path = data_dir / "modelgate.log"
    command = [
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream,
        "--data-dir",
        str(data_dir / "modelgate"),
        "--fetch-allow-private",  # the image server is on loopback
        "--sweep-interval",
        "0.5",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=log, cwd=Path(__file__).resolve().parent.parent
        )
    uri = f"mongodb://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"modelgate exited with status {process.returncode}")
            try:
                probe: pymongo.MongoClient[dict[str, Any]]
                with pymongo.MongoClient(uri, serverSelectionTimeoutMS=500) as probe:
                    probe.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    raise RuntimeError("modelgate did not answer within 60s") from None
                time.sleep(0.1)
        yield uri
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _cnn() -> Any:
    import torch
    from torch import nn

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


# --------------------------------------------------------------------------- the story


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("modelgate demo trains a model and needs torch: pip install 'modelgate[train]'")
        return 2
    size = SIZES[args.size]
    size = Size(
        args.users or size.users,
        size.unlabelled,
        args.new_users or size.new,
        args.epochs or size.epochs,
    )
    if size.users < 50 or size.new < 1:
        _say("--users must be at least 50 and --new-users at least 1")
        return 2
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="modelgate-demo-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            ok = _story(args, size, data_dir, stack)
    except Exception as exc:  # the demo reports any failure in one line, then its log
        _say(f"demo failed: {type(exc).__name__}: {exc}")
        log = data_dir / "modelgate.log"
        if log.exists():
            _say("modelgate log (last lines):")
            for line in log.read_text(errors="replace").splitlines()[-15:]:
                _say(f"    {line}")
        ok = False
    finally:
        if args.keep:
            _say(f"data kept in {data_dir}")
        elif temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    _say(f"total {time.monotonic() - started:.1f}s: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _story(args: argparse.Namespace, size: Size, data_dir: Path, stack: Any) -> bool:
    import pymongo

    from engine.fetch import FetchSettings
    from modelgate import admin
    from modelgate.train import ImageClassifierTrainer, wait_for_backfill
    from proxy.embedded import EmbeddedUpstream

    step = _Step(1, "upstream and modelgate")
    upstream = args.upstream
    if upstream is None:
        embedded = EmbeddedUpstream(data_dir / "db", log_path=data_dir / "upstream.log")
        embedded.start()
        stack.callback(embedded.stop)
        upstream = embedded.uri
    direct = stack.enter_context(pymongo.MongoClient(upstream))
    direct.drop_database(DATABASE)
    if not args.keep:
        stack.callback(direct.drop_database, DATABASE)
    uri = stack.enter_context(_modelgate(upstream, data_dir))
    client = stack.enter_context(pymongo.MongoClient(uri))
    step.done(f"{'embedded SecantusDB' if args.upstream is None else upstream}; modelgate {uri}")

    step = _Step(2, "image server with the digits (scikit-learn's bundled set, 28x28 PNGs)")
    pngs, truths = _digit_pngs()
    images: dict[str, bytes] = {}
    base = stack.enter_context(_image_server(images))
    # The last images are kept for the users who arrive after the model: never trained on.
    held_out = size.unlabelled + size.new
    pool = len(pngs) - held_out

    def user(number: int, index: int) -> dict[str, Any]:
        path = f"/digits/{index}.png"
        images[path] = pngs[index]
        return {"name": f"user-{number:04d}", "img": base + path}

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
    step.done(f"{len(images)} images at {base}/digits/")

    step = _Step(3, f"{size.users} users with a label, {size.unlabelled} without")
    users = client[DATABASE].users
    users.insert_many(labelled + unlabelled)
    step.done(f"{users.count_documents({})} documents in {DATABASE}.users")

    step = _Step(
        4, f"train a CNN on db.users.find({{label: {{$exists: 1}}}}), <= {size.epochs} epochs"
    )
    trainer = ImageClassifierTrainer(
        _cnn(),
        labels=LABELS,
        preprocess=PREPROCESS,
        client=client,
        query=users.find({"label": {"$exists": True}}),
        input_field="img",
        label_field="label",
        fetch=FetchSettings(allow_private=True),
        cache_dir=str(data_dir / "modelgate" / "image-cache"),  # modelgate's own cache
    )
    metrics = trainer.fit(epochs=size.epochs, lr=3e-3, progress=sys.stderr.isatty())
    accuracy = metrics["validationAccuracy"]
    by_epoch = " ".join(f"{e['val_accuracy']:.2f}" for e in trainer.history)
    training_seconds = metrics["seconds"] - metrics["loadSeconds"]
    _say(
        f"    read and preprocessed {metrics['documents']} documents in "
        f"{metrics['loadSeconds']:.1f}s; trained in {training_seconds:.1f}s"
    )
    _say(f"    validation accuracy by epoch: {by_epoch} (best: epoch {metrics['bestEpoch']})")
    step.done(
        f"{metrics['trainSize']} train / {metrics['validationSize']} validation documents, "
        f"{metrics['epochs']} epochs on {metrics['device']}; validation accuracy: {accuracy:.3f}"
    )

    step = _Step(5, "attach: deferred (backfill + watch) and inline")
    reply = trainer.predict("img", select={"label": {"$exists": False}}, name=DEFERRED_MODEL)
    stack.callback(_drop, admin, client, DEFERRED_MODEL)
    trainer.register(INLINE_MODEL, mode="inline", output="inline")
    stack.callback(_drop, admin, client, INLINE_MODEL)
    status = wait_for_backfill(client, DEFERRED_MODEL, timeout=args.timeout)
    backfilled = list(users.find({"label": {"$exists": False}}))
    right = sum(_label(doc, DEFERRED_MODEL) == str(truth_of[doc["name"]]) for doc in backfilled)
    done = status.get("deferred", {}).get("done", 0)
    step.done(
        f"'{DEFERRED_MODEL}' v{reply['version']} backfilled {done}/{size.unlabelled} users "
        f"({right} right); '{INLINE_MODEL}' predicts on insert"
    )

    step = _Step(6, f"{size.new} new users sign up (pymongo insert_one, as a web app would)")
    _say(f"    {'user':<10}  {'true':<4}  {'inline':<10}  {'deferred':<10}")
    predicted = correct = 0
    for document, truth in arriving:
        inserted = users.insert_one(dict(document)).inserted_id
        doc = users.find_one({"_id": inserted}) or {}
        deadline = time.monotonic() + args.timeout
        while _label(doc, DEFERRED_MODEL) is None and time.monotonic() < deadline:
            time.sleep(0.1)
            doc = users.find_one({"_id": inserted}) or {}
        inline = doc.get("inline") or {}
        deferred = (doc.get("_outputs") or {}).get(DEFERRED_MODEL) or {}
        if inline.get("label") is not None and deferred.get("label") is not None:
            predicted += 1
            correct += deferred["label"] == str(truth)
        _say(
            f"    {document['name']:<10}  {truth:<4}  {_shown(inline):<10}  {_shown(deferred):<10}"
            f"{'' if deferred.get('label') == str(truth) else '  (wrong)'}"
        )
    step.done(f"{predicted}/{size.new} predicted, {correct} right")

    _say(
        f"summary: validation accuracy {accuracy:.3f}; backfill {right}/{size.unlabelled} "
        f"right; new users {correct}/{size.new} right"
    )
    return predicted == size.new and done == size.unlabelled


def _label(doc: dict[str, Any], model: str) -> Any:
    return ((doc.get("_outputs") or {}).get(model) or {}).get("label")


def _shown(prediction: dict[str, Any]) -> str:
    if prediction.get("label") is None:
        return "-"
    return f"{prediction['label']} ({prediction['score']:.2f})"


def _drop(admin: Any, client: Any, name: str) -> None:
    with contextlib.suppress(Exception):  # cleanup: the model may not exist
        admin.drop_model(client, name)
