"""A real HTTP server on 127.0.0.1 for fetcher tests and benchmarks.

    with ImageServer() as server:
        url = server.add_png("cat", size=(32, 32))     # http://127.0.0.1:PORT/img/cat.png
        ...
        server.count("/img/cat.png")                   # requests that reached it

Routes: /img/<name>.png (registered PNGs, with ETag/Last-Modified and 304 on
If-None-Match), /404, /slow (answers after `slow_seconds`), /endless (streams until the
client goes away), /loop (redirects to itself), /redirect?to=URL, /notimage (text),
/500-then-ok (HTTP 500 twice per distinct query string, then a PNG).

stop() closes the listening socket and every open connection, so later requests get
"connection refused" rather than a kept-alive connection.

`serve_files_in_process(files)` runs one in a process of its own (for benchmarks, so that
serving does not take the measuring process's GIL), serving each file at
/img/<file stem>.png; `python -m bench.support.image_server FILE...` is that process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

__all__ = ["ImageServer", "make_png", "serve_files_in_process"]

_LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


def make_png(
    size: tuple[int, int] = (16, 16),
    color: tuple[int, int, int] = (200, 30, 30),
    noise: bool = False,
    seed: int = 0,
) -> bytes:
    """A PNG of one colour, or of random pixels (incompressible, for size tests)."""
    if noise:
        rng = random.Random(seed)
        image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, color)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real image hosts
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        path = parts.path
        owner._record(self.path, path)
        owner._active(+1)
        try:
            self._route(owner, path, parts.query)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        finally:
            owner._active(-1)

    def _route(self, owner: ImageServer, path: str, query: str) -> None:
        if path.startswith("/img/") and path.endswith(".png"):
            body = owner.images.get(path[len("/img/") : -len(".png")])
            if body is None:
                self._send(404, b"no such image")
                return
            etag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
            validators = {"ETag": etag, "Last-Modified": _LAST_MODIFIED}
            if self.headers.get("If-None-Match") == etag:
                owner._count_304()
                self.send_response(304)
                for name, value in validators.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(200, body, "image/png", validators)
        elif path == "/404":
            self._send(404, b"not found")
        elif path == "/slow":
            owner._stopping.wait(owner.slow_seconds)
            self._send(200, make_png(), "image/png")
        elif path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no length: the body ends when the connection does
            self.close_connection = True
            chunk = b"\x89PNG" * 16384
            while not owner._stopping.is_set():
                self.wfile.write(chunk)
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif path == "/redirect":
            target = parse_qs(query).get("to", ["/404"])[0]
            self._send(302, headers={"Location": target})
        elif path == "/notimage":
            self._send(200, b"this is not an image\n", "text/plain; charset=utf-8")
        elif path == "/500-then-ok":
            if owner._failures_left(query) > 0:
                self._send(500, b"try again")
            else:
                self._send(200, make_png(color=(0, 128, 0)), "image/png")
        else:
            self._send(404, b"no such route")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 drops SYNs under concurrent clients
    owner: ImageServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-request (timeouts, size caps) are expected here.
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class ImageServer:
    def __init__(self, slow_seconds: float = 5.0) -> None:
        self.slow_seconds = slow_seconds
        self.images: dict[str, bytes] = {}
        self.not_modified = 0
        self.active = 0
        self.max_active = 0  # the most requests in progress at once
        self._counts: Counter[str] = Counter()
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> ImageServer:
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.owner = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content and counters -------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add_png(self, name: str, **png_options: Any) -> str:
        """Register /img/<name>.png (see make_png for options); returns its URL."""
        self.images[name] = make_png(**png_options)
        return self.url(f"/img/{name}.png")

    def count(self, target: str) -> int:
        """Requests for a path (`/img/a.png`) or an exact target with a query."""
        with self._lock:
            return self._counts[target]

    @property
    def total_requests(self) -> int:
        with self._lock:
            return self._counts["*"]

    def _record(self, target: str, path: str) -> None:
        with self._lock:
            self._counts["*"] += 1
            self._counts[path] += 1
            if target != path:
                self._counts[target] += 1

    def _active(self, delta: int) -> None:
        with self._lock:
            self.active += delta
            self.max_active = max(self.max_active, self.active)

    def _count_304(self) -> None:
        with self._lock:
            self.not_modified += 1

    def _failures_left(self, key: str) -> int:
        with self._lock:
            left = self._failures.get(key, 2)
            self._failures[key] = left - 1
            return left

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def serve_files_in_process(files: list[Path]) -> subprocess.Popen[str]:
    """An ImageServer process serving `files`; its first line of output is the base URL.
    The caller ends it (terminate, then wait)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.support.image_server", *map(str, files)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )


def _serve_files(paths: list[str]) -> None:
    # Nagle's algorithm off: the handler writes headers and body separately, and Nagle +
    # the client's delayed ACK would add ~40 ms to every fetch, which no real host does.
    _Handler.disable_nagle_algorithm = True
    server = ImageServer().start()
    for path in map(Path, paths):
        server.images[path.stem] = path.read_bytes()
    print(server.base_url, flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _serve_files(sys.argv[1:])
