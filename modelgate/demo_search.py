"""The client's side of `modelgate demo`'s second story: search by meaning.

Against modelgate at the URI `proxy.demo` hands over, as a user would from Python: export
all-MiniLM-L6-v2 (the `minilm` extra) to ONNX and register it with
`modelgate.register_text_model`, fill a `products` collection with the generated
catalogue of `modelgate.demo_texts`, create an autoEmbed vector search index on the
descriptions with pymongo's `create_search_index` (modelgate embeds every product in the
background), wait for it to be READY with `list_search_indexes`, then ask it shoppers'
questions with `$vectorSearch` and print what it finds with the scores."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Sequence
from typing import Any

import pymongo
from pymongo.operations import SearchIndexModel

from modelgate import admin
from modelgate.demo import DATABASE, Step, say
from modelgate.demo_texts import QUERIES, products
from modelgate.text import minilm_model_dir, register_text_model

__all__ = ["INDEX", "MODEL", "missing", "semantic_search", "tell_search_story"]

MODEL = "minilm"
INDEX = "semantic"
SCORE = {"$meta": "vectorSearchScore"}

#: What the export needs, and the extra that gives it.
_NEEDS = {"torch": "train", "transformers": "train", "all_minilm_l6_v2": "minilm"}


def missing() -> str | None:
    """What to install for this story, or None when everything is there (looked up
    without importing: the MiniLM package prints when imported)."""
    absent = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    extras = ",".join(sorted({_NEEDS[name] for name in absent}))
    return f"{', '.join(absent)} missing: pip install 'modelgate[{extras}]'"


def semantic_search(
    collection: Any,
    query: str,
    *,
    limit: int = 3,
    filter: dict[str, Any] | None = None,
    exact: bool = False,
) -> list[dict[str, Any]]:
    """The products that answer `query` best, with name, category, price and score."""
    stage: dict[str, Any] = {"index": INDEX, "path": "description", "query": query, "limit": limit}
    if exact:
        stage["exact"] = True
    else:
        stage["numCandidates"] = 20 * limit
    if filter is not None:
        stage["filter"] = filter
    pipeline = [
        {"$vectorSearch": stage},
        {"$project": {"_id": 0, "name": 1, "category": 1, "price": 1, "score": SCORE}},
    ]
    return list(collection.aggregate(pipeline))


def tell_search_story(uri: str, *, timeout: float, first_step: int = 7) -> bool:
    """The search story's steps, numbered from `first_step`. Whether the index became
    READY with every product and most questions found their category first."""
    with contextlib.ExitStack() as stack:
        client: pymongo.MongoClient[dict[str, Any]] = stack.enter_context(pymongo.MongoClient(uri))
        step = Step(first_step, "all-MiniLM-L6-v2 exported to ONNX and registered (minilm extra)")
        reply = register_text_model(
            client,
            MODEL,
            minilm_model_dir(),
            collection=f"{DATABASE}.reviews",
            input="text",
            output="embedding",
            mode="inline",
        )
        stack.callback(_drop_model, client, MODEL)
        described = admin.model_status(client, MODEL).get("metadata", {}).get("embedding", {})
        step.done(
            f"'{MODEL}' v{reply['version']}: {described.get('dimension', '?')} dimensions, "
            f"{described.get('pooling', '?')} pooling, normalized"
        )

        catalogue = products()
        step = Step(first_step + 1, f"{len(catalogue)} products and an autoEmbed index on them")
        collection = client[DATABASE].products
        collection.insert_many(catalogue)
        definition = {
            "fields": [
                {"type": "autoEmbed", "modality": "text", "path": "description", "model": MODEL},
                {"type": "filter", "path": "category"},
                {"type": "filter", "path": "price"},
            ]
        }
        collection.create_search_index(
            SearchIndexModel(definition, name=INDEX, type="vectorSearch")
        )
        stack.callback(_drop_index, collection)
        index = wait_until_ready(collection, INDEX, timeout)
        step.done(
            f"index '{INDEX}' {index.get('status')}: "
            f"{index.get('modelgate', {}).get('indexed', 0)} descriptions embedded and indexed"
        )

        step = Step(first_step + 2, "questions, by meaning ($vectorSearch with query text)")
        right = 0
        for question, category in QUERIES:
            found = semantic_search(collection, question)
            right += bool(found) and found[0]["category"] == category
            _show(question, found)
        step.done(f"{right}/{len(QUERIES)} found a product of the expected category first")

        step = Step(first_step + 3, "with a filter, exact: toys under 30")
        question = "a present for a small child"
        found = semantic_search(
            collection,
            question,
            filter={"category": "toys", "price": {"$lt": 30}},
            exact=True,
        )
        _show(question, found)
        filtered = all(doc["category"] == "toys" and doc["price"] < 30 for doc in found)
        step.done(f"{len(found)} products, all toys under 30: {filtered}")
        indexed = index.get("modelgate", {}).get("indexed") == len(catalogue)
        return indexed and right >= len(QUERIES) - 1 and filtered and bool(found)


def wait_until_ready(collection: Any, name: str, timeout: float) -> dict[str, Any]:
    """The index as list_search_indexes gives it once it is READY: for an autoEmbed
    index, once every product has been embedded and indexed, as with MongoDB's
    automated embedding (the last state seen when `timeout` passes first)."""
    deadline = time.monotonic() + timeout
    index: dict[str, Any] = {}
    while time.monotonic() < deadline:
        index = next(iter(collection.list_search_indexes(name)), {})
        if index.get("status") == "READY":
            break
        time.sleep(0.2)
    return index


def _show(question: str, found: Sequence[dict[str, Any]]) -> None:
    say(f'    "{question}"')
    for doc in found:
        say(
            f"      {doc['score']:.3f}  {doc['name']:<46} {doc['category']:<8} {doc['price']:>7.2f}"
        )


def _drop_index(collection: Any) -> None:
    with contextlib.suppress(Exception):  # cleanup: the index may not exist
        collection.drop_search_index(INDEX)


def _drop_model(client: pymongo.MongoClient[dict[str, Any]], name: str) -> None:
    with contextlib.suppress(Exception):  # cleanup: the model may not exist
        admin.drop_model(client, name)
