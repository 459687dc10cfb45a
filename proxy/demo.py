"""`modelgate demo`: the whole story on one machine, with nothing to set up by hand.

This module starts what a user would run: an upstream (the embedded SecantusDB, or
`--upstream URI`), modelgate in front of it, and a local image server. The stories
themselves, what a user does from Python against those, are the client's:
`modelgate.demo.tell_story` (images: fill a collection, train from a query, attach,
insert and read predictions) and `modelgate.demo_search.tell_search_story` (text:
register MiniLM, an autoEmbed vector search index on a product catalogue, questions
asked with `$vectorSearch`). `--story` picks one; both by default."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from modelgate.demo import DATABASE, SIZES, Size, Step, say, tell_story

__all__ = ["STORIES", "add_arguments", "run"]

STORIES = ("all", "images", "search")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="small: 800 users, 40 to backfill, 5 new (for CI); full: 1,200 users, "
        "200 to backfill, 10 new; 10 epochs at most "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--story",
        choices=STORIES,
        default="all",
        help="images: classify users' digit images; search: search products by meaning "
        "with MiniLM (needs the train and minilm extras); all: both (default %(default)s)",
    )
    parser.add_argument("--users", type=int, metavar="N", help="labelled users to train on")
    parser.add_argument("--new-users", type=int, metavar="N", help="users inserted at the end")
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs (at most)")
    parser.add_argument(
        "--upstream",
        metavar="URI",
        help=f"use this MongoDB (database '{DATABASE}', dropped afterwards) instead of "
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


# --------------------------------------------------------------------------- images


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
    """Serve `images` (path to PNG bytes, filled later by the story) on loopback."""
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


# --------------------------------------------------------------------------- the demo


def run(args: argparse.Namespace) -> int:
    from modelgate.demo_search import missing

    try:
        import torch  # noqa: F401
    except ImportError:
        say("modelgate demo trains a model and needs torch: pip install 'modelgate[train]'")
        return 2
    search_needs = missing()
    if search_needs is not None:
        if args.story == "search":
            say(f"the search story exports all-MiniLM-L6-v2: {search_needs}")
            return 2
        if args.story == "all":
            say(f"the search story is skipped: {search_needs}")
            args.story = "images"
    size = SIZES[args.size]
    size = Size(
        args.users or size.users,
        size.unlabelled,
        args.new_users or size.new,
        args.epochs or size.epochs,
    )
    if size.users < 50 or size.new < 1:
        say("--users must be at least 50 and --new-users at least 1")
        return 2
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="modelgate-demo-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            ok = _run_processes_and_story(args, size, data_dir, stack)
    except Exception as exc:  # the demo reports any failure in one line, then its log
        say(f"demo failed: {type(exc).__name__}: {exc}")
        log = data_dir / "modelgate.log"
        if log.exists():
            say("modelgate log (last lines):")
            for line in log.read_text(errors="replace").splitlines()[-15:]:
                say(f"    {line}")
        ok = False
    finally:
        if args.keep:
            say(f"data kept in {data_dir}")
        elif temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    say(f"total {time.monotonic() - started:.1f}s: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _run_processes_and_story(
    args: argparse.Namespace, size: Size, data_dir: Path, stack: contextlib.ExitStack
) -> bool:
    """Step 1 (the upstream, modelgate and the image server), then the client's story."""
    import pymongo

    from proxy.embedded import EmbeddedUpstream

    step = Step(1, "upstream, modelgate and an image server")
    upstream = args.upstream
    if upstream is None:
        embedded = EmbeddedUpstream(data_dir / "db", log_path=data_dir / "upstream.log")
        embedded.start()
        stack.callback(embedded.stop)
        upstream = embedded.uri
    direct: pymongo.MongoClient[dict[str, Any]] = stack.enter_context(pymongo.MongoClient(upstream))
    direct.drop_database(DATABASE)
    if not args.keep:
        stack.callback(direct.drop_database, DATABASE)
    uri = stack.enter_context(_modelgate(upstream, data_dir))
    images: dict[str, bytes] = {}
    image_base = stack.enter_context(_image_server(images))
    where = "embedded SecantusDB" if args.upstream is None else upstream
    step.done(f"{where}; modelgate {uri}; images at {image_base}")
    ok = True
    if args.story in ("all", "images"):
        ok = tell_story(
            uri,
            images=images,
            image_base=image_base,
            size=size,
            cache_dir=str(data_dir / "modelgate" / "image-cache"),  # modelgate's own cache
            timeout=args.timeout,
        )
    if args.story in ("all", "search"):
        from modelgate.demo_search import tell_search_story

        first_step = 7 if args.story == "all" else 2
        ok = tell_search_story(uri, timeout=args.timeout, first_step=first_step) and ok
    return ok
