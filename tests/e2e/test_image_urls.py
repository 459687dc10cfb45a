"""Image URLs end to end: documents whose image field is a URL, written with pymongo
through real `modelgate serve` processes, fetched from a real local HTTP server
(tests/engine/image_server.py), cached in LMDB, and predicted by an ONNX classifier.

Every scenario has its own proxy (its own --data-dir and --cache-dir under tmp_path).
All traffic goes to 127.0.0.0/8."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bson
import pymongo
import pymongo.errors
import pytest

from bench.support.image_server import ImageServer, make_png
from bench.support.onnx_models import image_classifier
from bench.support.processes import ProxyProcess

LABELS = ["black", "white"]
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
# Fast enough for tests; the registry refresh lets a second proxy see new models soon.
BASE_ARGS = ("--registry-refresh", "0.5", "--log-level", "INFO")

Client = pymongo.MongoClient  # type: ignore[type-arg]


# ------------------------------------------------------------------------ helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid grayscale PNG of width x height black pixels, about 1 MB on disk.

    Built without ever holding the pixels: after the first block of rows the deflate
    window holds only zeros, so the compressed bytes of every further block are the same
    and are repeated; the zlib trailer (Adler-32 of all the rows) is computed by hand."""
    rows_per_block = 100
    assert height % rows_per_block == 0
    block = (b"\x00" * (width + 1)) * rows_per_block  # filter byte + pixels, per row
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)
    checksum = 1
    for _ in range(height // rows_per_block):
        checksum = zlib.adler32(block, checksum)
    stream = (
        first
        + again * (height // rows_per_block - 1)
        + b"\x03\x00"  # an empty final block (fixed Huffman codes)
        + struct.pack(">I", checksum)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, mode L
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", stream)
        + _chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    data = make_png(size=(64, 64), noise=True, seed=7)
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png()
    assert len(data) < 2_000_000
    return data


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(slow_seconds=5.0) as image_server:
        image_server.add_png("white", size=(28, 28), color=WHITE)
        image_server.add_png("black", size=(28, 28), color=BLACK)
        yield image_server


@pytest.fixture
def start_proxy(upstream_uri: str, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """start_proxy(name, *args, cache_dir=None, allow_private=True) -> a started proxy with
    its own --data-dir (tmp_path/name) and --cache-dir (tmp_path/name-cache unless given)."""
    started: list[ProxyProcess] = []

    def start(
        name: str = "proxy",
        *args: str,
        cache_dir: Path | None = None,
        allow_private: bool = True,
    ) -> ProxyProcess:
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        cache = cache_dir or tmp_path / f"{name}-cache"
        flags = ["--data-dir", str(data_dir), "--cache-dir", str(cache), *BASE_ARGS]
        if allow_private:
            flags.append("--fetch-allow-private")
        process = ProxyProcess(upstream_uri, tmp_path / f"{name}.log", args=(*flags, *args))
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def register(
    client: Client, name: str, namespace: str, *, mode: str = "inline", on_error: str = "record"
) -> None:
    client.admin.command(
        {
            "registerModel": name,
            "collection": namespace,
            "input": "img",
            "mode": mode,
            "onError": on_error,
            "onnx": bson.Binary(image_classifier(channels=1, size=(28, 28))),
            "preprocess": {"kind": "image", "size": [28, 28], "mode": "L"},
            "postprocess": {"kind": "classify", "labels": LABELS},
        }
    )


def outputs(direct: Client, db_name: str, model: str, collection: str = "c") -> dict[str, Any]:
    """{document 'k' -> its _outputs.<model>} read straight from the upstream."""
    return {
        doc["k"]: doc.get("_outputs", {}).get(model)
        for doc in direct[db_name][collection].find({}, {"k": 1, "_outputs": 1})
    }


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def cache_status(client: Client) -> dict[str, Any]:
    return client.admin.command("cacheStatus")


# ------------------------------------------------------------------------ tests


def test_classify_urls_cached_and_survives_restart(
    start_proxy, server: ImageServer, direct: Client, db_name: str
) -> None:
    white, black = server.url("/img/white.png"), server.url("/img/black.png")
    namespace = f"{db_name}.c"
    proxy = start_proxy("a")
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "urls", namespace)
        client[db_name].c.insert_many([{"k": "w1", "img": white}, {"k": "b1", "img": black}])
        client[db_name].c.insert_one({"k": "w2", "img": white})
        status = cache_status(client)
    got = outputs(direct, db_name, "urls")
    assert got["w1"]["label"] == "white" and got["w2"]["label"] == "white"
    assert got["b1"]["label"] == "black"
    assert server.count("/img/white.png") == 1  # the second insert was a cache hit
    assert server.count("/img/black.png") == 1
    assert status["fetch"]["hits"] >= 1 and status["cache"]["entries"] == 2

    # Restart on the same --cache-dir: still no second request.
    proxy.stop()
    proxy = start_proxy("a")  # the same --data-dir and --cache-dir
    with pymongo.MongoClient(proxy.uri) as client:
        wait_until(lambda: _serving(client, "urls"))
        client[db_name].c.insert_one({"k": "w3", "img": white})
        status = cache_status(client)
    assert outputs(direct, db_name, "urls")["w3"]["label"] == "white"
    assert server.count("/img/white.png") == 1
    assert status["fetch"]["hits"] == 1 and status["fetch"]["fetches"] == 0


def _serving(client: Client, name: str) -> bool:
    try:
        client.admin.command({"modelStatus": name})
    except pymongo.errors.OperationFailure:
        return False
    return True


def test_server_gone_cached_urls_still_work(
    start_proxy, server: ImageServer, direct: Client, db_name: str
) -> None:
    white = server.url("/img/white.png")
    never = server.add_png("never", size=(28, 28), color=WHITE)
    proxy = start_proxy()
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "rec", f"{db_name}.c")
        register(client, "rej", f"{db_name}.r", on_error="reject")
        client[db_name].c.insert_one({"k": "warm", "img": white})
        server.stop()

        client[db_name].c.insert_many([{"k": "cached", "img": white}, {"k": "gone", "img": never}])
        got = outputs(direct, db_name, "rec")
        assert got["cached"]["label"] == "white"
        error = got["gone"]["error"]
        assert never in error and "connection refused" in error, error

        with pytest.raises(pymongo.errors.BulkWriteError) as failure:
            client[db_name].r.insert_many(
                [{"k": "ok", "img": white}, {"k": "bad", "img": never}], ordered=False
            )
        [write_error] = failure.value.details["writeErrors"]
        assert write_error["index"] == 1
        assert never in write_error["errmsg"], write_error
        with pytest.raises(pymongo.errors.WriteError) as single:
            client[db_name].r.insert_one({"k": "bad2", "img": never})
        assert never in str(single.value)
        assert client.admin.command("ping")["ok"] == 1.0
    stored = outputs(direct, db_name, "rej", "r")
    assert set(stored) == {"ok"} and stored["ok"]["label"] == "white"


def test_each_failure_has_its_own_error(
    start_proxy, server: ImageServer, direct: Client, db_name: str, bomb: bytes
) -> None:
    server.images["bomb"] = bomb
    server.images["truncated"] = truncated_png()
    white = server.url("/img/white.png")
    denied = f"http://127.0.0.2:{server.port}/img/white.png"
    cases = {
        "404": (server.url("/404"), "HTTP 404"),
        "slow": (server.url("/slow"), "timed out"),
        "endless": (server.url("/endless"), "larger than"),
        "loop": (server.url("/loop"), "redirect"),
        "denied": (denied, "blocked"),
        "redirect-denied": (server.url(f"/redirect?to={denied}"), "blocked"),
        "notimage": (server.url("/notimage"), "not an image"),
        "bomb": (server.url("/img/bomb.png"), "too large"),
        "truncated": (server.url("/img/truncated.png"), "truncated"),
    }
    proxy = start_proxy(
        "p",
        "--fetch-timeout", "1.5",
        "--fetch-read-timeout", "0.5",
        "--fetch-max-bytes", "1000000",
        "--fetch-deny-hosts", "127.0.0.2",
    )  # fmt: skip
    docs = [{"k": "w0", "img": white}]
    docs += [{"k": key, "img": url} for key, (url, _) in cases.items()]
    docs += [{"k": "w1", "img": white}]
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "fail", f"{db_name}.c")
        started = time.monotonic()
        client[db_name].c.insert_many(docs)
        assert time.monotonic() - started < 20
        assert client.admin.command("ping")["ok"] == 1.0
        status = client.admin.command({"modelStatus": "fail"})
    got = outputs(direct, db_name, "fail")
    assert got["w0"]["label"] == "white" and got["w1"]["label"] == "white"
    errors = {key: got[key]["error"] for key in cases}
    for key, (url, words) in cases.items():
        assert words in errors[key], (key, errors[key])
        assert url in errors[key] or key == "redirect-denied", (key, errors[key])
    assert "127.0.0.2" in errors["redirect-denied"]
    # The errors are distinct: each names its own cause.
    assert len(set(errors.values())) == len(errors)
    assert status["errors"] == len(cases) and status["images"]["fetch"]["errors"] >= 6


def test_loopback_refused_without_allow_private(
    start_proxy, server: ImageServer, direct: Client, db_name: str
) -> None:
    proxy = start_proxy("strict", allow_private=False)
    white = server.url("/img/white.png")
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "strict", f"{db_name}.c")
        client[db_name].c.insert_one({"k": "w", "img": white})
        assert client.admin.command("ping")["ok"] == 1.0
    error = outputs(direct, db_name, "strict")["w"]["error"]
    assert white in error and "blocked" in error and "private" in error, error
    assert server.total_requests == 0


