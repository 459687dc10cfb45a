"""The parts of `python -m bench search` that go through modelgate, and the ANN on real
text embeddings (see bench.search's docstring for what each part measures).

- `e2e`: `$vectorSearch` through a `modelgate serve` process (its own data directory)
  on --docs documents of --dim dimensions written straight to the upstream (the index
  is built from MongoDB); the same top-10 fetched straight from the upstream by _id as
  the baseline of what any query costs there.
- `autoembed`: texts inserted through modelgate, then an autoEmbed index created on
  them with a registered text model: the time until every document is embedded and
  indexed, against onnxruntime alone embedding the same texts in batches of the
  model's batch size (run before and after modelgate; the faster run counts).
- `text-recall`: the local index (engine.search.local_index, the one `$vectorSearch`
  uses) over real sentence embeddings made by onnxruntime and kept on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.search_text import OnnxEmbedder, cached_embeddings, load_text_model
from bench.support.processes import Stack, bench_stack, connect
from engine.stats import percentile
from proxy.vector_search_stage import search_pipeline

__all__ = ["autoembed_part", "e2e_part", "text_recall_part"]

DB_NAME = "bench_search"
INDEX = "vi"
#: The text model's batch (registerModel's batch.maxSize), and the baseline's.
TEXT_BATCH = 64
#: (M, efConstruction, numCandidates as a multiple of limit) rows of the text-recall part:
#: the defaults first.
GRAPH_ROWS = ((16, 128, 10), (16, 128, 20), (32, 256, 10))


def _latency(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "mean_ms": float(np.mean(samples)) * 1e3,
    }


@contextlib.contextmanager
def _stack(args: argparse.Namespace) -> Iterator[Stack]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-search-") as scratch,
        bench_stack(
            args.upstream,
            proxy_args=[
                "--data-dir",
                str(Path(scratch) / "data"),
                "--search-sweep-interval",
                "3600",
            ],
            log_path=Path(scratch) / "modelgate.log",
        ) as stack,
    ):
        direct = connect(stack.direct_uri)
        direct.drop_database(DB_NAME)
        try:
            yield stack
        finally:
            with contextlib.suppress(Exception):
                proxy = connect(stack.proxy_uri)
                for name in direct[DB_NAME].list_collection_names():
                    with contextlib.suppress(Exception):
                        proxy[DB_NAME].command({"dropSearchIndex": name, "name": INDEX})
                proxy.close()
            direct.drop_database(DB_NAME)
            direct.close()


def _listing(collection: Any) -> dict[str, Any]:
    found = list(collection.aggregate([{"$listSearchIndexes": {"name": INDEX}}]))
    return found[0] if found else {}


def _wait(check: Callable[[], bool], what: str, timeout: float, poll: float = 0.05) -> float:
    """Seconds until `check()` holds; RuntimeError after `timeout`."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"bench search: {what} did not happen within {timeout:.0f} s")
        time.sleep(poll)
    return time.perf_counter() - started


def _indexed(collection: Any, count: int) -> Callable[[], bool]:
    def check() -> bool:
        listing = _listing(collection)
        counts = listing.get("modelgate") or {}
        return listing.get("status") == "READY" and counts.get("indexed") == count

    return check


# --------------------------------------------------------------------------- e2e


