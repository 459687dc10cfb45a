"""Image cache and fetch throughput: `python -m bench.bench_cache [--quick] [--json PATH]`.

Measures, on this machine:

- LMDB cache lookups per second for hits, from one thread and from two threads;
- images per second fetched by `engine.fetch.Fetcher` from a local HTTP server
  (bench/support/image_server.py on 127.0.0.1) with a cold cache and with a warm cache,
  against reading the same files from local disk with the same concurrency.

No MongoDB and no proxy are involved: this is the engine's image path alone.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from bench.harness import add_common_arguments, finish, format_table, machine_info
from bench.support.image_server import make_png, serve_files_in_process
from bench.support.processes import BenchError
from engine.cache import EntryMeta, ImageCache
from engine.fetch import Fetcher, FetchSettings

__all__ = ["SUMMARY", "main"]

SUMMARY = "LMDB image cache lookups/s and image fetch throughput (cold, warm, local disk)"


def _lookup_rate(cache: ImageCache, urls: list[str], threads: int, seconds: float) -> float:
    """Cache hits per second over all threads."""
    counts = [0] * threads
    stop = threading.Event()

    def work(index: int) -> None:
        rng = random.Random(index)
        n = 0
        while not stop.is_set():
            for _ in range(100):
                if cache.get(rng.choice(urls)) is None:
                    raise RuntimeError("expected a hit")
            n += 100
        counts[index] = n

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


async def _run_all(
    items: Sequence[str], fetch: Callable[[str], Awaitable[bytes]], concurrency: int
) -> tuple[float, int]:
    """Fetch every item with `concurrency` tasks; returns (items/s, bytes)."""
    queue = list(items)
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            body = await fetch(queue.pop())
            total += len(body)

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return len(items) / (trio.current_time() - started), total


async def _fetch_benchmarks(
    urls: list[str], files: list[Path], cache_dir: Path, concurrency: int
) -> dict[str, dict[str, float]]:
    settings = FetchSettings(allow_private=True, per_host_concurrency=concurrency)
    results: dict[str, dict[str, float]] = {}
    with ImageCache(cache_dir, max_bytes=1 << 30) as cache:
        async with Fetcher(settings, cache) as fetcher:
            rate, size = await _run_all(urls, fetcher.fetch, concurrency)
            results["cold cache (HTTP)"] = {"images_per_s": rate, "bytes": size}
            stats = fetcher.stats()
            rate, size = await _run_all(urls, fetcher.fetch, concurrency)
            results["warm cache (LMDB)"] = {"images_per_s": rate, "bytes": size}
            if fetcher.stats()["fetches"] != stats["fetches"]:
                raise RuntimeError("the warm run reached the server")
            results["cold cache (HTTP)"]["latency_p50_ms"] = stats["latency_p50_ms"]
            results["cold cache (HTTP)"]["latency_p99_ms"] = stats["latency_p99_ms"]

    def read(path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    async def read_file(name: str) -> bytes:
        return await trio.to_thread.run_sync(read, Path(name))

    rate, size = await _run_all([str(p) for p in files], read_file, concurrency)
    results["local disk (files)"] = {"images_per_s": rate, "bytes": size}
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = [make_png(size=(args.side, args.side), noise=True, seed=i) for i in range(args.images)]
    results: dict[str, Any] = {
        "images": args.images,
        "mean_image_bytes": round(sum(map(len, bodies)) / len(bodies)),
        "concurrency": args.concurrency,
    }
    with tempfile.TemporaryDirectory(prefix="modelgate-bench-cache-") as tmp:
        root = Path(tmp)
        # Lookups: a cache filled with the images, hit at random.
        urls = [f"http://images.example/{i}.png" for i in range(args.images)]
        with ImageCache(root / "lookups", max_bytes=1 << 30) as cache:
            for url, body in zip(urls, bodies, strict=True):
                cache.put(url, body, EntryMeta(content_type="image/png"))
            results["lookups_per_s"] = {
                f"{n} thread{'s' if n > 1 else ''}": _lookup_rate(cache, urls, n, args.seconds)
                for n in (1, 2)
            }

        files = []
        for i, body in enumerate(bodies):
            path = root / "files" / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(body)
            files.append(path)
        # The server runs in its own process so that it does not share our GIL.
        server = serve_files_in_process(files)
        try:
            base = server.stdout.readline().strip() if server.stdout else ""
            if not base.startswith("http://127.0.0.1:"):
                raise BenchError(f"image server did not start: {base!r}")
            fetch_urls = [f"{base}/img/{i}.png" for i in range(args.images)]
            results["fetch"] = trio.run(
                _fetch_benchmarks, fetch_urls, files, root / "fetch", args.concurrency
            )
        finally:
            server.terminate()
            server.wait()
    return {"benchmark": "cache", "results": results, "machine": machine_info()}


def report(payload: dict[str, Any]) -> str:
    results = payload["results"]
    mean_size = results["mean_image_bytes"]
    lookups = format_table(
        ["LMDB cache hits", "lookups/s"],
        [[name, round(rate)] for name, rate in results["lookups_per_s"].items()],
    )
    fetches = format_table(
        ["fetch path", "images/s", "MB/s"],
        [
            [name, round(r["images_per_s"]), r["images_per_s"] * mean_size / 1e6]
            for name, r in results["fetch"].items()
        ],
    )
    return (
        f"{results['images']} images of {mean_size / 1000:.1f} kB, "
        f"concurrency {results['concurrency']}\n\n{lookups}\n\n{fetches}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cache", description=__doc__)
    parser.add_argument("--images", type=int, default=500, help="distinct images (500)")
    parser.add_argument("--side", type=int, default=96, help="image side in pixels (96)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent fetches")
    parser.add_argument("--seconds", type=float, default=2.0, help="per lookup measurement")
    add_common_arguments(parser, quick="100 images, 0.5 s per measurement", database=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.seconds = min(args.images, 100), min(args.seconds, 0.5)
    return finish("cache", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