def test_metadata_address_refused_at_resolution(start_proxy, direct: Client, db_name: str) -> None:
    # Even with private addresses allowed, and without any connection attempt: an
    # attempt would take the connect timeout (nothing answers there).
    proxy = start_proxy("meta", "--fetch-connect-timeout", "5", "--fetch-allow-hosts",
                        "169.254.0.0/16")  # fmt: skip
    url = "http://169.254.169.254/latest/meta-data"
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "meta", f"{db_name}.c")
        started = time.monotonic()
        client[db_name].c.insert_one({"k": "m", "img": url})
        elapsed = time.monotonic() - started
    error = outputs(direct, db_name, "meta")["m"]["error"]
    assert url in error and "metadata" in error, error
    assert elapsed < 2.0


def test_concurrent_inserts_of_one_url_fetch_once(
    start_proxy, server: ImageServer, direct: Client, db_name: str
) -> None:
    url = server.add_png("shared", size=(28, 28), color=WHITE)
    proxy = start_proxy()
    count = 100
    with pymongo.MongoClient(proxy.uri, maxPoolSize=count) as client:
        register(client, "many", f"{db_name}.c")
        client.admin.command("ping")
        barrier = threading.Barrier(count)

        def insert(i: int) -> None:
            barrier.wait(timeout=30)
            client[db_name].c.insert_one({"k": i, "img": url})

        with ThreadPoolExecutor(count) as pool:
            list(pool.map(insert, range(count)))
        fetch = cache_status(client)["fetch"]
    got = outputs(direct, db_name, "many")
    assert len(got) == count
    assert all(record["label"] == "white" for record in got.values())
    assert server.count("/img/shared.png") == 1
    assert fetch["fetches"] == 1
    assert fetch["hits"] + fetch["shared"] + 1 >= count


