"""engine.search.upkeep on a real SecantusDB: a local index built from the documents a
collection already has, kept current from writes made straight to the upstream (around
modelgate) through the change stream, from the _ids the proxy reports and from sweeps,
saved and loaded across restarts, rebuilt when its files are damaged, dropped with its
index."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pymongo
import pytest
import trio

from engine.metrics import EngineMetrics
from engine.search import persist
from engine.search.catalog import SearchCatalog
from engine.search.definitions import SearchIndex
from engine.search.filters import compile_filter
from engine.search.local_index import LocalIndex
from engine.search.upkeep import SearchIndexes, SearchSettings, index_directory_name

Client = pymongo.MongoClient[dict[str, Any]]
DIM = 8
DEFINITION = {
    "fields": [
        {"type": "vector", "path": "v", "numDimensions": DIM, "similarity": "euclidean"},
        {"type": "filter", "path": "genre"},
    ]
}
# No periodic sweep unless a test asks for one; saves soon after a change.
SETTINGS = SearchSettings(sweep_interval=3600.0, save_interval=0.05, batch_size=40)


@pytest.fixture
def meta_db(request: pytest.FixtureRequest, direct: Client) -> Iterator[str]:
    name = "mgup_" + re.sub(r"\W", "_", request.node.name)[:40]
    direct.drop_database(name)
    yield name
    direct.drop_database(name)


@pytest.fixture
def data(meta_db: str, direct: Client) -> Iterator[pymongo.collection.Collection[Any]]:
    name = meta_db.replace("mgup_", "updata_", 1)
    direct.drop_database(name)
    yield direct[name]["docs"]
    direct.drop_database(name)


def vector(seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).standard_normal(DIM)]


def documents(count: int) -> list[dict[str, Any]]:
    return [{"_id": i, "v": vector(i), "genre": ["a", "b", "c"][i % 3]} for i in range(count)]


async def wait_for(check: Callable[[], bool], what: str, deadline: float = 60.0) -> None:
    """Poll until `check()` holds (the deadline only bounds a failing test)."""
    with trio.move_on_after(deadline):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"never happened: {what}")


@dataclass
class Served:
    indexes: SearchIndexes
    index: SearchIndex
    metrics: EngineMetrics

    def ready(self) -> bool:
        return self.indexes.state(self.index).status == "READY"

    async def ids(self, q: list[float], limit: int = 5, **options: Any) -> list[Any]:
        found = await self.indexes.search(
            self.index,
            "v",
            q,
            num_candidates=options.pop("num_candidates", 50),
            limit=limit,
            filter=options.pop("filter", None),
            exact=options.pop("exact", False),
        )
        return [doc_id for doc_id, _ in found]

    def local(self) -> LocalIndex:
        """The local index of path "v" (white box: what the keeper holds now)."""
        return self.indexes._keepers[self.index.key].locals["v"]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"index": self.index.key, **labels})
        return value or 0.0


@asynccontextmanager
async def serving(
    direct: Client, meta_db: str, data_dir: Path, settings: SearchSettings = SETTINGS
) -> AsyncIterator[Served]:
    catalog = SearchCatalog(direct, meta_db)
    await catalog.refresh()
    metrics = EngineMetrics()
    indexes = SearchIndexes(catalog, direct, data_dir, settings, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(indexes.run)
        index = next(iter(catalog.indexes.values()))
        served = Served(indexes, index, metrics)
        await wait_for(served.ready, "READY")
        yield served
        nursery.cancel_scope.cancel()


def saved_count(data_dir: Path, index: SearchIndex) -> int:
    """Documents in the saved local index of path "v" (-1: none saved yet)."""
    for directory in (data_dir / index_directory_name(index.key)).glob("L*/v0"):
        with contextlib.suppress(persist.IndexDamaged):
            return len(persist.load(directory)[0].ids)
    return -1


async def create_index(direct: Client, meta_db: str, namespace: str) -> SearchIndex:
    return await SearchCatalog(direct, meta_db).create(namespace, "vi", DEFINITION)


async def test_built_from_existing_documents_then_follows_writes_around_modelgate(
    direct: Client, meta_db: str, data: Any, tmp_path: Path
) -> None:
    await trio.to_thread.run_sync(data.insert_many, documents(200))
    await trio.to_thread.run_sync(
        data.insert_many,
        [
            {"_id": "no vector", "genre": "a"},
            {"_id": "short", "v": [1.0, 2.0]},
            {"_id": "null", "v": None},
            {"_id": "text", "v": ["x"] * DIM},
        ],
    )
    await create_index(direct, meta_db, data.full_name)
    async with serving(direct, meta_db, tmp_path) as served:
        state = served.indexes.state(served.index)
        assert (state.status, state.queryable, state.indexed, state.failed, state.pending) == (
            "READY",
            True,
            200,
            3,
            0,
        )
        assert served.metric("modelgate_search_documents_indexed") == 200
        assert served.metric("modelgate_search_build_seconds_count") == 1
        # The built index answers as exact search over the same documents does.
        everything = np.array([vector(i) for i in range(200)])
        q = vector(1000)
        nearest = list(np.argsort(np.linalg.norm(everything - np.array(q), axis=1))[:5])
        assert await served.ids(q, exact=True) == nearest
        assert await served.ids(q, num_candidates=200) == nearest
        genre_b = compile_filter({"genre": "b"}, frozenset({"genre"}))
        assert all(i % 3 == 1 for i in await served.ids(q, filter=genre_b))

        # Written straight to the upstream: an insert, an update, a delete.
        await trio.to_thread.run_sync(data.insert_one, {"_id": "new", "v": q, "genre": "z"})
        await wait_for(lambda: "new" in served.local(), "the insert indexed")
        assert (await served.ids(q))[0] == "new"
        await trio.to_thread.run_sync(
            data.update_one, {"_id": int(nearest[1])}, {"$set": {"genre": "b"}}
        )
        await trio.to_thread.run_sync(
            data.update_one, {"_id": "new"}, {"$set": {"v": vector(7000)}}
        )
        await trio.to_thread.run_sync(data.delete_one, {"_id": int(nearest[0])})
        local = served.local()

        def applied() -> bool:
            moved, relabelled = local.get("new"), local.get(int(nearest[1]))
            return (
                int(nearest[0]) not in local
                and relabelled is not None
                and relabelled[1] == {"genre": "b"}
                and moved is not None
                and np.allclose(moved[0], vector(7000))
            )

        await wait_for(applied, "the update and the delete")
        assert (await served.ids(q, num_candidates=201))[:2] == [int(nearest[1]), int(nearest[2])]
        assert int(nearest[1]) in await served.ids(q, filter=genre_b)
        assert (await served.ids(vector(7000), limit=1)) == ["new"]
        # A bad vector fixed becomes indexed; a good one broken becomes failed.
        await trio.to_thread.run_sync(data.update_one, {"_id": "short"}, {"$set": {"v": q}})
        await trio.to_thread.run_sync(data.update_one, {"_id": 5}, {"$set": {"v": "oops"}})
        await wait_for(
            lambda: "short" in served.local() and served.indexes.state(served.index).failed == 3,
            "failed documents counted",
        )
        assert 5 not in served.local()


async def test_the_proxys_writes_and_sweeps_without_a_change_stream(
    direct: Client, meta_db: str, data: Any, tmp_path: Path
) -> None:
    settings = SearchSettings(change_streams=False, sweep_interval=3600.0, save_interval=0.05)
    await trio.to_thread.run_sync(data.insert_many, documents(50))
    await create_index(direct, meta_db, data.full_name)
    async with serving(direct, meta_db, tmp_path, settings) as served:
        q = vector(500)
        await trio.to_thread.run_sync(data.insert_one, {"_id": "mine", "v": q})
        await trio.to_thread.run_sync(data.delete_one, {"_id": 3})
        # Nothing follows the collection: the proxy's report brings the insert ...
        served.indexes.notify_written(data.full_name, ["mine", 3])
        local = served.local()
        await wait_for(lambda: "mine" in local and 3 not in local, "refresh")
        assert served.indexes.state(served.index).indexed == 50
        assert (await served.ids(q))[0] == "mine" and 3 not in await served.ids(q, limit=60)
        # ... and an unknown set of _ids (an updateMany) brings a sweep.
        await trio.to_thread.run_sync(data.update_many, {"_id": {"$lt": 10}}, {"$unset": {"v": 1}})
        await trio.to_thread.run_sync(data.insert_one, {"_id": "around", "v": vector(1)})
        served.indexes.notify_written(data.full_name, None)
        await wait_for(lambda: served.indexes.state(served.index).indexed == 42, "sweep")
        found = await served.ids(vector(1), limit=60, num_candidates=100)
        assert found[0] == "around" and not set(found) & set(range(10))


async def test_restart_loads_the_saved_index_and_catches_up(
    direct: Client, meta_db: str, data: Any, tmp_path: Path
) -> None:
    await trio.to_thread.run_sync(data.insert_many, documents(120))
    index = await create_index(direct, meta_db, data.full_name)
    async with serving(direct, meta_db, tmp_path) as served:
        await trio.to_thread.run_sync(data.insert_one, {"_id": "during", "v": vector(9)})
        await wait_for(lambda: served.indexes.state(served.index).indexed == 121, "insert")
        await wait_for(lambda: saved_count(tmp_path, index) == 121, "a save after the change")
    # While no process keeps it.
    await trio.to_thread.run_sync(data.delete_many, {"_id": {"$lt": 20}})
    await trio.to_thread.run_sync(data.insert_one, {"_id": "while down", "v": vector(2000)})
    async with serving(direct, meta_db, tmp_path) as served:
        assert served.metric("modelgate_search_build_seconds_count") == 0  # loaded, not built
        assert served.metric("modelgate_search_upkeep_errors_total", kind="load") == 0
        await wait_for(lambda: served.indexes.state(served.index).indexed == 102, "caught up")
        assert (await served.ids(vector(2000), limit=1)) == ["while down"]
        assert (await served.ids(vector(9), limit=1)) == ["during"]
        assert not set(await served.ids(vector(5), limit=102, num_candidates=102)) & set(range(20))


async def test_damaged_files_are_rebuilt_and_a_dropped_index_leaves_no_files(
    direct: Client, meta_db: str, data: Any, tmp_path: Path
) -> None:
    await trio.to_thread.run_sync(data.insert_many, documents(60))
    index = await create_index(direct, meta_db, data.full_name)
    async with serving(direct, meta_db, tmp_path):
        await wait_for(lambda: saved_count(tmp_path, index) == 60, "saved")
    directory = tmp_path / index_directory_name(index.key)
    generation = next(directory.glob("L*/v0/g*"))
    vectors = generation / "vectors.npy"
    damaged = bytearray(vectors.read_bytes())
    damaged[-3] ^= 0x55
    vectors.write_bytes(bytes(damaged))
    async with serving(direct, meta_db, tmp_path) as served:
        assert served.metric("modelgate_search_upkeep_errors_total", kind="load") == 1
        assert served.metric("modelgate_search_build_seconds_count") == 1
        assert served.indexes.state(served.index).indexed == 60
        assert (await served.ids(vector(4), limit=1)) == [4]
        # Dropped: the keeper stops and the files go.
        await served.indexes.catalog.drop(data.full_name, "vi")
        await wait_for(lambda: not directory.exists(), "files removed")
        assert served.indexes.state(served.index).status == "BUILDING"
        assert served.metric("modelgate_search_documents_indexed") == 0


async def test_hnsw_options_build_the_graph_and_a_change_rebuilds_it(
    direct: Client, meta_db: str, data: Any, tmp_path: Path
) -> None:
    await trio.to_thread.run_sync(data.insert_many, documents(50))
    fields: list[dict[str, Any]] = [
        {"type": "vector", "path": "v", "numDimensions": DIM, "similarity": "euclidean"},
        {"type": "filter", "path": "genre"},
    ]
    fields[0]["hnswOptions"] = {"maxEdges": 32, "numEdgeCandidates": 200}
    catalog = SearchCatalog(direct, meta_db)
    await catalog.create(data.full_name, "vi", {"fields": fields})
    async with serving(direct, meta_db, tmp_path) as served:
        assert served.local().graph_options == (32, 200)
        assert (await served.ids(vector(7), limit=1)) == [7]
        fields[0]["hnswOptions"] = {"maxEdges": 24}
        await served.indexes.catalog.update(data.full_name, "vi", {"fields": fields})

        def rebuilt() -> bool:
            local = served.indexes._keepers[served.index.key].locals.get("v")
            return served.ready() and local is not None and local.graph_options == (24, 128)

        await wait_for(rebuilt, "rebuilt with M=24, READY")
        assert (await served.ids(vector(7), limit=1)) == [7]

        def saved() -> bool:
            directories = list((tmp_path / index_directory_name(served.index.key)).glob("L*/v0"))
            with contextlib.suppress(persist.IndexDamaged):
                snapshot = persist.load(directories[0])[0] if len(directories) == 1 else None
                return snapshot is not None and snapshot.connectivity == 24
            return False

        await wait_for(saved, "saved, the older layout's files gone")
    # Saved with its options, loaded with them.
    async with serving(direct, meta_db, tmp_path) as served:
        assert served.local().graph_options == (24, 128)
        assert served.metric("modelgate_search_build_seconds_count") == 0
