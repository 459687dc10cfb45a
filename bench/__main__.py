"""`python -m bench COMMAND ...`: modelgate's benchmarks.

Each benchmark is a module with a `main(argv) -> int` (and a one-line `SUMMARY`),
registered in `BENCHMARKS` and imported only when it runs, so that one benchmark's
missing optional dependency does not break the others."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["BENCHMARKS", "main"]

#: name -> (module path, one-line summary). A module registered here must define
#: `main(argv: Sequence[str]) -> int`; `argv` is what follows the benchmark's name.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "wire": (
        "bench.wire",
        "driver-spec tasks direct vs through the proxy (MB/s, ratio), ping latency added",
    ),
    "inline": ("bench.inline", "inline-model inserts through modelgate vs plain onnxruntime"),
    "deferred": ("bench.deferred", "deferred predictions: catch-up rate vs onnxruntime, lag"),
    "images": ("bench.images", "inline model on image URLs: cold/warm cache vs local disk"),
    "cache": ("bench.bench_cache", "LMDB cache lookups/s; URL fetch cold vs warm vs local disk"),
    "connections": (
        "bench.connections",
        "ping latency with 500 idle and 20 slow-byte connections; proxy RSS per connection",
    ),
    "search": (
        "bench.search",
        "vector search: ANN recall@10, p50/p99, build, memory (100k x 384); $vectorSearch "
        "end to end (10k docs); autoEmbed ingest vs onnxruntime; recall on MiniLM embeddings",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in BENCHMARKS)
    lines = [
        "usage: python -m bench COMMAND [options]   (python -m bench COMMAND --help)",
        "",
        "Benchmarks of modelgate. Each starts an upstream (an embedded in-memory",
        "SecantusDB unless --upstream URI is given) and modelgate in front of it, runs",
        "the same work against both, and reports the proxy's cost. Common options:",
        "--quick (a short run), --json PATH (write all numbers and the machine's",
        "description), --plot PATH (draw the table as a PNG), --upstream URI (use a",
        "real MongoDB).",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
