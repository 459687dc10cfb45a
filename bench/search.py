"""Vector search: `python -m bench search [--quick] [--json PATH] [--part ann ...]`.

Parts (each a function returning its section of the report; all run unless --part
names some):

- `ann`: the approximate-nearest-neighbour libraries alone, and modelgate's
  LocalIndex over the chosen one, at 100,000 vectors of 384 dimensions (--count,
  --dim): recall@10 against exact search (numpy) with the search breadth (HNSW's
  ef / usearch's expansion) tied to numCandidates = 10 x limit, single-query latency
  p50/p99 on one thread, build time on every CPU, memory (resident-set growth of a
  fresh process building the index), save and load time, and the cost of updating
  1% of the vectors. Each library runs in its own process (spawned) so that its
  memory is its own. The data: a mixture of Gaussians on the unit sphere (clusters,
  as embeddings are; queries drawn from the same mixture) and, with --data uniform,
  uniform random unit vectors (the hard case for graph indexes).

No MongoDB and no proxy are involved in the `ann` part.

- `e2e`: `$vectorSearch` end to end through a `modelgate serve` process at 10,000
  documents of 384 dimensions (--docs; the same clustered data), written straight to
  the upstream: the index's build time, p50/p99 and recall@10 (against numpy) of
  `[{$vectorSearch: {index, path, queryVector, numCandidates: 100, limit: 10}},
  {$project: {score: {$meta: "vectorSearchScore"}}}]` through modelgate, the same with
  `exact: true`, and for context the upstream alone fetching the same ten documents
  (`$match: {_id: {$in}}`) and one document (`find_one`).
- `autoembed`: --texts generated sentences (2,000) inserted through modelgate, then an
  autoEmbed index on them with all-MiniLM-L6-v2 (--text-model; exported once to ONNX and
  cached under ~/.cache/modelgate/bench-search): the time until every document is
  embedded and indexed, as a rate and as a ratio of onnxruntime alone embedding the
  same texts in batches of the registered batch size (64; run before and after
  modelgate, the faster run counts); the stored vectors are checked against
  onnxruntime's.
- `text-recall`: recall@10 and latency of the local index over REAL sentence
  embeddings: --recall-texts sentences (20,000) and --recall-queries other sentences
  (1,000) embedded once by onnxruntime with the text model (cached), at numCandidates
  = 10 x limit with the default graph and at two alternatives. Recall is given as
  found-in-the-exact-top-10 and counting ties with the 10th exact score as right (the
  generated sentences repeat).

--quick: 5,000 vectors for `ann`, 500 documents for `e2e`, 200 texts with the small
generated text encoder (not MiniLM) for `autoembed` and `text-recall`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import format_table, machine_info, write_json
from engine.stats import percentile

__all__ = ["ANN_LIBRARIES", "PARTS", "SUMMARY", "main"]

SUMMARY = (
    "vector search: ANN recall@10, p50/p99, build, memory (100k x 384); $vectorSearch end to "
    "end (10k docs); autoEmbed ingest vs onnxruntime; recall on MiniLM embeddings"
)

#: HNSW parameters shared by every library, so that they are compared on equal terms
#: (and the ones engine.search.local_index uses).
CONNECTIVITY = 16
EXPANSION_ADD = 128


# --------------------------------------------------------------------------- data


def make_vectors(
    kind: str, count: int, dim: int, seed: int, clusters: int = 256, noise: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """(`count` unit vectors, their mixture's centres) float32. "clustered": a point is
    its cluster's centre plus Gaussian noise of about `noise` times the centre's length,
    then normalized (at 0.7, cosine to its centre ~0.8, like neighbouring sentence
    embeddings); "uniform": normalized Gaussian noise."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        data = rng.standard_normal((count, dim), dtype=np.float32)
        centres = np.zeros((0, dim), np.float32)
    else:
        centre_rng = np.random.default_rng(12345)  # queries and data share the centres
        centres = centre_rng.standard_normal((clusters, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        spread = rng.standard_normal((count, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        data = centres[rng.integers(0, clusters, count)] + spread
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data.astype(np.float32), centres


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the `k` largest inner products per query (exact, numpy)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ data.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        out[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    hits = sum(
        len(set(map(int, row)) & set(map(int, true)))
        for row, true in zip(found, truth, strict=True)
    )
    return hits / truth.size


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- libraries
# Each adapter: build(data, threads) -> index; query(index, q, k, candidates) -> keys;
# save(index, path); load(path, dim, count) -> index; update(index, keys, vectors)
# (replace those vectors: remove + add, or None when the library cannot).


def _usearch() -> dict[str, Callable[..., Any]]:
    from usearch.index import Index

    def build(data: np.ndarray, threads: int) -> Any:
        index = Index(
            ndim=data.shape[1],
            metric="ip",
            dtype="f32",
            connectivity=CONNECTIVITY,
            expansion_add=EXPANSION_ADD,
        )
        index.add(np.arange(len(data), dtype=np.uint64), data, threads=threads)
        return index

    def query(index: Any, q: np.ndarray, k: int, candidates: int) -> Any:
        index.expansion_search = candidates
        return index.search(q, k, threads=1).keys

    def load(path: str, dim: int, count: int) -> Any:
        return Index.restore(path)

    def update(index: Any, keys: np.ndarray, vectors: np.ndarray) -> None:
        index.remove(keys)
        index.add(keys, vectors, threads=1)

    return {
        "build": build,
        "query": query,
        "save": lambda index, path: index.save(path),
        "load": load,
        "update": update,
    }


def _hnswlib() -> dict[str, Callable[..., Any]]:
    import hnswlib

    def build(data: np.ndarray, threads: int) -> Any:
        index = hnswlib.Index(space="ip", dim=data.shape[1])
        index.init_index(
            max_elements=len(data),
            ef_construction=EXPANSION_ADD,
            M=CONNECTIVITY,
            allow_replace_deleted=True,
        )
        index.add_items(data, np.arange(len(data)), num_threads=threads)
        return index

    def query(index: Any, q: np.ndarray, k: int, candidates: int) -> Any:
        index.set_ef(candidates)
        return index.knn_query(q, k=k, num_threads=1)[0][0]

    def load(path: str, dim: int, count: int) -> Any:
        index = hnswlib.Index(space="ip", dim=dim)
        index.load_index(path, max_elements=count, allow_replace_deleted=True)
        return index

    def update(index: Any, keys: np.ndarray, vectors: np.ndarray) -> None:
        index.add_items(vectors, keys, num_threads=1)  # an existing label is updated

    return {
        "build": build,
        "query": query,
        "save": lambda index, path: index.save_index(path),
        "load": load,
        "update": update,
    }


def _faiss() -> dict[str, Callable[..., Any]]:
    import faiss

    def build(data: np.ndarray, threads: int) -> Any:
        faiss.omp_set_num_threads(threads)
        index = faiss.IndexHNSWFlat(data.shape[1], CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EXPANSION_ADD
        index.add(data)
        faiss.omp_set_num_threads(1)
        return index

    def query(index: Any, q: np.ndarray, k: int, candidates: int) -> Any:
        index.hnsw.efSearch = candidates
        return index.search(q.reshape(1, -1), k)[1][0]

    return {
        "build": build,
        "query": query,
        "save": lambda index, path: faiss.write_index(index, path),
        "load": lambda path, dim, count: faiss.read_index(path),
        "update": None,  # HNSW in faiss has no remove_ids: a change means a rebuild
    }


def _local_index() -> dict[str, Callable[..., Any]]:
    """modelgate's own LocalIndex (engine.search.local_index) over the chosen library:
    what $vectorSearch pays beyond the library (its _id mapping, scores, checks)."""
    from engine.search.local_index import LocalIndex
    from engine.search.persist import load_index, save_index

    def build(data: np.ndarray, threads: int) -> Any:
        index = LocalIndex(dim=data.shape[1], similarity="dotProduct", threads=threads)
        index.upsert_many([(i, data[i], {}) for i in range(len(data))])
        return index

    def query(index: Any, q: np.ndarray, k: int, candidates: int) -> Any:
        return [key for key, _ in index.search(q, limit=k, num_candidates=candidates)]

    def load(path: str, dim: int, count: int) -> Any:
        return load_index(Path(path))[0]

    def update(index: Any, keys: np.ndarray, vectors: np.ndarray) -> None:
        index.upsert_many(
            [(int(key), vector, {}) for key, vector in zip(keys, vectors, strict=True)]
        )

    return {
        "build": build,
        "query": query,
        "save": lambda index, path: save_index(Path(path), index, {}),
        "load": load,
        "update": update,
    }


ANN_LIBRARIES: dict[str, Callable[[], dict[str, Callable[..., Any]]]] = {
    "usearch": _usearch,
    "faiss-hnsw": _faiss,
    "hnswlib": _hnswlib,
    "modelgate-LocalIndex": _local_index,
}


def _measure_library(
    name: str, data_path: str, queries_path: str, truth_path: str, k: int, candidates: int
) -> dict[str, Any]:
    """In a fresh process: build, query, save, load and update with one library."""
    lib = ANN_LIBRARIES[name]()
    data = np.load(data_path)
    queries = np.load(queries_path)
    truth = np.load(truth_path)
    threads = len(os.sched_getaffinity(0))
    base = _rss_bytes()
    started = time.perf_counter()
    index = lib["build"](data, threads)
    build_s = time.perf_counter() - started
    memory = _rss_bytes() - base
    found, latencies = [], []
    for q in queries[:20]:  # warm-up
        lib["query"](index, q, k, candidates)
    for q in queries:
        t0 = time.perf_counter()
        keys = lib["query"](index, q, k, candidates)
        latencies.append(time.perf_counter() - t0)
        found.append(keys)
    result: dict[str, Any] = {
        "recall_at_k": recall(found, truth),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "build_s": build_s,
        "memory_mb": memory / 1e6,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "index")
        t0 = time.perf_counter()
        lib["save"](index, path)
        result["save_s"] = time.perf_counter() - t0
        files = Path(tmp).rglob("*")
        result["file_mb"] = sum(p.stat().st_size for p in files if p.is_file()) / 1e6
        t0 = time.perf_counter()
        loaded = lib["load"](path, data.shape[1], len(data))
        result["load_s"] = time.perf_counter() - t0
        again = [lib["query"](loaded, q, k, candidates) for q in queries[:50]]
        result["recall_after_load"] = recall(again, truth[:50])
    if lib["update"] is None:
        result["update_1pct_s"] = None
    else:
        # Replace 1% of the vectors with other points of the same mixture, then check
        # recall against the changed data.
        rng = np.random.default_rng(7)
        keys = rng.choice(len(data), size=max(1, len(data) // 100), replace=False)
        fresh = data[rng.choice(len(data), size=len(keys))] * 0.5 + data[keys] * 0.5
        fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
        t0 = time.perf_counter()
        lib["update"](index, keys.astype(np.uint64 if name == "usearch" else np.int64), fresh)
        result["update_1pct_s"] = time.perf_counter() - t0
        changed = data.copy()
        changed[keys] = fresh
        new_truth = exact_top(changed, queries[:200], k)
        again = [lib["query"](index, q, k, candidates) for q in queries[:200]]
        result["recall_after_update"] = recall(again, new_truth)
    return result


def ann_part(args: argparse.Namespace) -> dict[str, Any]:
    k, candidates = args.limit, 10 * args.limit
    section: dict[str, Any] = {
        "count": args.count,
        "dim": args.dim,
        "queries": args.queries,
        "limit": k,
        "num_candidates": candidates,
        "noise": args.noise,
        "connectivity": CONNECTIVITY,
        "expansion_add": EXPANSION_ADD,
        "results": {},
    }
    context = multiprocessing.get_context("spawn")
    for kind in args.data:
        data, _ = make_vectors(kind, args.count, args.dim, seed=1, noise=args.noise)
        queries, _ = make_vectors(kind, args.queries, args.dim, seed=2, noise=args.noise)
        t0 = time.perf_counter()
        truth = exact_top(data, queries, k)
        exact_ms = (time.perf_counter() - t0) / len(queries) * 1e3
        rows: dict[str, Any] = {"numpy-exact": {"recall_at_k": 1.0, "mean_ms": exact_ms}}
        with tempfile.TemporaryDirectory() as tmp:
            paths = [str(Path(tmp) / f"{n}.npy") for n in ("data", "queries", "truth")]
            for path, array in zip(paths, (data, queries, truth), strict=True):
                np.save(path, array)
            for name in args.libraries:
                print(f"  {kind}: {name} ...", file=sys.stderr, flush=True)
                with context.Pool(1) as pool:
                    try:
                        rows[name] = pool.apply(_measure_library, (name, *paths, k, candidates))
                    except ImportError as exc:  # usearch and faiss are not dependencies
                        print(f"  {name} skipped: {exc}", file=sys.stderr)
        section["results"][kind] = rows
    return section


def e2e_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.search_e2e import e2e_part as part

    return part(args)


def autoembed_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.search_e2e import autoembed_part as part

    return part(args)


def text_recall_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.search_e2e import text_recall_part as part

    return part(args)


#: part name -> function(args) -> its section of the report.
PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "ann": ann_part,
    "e2e": e2e_part,
    "autoembed": autoembed_part,
    "text-recall": text_recall_part,
}


def _ann_table(section: dict[str, Any]) -> str:
    headers = [
        "data", "index", "recall@10", "p50 ms", "p99 ms", "build s", "MB",
        "save s", "load s", "update 1% s",
    ]  # fmt: skip
    rows = []
    for kind, results in section["results"].items():
        for name, r in results.items():
            rows.append([
                kind, name, r["recall_at_k"], r.get("p50_ms", r.get("mean_ms")), r.get("p99_ms"),
                r.get("build_s"), r.get("memory_mb"), r.get("save_s"), r.get("load_s"),
                r.get("update_1pct_s"),
            ])  # fmt: skip
    title = (
        f"ANN alone: {section['count']:,} x {section['dim']}, limit {section['limit']}, "
        f"numCandidates {section['num_candidates']}, {section['queries']} queries, "
        f"HNSW M={section['connectivity']} efConstruction={section['expansion_add']}"
    )
    fmt = [".0f", ".0f", ".3f", ".3f", ".3f", ".1f", ".0f", ".2f", ".2f", ".2f"]
    return title + "\n" + format_table(headers, rows, floatfmt=fmt)


def report(payload: dict[str, Any]) -> str:
    from bench.search_report import autoembed_table, e2e_table, text_recall_table

    tables = {
        "ann": _ann_table,
        "e2e": e2e_table,
        "autoembed": autoembed_table,
        "text-recall": text_recall_table,
    }
    return "\n\n".join(tables[part](section) for part, section in payload["results"].items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench search", description=__doc__)
    parser.add_argument("--part", action="append", choices=list(PARTS), help="(all)")
    parser.add_argument("--count", type=int, default=100_000, help="vectors (100,000)")
    parser.add_argument("--dim", type=int, default=384, help="dimensions (384)")
    parser.add_argument("--queries", type=int, default=1000, help="queries (1,000)")
    parser.add_argument("--limit", type=int, default=10, help="k of recall@k (10)")
    parser.add_argument(
        "--data", action="append", choices=["clustered", "uniform"], help="(clustered)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.7, help="clustered: spread around the centres (0.7)"
    )
    parser.add_argument(
        "--library", dest="libraries", action="append", choices=list(ANN_LIBRARIES),
        help="(all)",
    )  # fmt: skip
    parser.add_argument("--docs", type=int, default=10_000, help="e2e: documents (10,000)")
    parser.add_argument("--e2e-queries", type=int, default=500, help="e2e: queries (500)")
    parser.add_argument("--texts", type=int, default=2000, help="autoembed: texts (2,000)")
    parser.add_argument(
        "--text-model", choices=["minilm", "small"], help="(minilm; small with --quick)"
    )
    parser.add_argument(
        "--recall-texts", type=int, default=20_000, help="text-recall: sentences (20,000)"
    )
    parser.add_argument(
        "--recall-queries", type=int, default=1000, help="text-recall: queries (1,000)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run of every part")
    parser.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH")
    parser.add_argument(
        "--upstream", metavar="URI", help="MongoDB for e2e and autoembed (embedded SecantusDB)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.queries = min(args.count, 5000), min(args.queries, 200)
        args.docs, args.e2e_queries = min(args.docs, 500), min(args.e2e_queries, 50)
        args.texts = min(args.texts, 200)
        args.recall_texts = min(args.recall_texts, 2000)
        args.recall_queries = min(args.recall_queries, 100)
    args.text_model = args.text_model or ("small" if args.quick else "minilm")
    args.data = args.data or ["clustered"]
    args.libraries = args.libraries or list(ANN_LIBRARIES)
    payload: dict[str, Any] = {"benchmark": "search", "machine": machine_info(), "results": {}}
    for part in args.part or list(PARTS):
        payload["results"][part] = PARTS[part](args)
    print(report(payload))
    if args.json:
        print(f"\nwrote {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
