"""Reading a labelled query into arrays: the one bridge from the synchronous training API
to modelgate's trio-based image fetching.

`load_dataset` is synchronous and runs its own `trio.run`, so call it from ordinary code
(a script, a notebook cell), never from inside a running trio loop. Inside it, the cursor
is read in chunks in a worker thread (pymongo blocks), the chunk's URLs are fetched
concurrently through the same `engine.fetch.Fetcher` and `engine.cache.ImageCache` as
serving, and each image is turned into the model input off the event loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import trio

from engine.cache import ImageCache
from engine.errors import PredictionError
from engine.fetch import Fetcher, FetchSettings
from modelgate.train.dataset import Dataset, LabelledQuery, LoadReport
from modelgate.train.inputs import SERVING_CHECKS, TrainingInput
from modelgate.train.split import is_validation

__all__ = ["load_dataset"]

_CHUNK = 256  # documents read, fetched and preprocessed together
_FETCH_CONCURRENCY = 32


def load_dataset(
    query: LabelledQuery,
    inputs: TrainingInput,
    *,
    fetch: FetchSettings,
    cache_dir: str | None,
    validation_fraction: float,
) -> Dataset:
    """Read, fetch, preprocess and split the documents of `query`; the report says what
    was skipped (not checked here: see `LabelledQuery.check`)."""
    started = time.monotonic()
    dataset = trio.run(_load, query, inputs, fetch, cache_dir, validation_fraction)
    dataset.report.seconds = time.monotonic() - started
    return dataset


async def _load(
    query: LabelledQuery,
    inputs: TrainingInput,
    fetch: FetchSettings,
    cache_dir: str | None,
    validation_fraction: float,
) -> Dataset:
    report = LoadReport()
    xs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    ys: dict[bool, list[int]] = {False: [], True: []}
    ids: dict[bool, list[Any]] = {False: [], True: []}
    cursor = query.collection.find(query.filter)
    cache = ImageCache(cache_dir) if cache_dir else None
    try:
        async with Fetcher(fetch, cache) as fetcher:
            while chunk := await trio.to_thread.run_sync(_take, cursor, _CHUNK):
                report.documents += len(chunk)
                items = query.usable(chunk, report)
                images = await _fetch_all(fetcher, items)
                for (document_id, _, label), data in zip(items, images, strict=True):
                    if isinstance(data, PredictionError):
                        report.bad_image(document_id, data.message)
                        continue
                    try:
                        array = await trio.to_thread.run_sync(inputs.tensor, data)
                    except PredictionError as exc:
                        report.bad_image(document_id, exc.message)
                        continue
                    loaded = len(ys[False]) + len(ys[True])
                    if inputs.checks_serving and loaded < SERVING_CHECKS:
                        inputs.check_serving(document_id, data, array)
                    side = is_validation(document_id, validation_fraction)
                    xs[side].append(array)
                    ys[side].append(label)
                    ids[side].append(document_id)
    finally:
        cursor.close()
        if cache is not None:
            cache.close()
    report.train, report.validation = len(ys[False]), len(ys[True])
    return Dataset(
        _stack(xs[False]),
        np.asarray(ys[False], np.int64),
        _stack(xs[True]),
        np.asarray(ys[True], np.int64),
        ids[False],
        ids[True],
        report,
    )


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    """The next `n` documents of the cursor (fewer at its end): blocking, run in a thread."""
    chunk = []
    for document in iterator:
        chunk.append(document)
        if len(chunk) == n:
            break
    return chunk


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros((0,), np.float32)
    return np.ascontiguousarray(np.stack(arrays), dtype=np.float32)


async def _fetch_all(fetcher: Fetcher, items: list[tuple[Any, Any, int]]) -> list[Any]:
    """Bytes (or the PredictionError) for every item; URLs fetched concurrently."""
    results: list[Any] = [None] * len(items)
    limiter = trio.CapacityLimiter(_FETCH_CONCURRENCY)

    async def one(i: int, url: str) -> None:
        async with limiter:
            try:
                results[i] = await fetcher.fetch(url)
            except PredictionError as exc:
                results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, (_, value, _) in enumerate(items):
            if isinstance(value, str):
                nursery.start_soon(one, i, value)
            else:
                results[i] = bytes(value)
    return results