def e2e_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.search import exact_top, make_vectors, recall

    k, candidates, dim = args.limit, 10 * args.limit, args.dim
    data, _ = make_vectors("clustered", args.docs, dim, seed=1, noise=args.noise)
    queries, _ = make_vectors("clustered", args.e2e_queries, dim, seed=2, noise=args.noise)
    truth = exact_top(data, queries, k)
    section: dict[str, Any] = {
        "docs": args.docs,
        "dim": dim,
        "queries": args.e2e_queries,
        "limit": k,
        "num_candidates": candidates,
    }
    with _stack(args) as stack:
        direct = connect(stack.direct_uri)[DB_NAME]["vectors"]
        proxy = connect(stack.proxy_uri)[DB_NAME]["vectors"]
        print(f"  e2e: inserting {args.docs:,} vectors ...", file=sys.stderr, flush=True)
        for start in range(0, args.docs, 1000):
            rows = data[start : start + 1000].tolist()
            direct.insert_many([{"_id": start + i, "v": v} for i, v in enumerate(rows)])
        field = {"type": "vector", "path": "v", "numDimensions": dim, "similarity": "cosine"}
        started = time.perf_counter()
        proxy.database.command(
            {
                "createSearchIndexes": "vectors",
                "indexes": [
                    {"name": INDEX, "type": "vectorSearch", "definition": {"fields": [field]}}
                ],
            }
        )
        _wait(_indexed(proxy, args.docs), "the index build", timeout=600)
        section["build_s"] = time.perf_counter() - started

        def pipeline(q: np.ndarray, exact: bool = False) -> list[dict[str, Any]]:
            stage: dict[str, Any] = {"index": INDEX, "path": "v", "queryVector": q.tolist()}
            stage.update({"limit": k} if exact else {"numCandidates": candidates, "limit": k})
            if exact:
                stage["exact"] = True
            return [
                {"$vectorSearch": stage},
                {"$project": {"score": {"$meta": "vectorSearchScore"}}},
            ]

        for q in queries[:20]:  # warm-up: connections, the graph's pages, the stage
            list(proxy.aggregate(pipeline(q)))
        latencies, found = [], []
        for q in queries:
            query = pipeline(q)
            t0 = time.perf_counter()
            result = list(proxy.aggregate(query))
            latencies.append(time.perf_counter() - t0)
            found.append([doc["_id"] for doc in result])
        section["proxy"] = {**_latency(latencies), "recall_at_k": recall(found, truth)}
        # The upstream running the pipeline modelgate sends it in place of the client's
        # (the ten by _id, ranked, scored, projected), the same ten by _id alone, and a
        # plain find of one document: the floor of any query.
        by_id, one, sent = [], [], []
        later = [{"$project": {"score": {"$meta": "vectorSearchScore"}}}]
        for ids in found:
            scores = [(doc_id, 1.0 - rank / 100) for rank, doc_id in enumerate(ids)]
            rewritten = search_pipeline(scores, later)
            t0 = time.perf_counter()
            list(direct.aggregate(rewritten))
            sent.append(time.perf_counter() - t0)
            match: list[dict[str, Any]] = [
                {"$match": {"_id": {"$in": ids}}},
                {"$project": {"_id": 1}},
            ]
            t0 = time.perf_counter()
            list(direct.aggregate(match))
            by_id.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            direct.find_one({"_id": ids[0]}, {"_id": 1})
            one.append(time.perf_counter() - t0)
        section["direct_sent_pipeline"] = _latency(sent)
        section["direct_match_in"] = _latency(by_id)
        section["direct_find_one"] = _latency(one)
        exact_latencies, exact_found = [], []
        for q in queries[: min(len(queries), 100)]:
            query = pipeline(q, exact=True)
            t0 = time.perf_counter()
            result = list(proxy.aggregate(query))
            exact_latencies.append(time.perf_counter() - t0)
            exact_found.append([doc["_id"] for doc in result])
        section["proxy_exact"] = {
            **_latency(exact_latencies),
            "recall_at_k": recall(exact_found, truth[: len(exact_found)]),
        }
    return section


# --------------------------------------------------------------------------- autoEmbed