def test_eviction_keeps_the_cache_bounded(
    start_proxy, server: ImageServer, direct: Client, db_name: str
) -> None:
    bound = 20_000
    urls = [
        server.add_png(f"n{i}", size=(28, 28), noise=True, seed=i) for i in range(30)
    ]  # ~2.4 KB each: 30 of them are several times the bound
    proxy = start_proxy("small", "--cache-size", str(bound))
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "evict", f"{db_name}.c")
        for start in range(0, len(urls), 10):
            client[db_name].c.insert_many(
                [{"k": i, "img": urls[i]} for i in range(start, start + 10)]
            )
        cache = cache_status(client)["cache"]
    assert 0 < cache["bytes"] <= bound, cache
    assert cache["evictions"] > 0 and cache["max_bytes"] == bound
    assert cache["entries"] < len(urls)
    got = outputs(direct, db_name, "evict")
    assert all("label" in record for record in got.values()), got


def test_two_proxies_share_one_cache_dir(
    start_proxy, server: ImageServer, direct: Client, db_name: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-cache"
    white = server.url("/img/white.png")
    proxy_a = start_proxy("a", cache_dir=shared)
    proxy_b = start_proxy("b", cache_dir=shared)
    with pymongo.MongoClient(proxy_a.uri) as a, pymongo.MongoClient(proxy_b.uri) as b:
        register(a, "share", f"{db_name}.c")
        a[db_name].c.insert_one({"k": "a", "img": white})
        wait_until(lambda: _serving(b, "share"))
        b[db_name].c.insert_one({"k": "b", "img": white})
        b_fetch = cache_status(b)["fetch"]
    got = outputs(direct, db_name, "share")
    assert got["a"]["label"] == "white" and got["b"]["label"] == "white"
    assert server.count("/img/white.png") == 1
    assert b_fetch["hits"] == 1 and b_fetch["fetches"] == 0


def test_cache_and_model_status_report_counters(
    start_proxy, server: ImageServer, db_name: str
) -> None:
    white, black = server.url("/img/white.png"), server.url("/img/black.png")
    proxy = start_proxy("stats", "--cache-size", "1000000")
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "st", f"{db_name}.c")
        client[db_name].c.insert_many([{"k": 1, "img": white}, {"k": 2, "img": black}])
        client[db_name].c.insert_many([{"k": 3, "img": white}, {"k": 4, "img": black}])
        status = cache_status(client)
        model = client.admin.command({"modelStatus": "st"})
    fetch, cache = status["fetch"], status["cache"]
    assert fetch["misses"] == 2 and fetch["hits"] == 2 and fetch["fetches"] == 2
    assert fetch["errors"] == 0 and fetch["bytes_fetched"] == cache["bytes"] > 0
    assert fetch["latency_p99_ms"] >= fetch["latency_p50_ms"] > 0
    assert cache["entries"] == 2 and cache["evictions"] == 0
    assert cache["hits"] == 2 and cache["misses"] == 2 and cache["max_bytes"] == 1_000_000
    assert model["images"]["cache"]["bytes"] == cache["bytes"]
    assert model["images"]["fetch"]["hits"] == 2
    assert model["predicted"] == 4


def test_deferred_model_on_urls(
    start_proxy, server: ImageServer, direct: Client, db_name: str
) -> None:
    white, black = server.url("/img/white.png"), server.url("/img/black.png")
    proxy = start_proxy("deferred", "--sweep-interval", "0.5")
    with pymongo.MongoClient(proxy.uri) as client:
        register(client, "later", f"{db_name}.c", mode="deferred")
        client[db_name].c.insert_many(
            [
                {"k": "w", "img": white},
                {"k": "b", "img": black},
                {"k": "x", "img": server.url("/404")},
            ]
        )

        def done() -> dict[str, Any] | None:
            got = outputs(direct, db_name, "later")
            return got if all(got.values()) and len(got) == 3 else None

        got = wait_until(done, timeout=30, step=0.25)
    assert got["w"]["label"] == "white" and got["b"]["label"] == "black"
    assert "HTTP 404" in got["x"]["error"]
    assert server.count("/img/white.png") == 1