def autoembed_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.support.text_models import sample_texts
    from modelgate.admin import register_model

    setup = load_text_model(args.text_model)
    texts = sample_texts(args.texts, seed=21)
    embedder = OnnxEmbedder(setup)
    embedder.embed(texts[:TEXT_BATCH])  # warm-up
    print(f"  autoembed: onnxruntime alone on {len(texts):,} texts ...", file=sys.stderr)
    reference, alone_s = embedder.embed_all(texts, TEXT_BATCH)
    section: dict[str, Any] = {
        "model": setup.name,
        "dim": setup.dim,
        "texts": len(texts),
        "batch": TEXT_BATCH,
    }
    with _stack(args) as stack:
        client = connect(stack.proxy_uri)
        register_model(
            client,
            "bench-text",
            collection=f"{DB_NAME}.unused",
            input="text",
            model=setup.onnx,
            mode="deferred",
            preprocess=setup.preprocess,
            postprocess=setup.postprocess,
            batch={"maxSize": TEXT_BATCH},
        )
        proxy = client[DB_NAME]["texts"]
        t0 = time.perf_counter()
        for start in range(0, len(texts), 1000):
            chunk = texts[start : start + 1000]
            proxy.insert_many([{"_id": start + i, "text": t} for i, t in enumerate(chunk)])
        section["insert_s"] = time.perf_counter() - t0
        direct = connect(stack.direct_uri)[DB_NAME]["texts"]
        vector_path = f"_autoEmbed.{INDEX}.vector"
        field = {"type": "autoEmbed", "modality": "text", "path": "text", "model": "bench-text"}
        print("  autoembed: index created, waiting ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        client[DB_NAME].command(
            {
                "createSearchIndexes": "texts",
                "indexes": [
                    {"name": INDEX, "type": "vectorSearch", "definition": {"fields": [field]}}
                ],
            }
        )
        embedded = _wait(
            lambda: direct.count_documents({vector_path: {"$exists": True}}) == len(texts),
            "embedding every text",
            timeout=3600,
            poll=0.1,
        )
        section["embedded_s"] = time.perf_counter() - started
        _wait(_indexed(proxy, len(texts)), "indexing every text", timeout=600)
        section["indexed_s"] = time.perf_counter() - started
        section["embedded_after_s"] = embedded
        section["proxy_per_s"] = len(texts) / section["indexed_s"]
        # What modelgate stored, against onnxruntime's vectors for the same texts.
        sample = list(direct.find({}, {vector_path: 1}).sort("_id", 1).limit(200))
        stored = np.array([doc["_autoEmbed"][INDEX]["vector"] for doc in sample], np.float32)
        ids = [doc["_id"] for doc in sample]
        section["max_abs_diff"] = float(np.abs(stored - reference[ids]).max())
        # A query by text through the index: the text itself comes first.
        stage = {"index": INDEX, "path": "text", "query": texts[7], "numCandidates": 100}
        result = list(proxy.aggregate([{"$vectorSearch": {**stage, "limit": 3}}]))
        section["query_by_text_top"] = result[0]["_id"] if result else None
    # onnxruntime alone again, after modelgate: the better of the two runs is the
    # baseline, so that a busy moment of a shared host does not flatter modelgate.
    print("  autoembed: onnxruntime alone again ...", file=sys.stderr)
    again_s = embedder.embed_all(texts, TEXT_BATCH)[1]
    section["onnxruntime_runs_s"] = [alone_s, again_s]
    section["onnxruntime_s"] = min(alone_s, again_s)
    section["onnxruntime_per_s"] = len(texts) / section["onnxruntime_s"]
    section["ratio"] = section["proxy_per_s"] / section["onnxruntime_per_s"]
    return section


# --------------------------------------------------------------------------- text recall


def text_recall_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.search import exact_top
    from bench.support.text_models import sample_texts
    from engine.search.local_index import LocalIndex, default_threads

    setup = load_text_model(args.text_model)
    k = args.limit
    data = cached_embeddings(
        setup, sample_texts(args.recall_texts, seed=11), f"d{args.recall_texts}-11"
    )
    queries = cached_embeddings(
        setup, sample_texts(args.recall_queries, seed=12), f"q{args.recall_queries}-12"
    )
    truth = exact_top(data, queries, k)
    # The k-th best exact score per query: sentences from a small vocabulary repeat, so
    # the k-th place is often shared; a result scoring as well as it is as right.
    kth = np.take_along_axis(queries @ data.T, truth[:, -1:], axis=1)[:, 0]
    section: dict[str, Any] = {
        "model": setup.name,
        "count": len(data),
        "dim": int(data.shape[1]),
        "queries": len(queries),
        "limit": k,
        "distinct_texts": len(set(sample_texts(args.recall_texts, seed=11))),
        "rows": [],
    }
    for connectivity, expansion, factor in GRAPH_ROWS:
        index = LocalIndex(
            data.shape[1],
            "cosine",
            threads=default_threads(),
            connectivity=connectivity,
            expansion_add=expansion,
        )
        t0 = time.perf_counter()
        index.upsert_many((i, data[i], {}) for i in range(len(data)))
        build_s = time.perf_counter() - t0
        latencies, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            result = index.search(q, limit=k, num_candidates=factor * k)
            latencies.append(time.perf_counter() - t0)
            found.append([doc_id for doc_id, _ in result])
        strict = sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
        tied = sum(
            int((data[f] @ q >= kth_score - 1e-5).sum()) if f else 0
            for f, q, kth_score in zip(found, queries, kth, strict=True)
        )
        section["rows"].append(
            {
                "connectivity": connectivity,
                "expansion_add": expansion,
                "num_candidates": factor * k,
                "recall_at_k": strict / truth.size,
                "recall_at_k_ties": tied / truth.size,
                "build_s": build_s,
                **_latency(latencies),
            }
        )
    return section
