"""engine.search.local_index and engine.search.persist: one local vector index, its
approximate and exact search, scores on MongoDB's scale, changes, filters, errors, and
its files (round trip, damage detected)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from bson.binary import BinaryVectorDtype

from engine.search import persist
from engine.search.filters import VectorSearchQueryError, compile_filter
from engine.search.local_index import LocalIndex, VectorInvalid, coerce_vector, id_key

DIM = 24


def clustered(count: int, seed: int, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((20, dim)).astype(np.float32)
    data = centres[rng.integers(0, 20, count)] + 0.5 * rng.standard_normal((count, dim))
    return data.astype(np.float32)


def filled(similarity: str, count: int = 1500, **values: Any) -> tuple[LocalIndex, np.ndarray]:
    data = clustered(count, seed=1)
    index = LocalIndex(DIM, similarity)
    index.upsert_many((i, data[i], {"n": i % 10, "even": i % 2 == 0}) for i in range(count))
    return index, data


def numpy_scores(similarity: str, data: np.ndarray, q: np.ndarray) -> np.ndarray:
    data64, q64 = data.astype(np.float64), q.astype(np.float64)
    if similarity == "cosine":
        cos = data64 @ q64 / (np.linalg.norm(data64, axis=1) * np.linalg.norm(q64))
        return (1 + cos) / 2
    if similarity == "dotProduct":
        return (1 + data64 @ q64) / 2
    return 1 / (1 + np.linalg.norm(data64 - q64, axis=1))


@pytest.mark.parametrize("similarity", ["cosine", "dotProduct", "euclidean"])
def test_exact_search_gives_mongodbs_scores_in_order(similarity: str) -> None:
    index, data = filled(similarity, count=300)
    q = clustered(1, seed=5)[0]
    expected = numpy_scores(similarity, data, q)
    found = index.search(q, limit=300, num_candidates=300, exact=True)
    assert [doc_id for doc_id, _ in found] == list(np.argsort(-expected, kind="stable"))
    for doc_id, score in found:
        assert score == pytest.approx(expected[doc_id], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("similarity", ["cosine", "dotProduct", "euclidean"])
def test_approximate_search_recalls_the_exact_top_10(similarity: str) -> None:
    index, _ = filled(similarity)
    queries = clustered(50, seed=7)
    hits = 0
    for q in queries:
        exact = {doc_id for doc_id, _ in index.search(q, limit=10, num_candidates=100, exact=True)}
        approx = index.search(q, limit=10, num_candidates=100)
        assert len(approx) == 10
        hits += len(exact & {doc_id for doc_id, _ in approx})
        # The graph proposes, numpy scores: an approximate hit has its exact score.
        exact_scores = dict(index.search(q, limit=1500, num_candidates=1500, exact=True))
        for doc_id, score in approx:
            assert score == exact_scores[doc_id]
    assert hits / (10 * len(queries)) >= 0.95


def test_updates_and_deletes_are_reflected() -> None:
    index = LocalIndex(3, "euclidean")
    index.upsert_many([("a", np.array([0, 0, 0]), {}), ("b", np.array([5, 5, 5]), {})])
    assert index.search([0, 0, 0], limit=1, num_candidates=10)[0] == ("a", 1.0)
    assert index.upsert("b", np.array([0, 0, 0.5], dtype=np.float32), {}) is True
    assert index.upsert("b", np.array([0, 0, 0.5], dtype=np.float32), {"x": 1}) is False
    assert index.get("b")[1] == {"x": 1}  # type: ignore[index]
    assert index.remove("a") is True and index.remove("a") is False
    assert index.search([0, 0, 0], limit=5, num_candidates=10) == [("b", pytest.approx(1 / 1.5))]
    assert len(index) == 1 and "a" not in index and "b" in index
    # A freed slot is reused by the next document; the graph follows.
    index.upsert("c", np.array([9, 9, 9], dtype=np.float32), {})
    assert sorted(index.ids()) == ["b", "c"]
    found = index.search([9, 9, 9], limit=2, num_candidates=10)
    assert [doc_id for doc_id, _ in found] == ["c", "b"]
    assert index.remove_many(["b", "c", "zzz"]) == 2
    assert index.search([0, 0, 0], limit=5, num_candidates=10) == []


def test_many_changes_keep_approximate_and_exact_in_step() -> None:
    rng = np.random.default_rng(3)
    index = LocalIndex(8, "cosine", capacity=16)
    truth: dict[int, np.ndarray] = {}
    for _ in range(3000):
        doc_id = int(rng.integers(0, 400))
        if rng.random() < 0.3:
            index.remove(doc_id)
            truth.pop(doc_id, None)
        else:
            vector = rng.standard_normal(8).astype(np.float32)
            index.upsert(doc_id, vector, {})
            truth[doc_id] = vector
    assert sorted(index.ids()) == sorted(truth)
    q = rng.standard_normal(8)
    found = index.search(q, limit=len(truth), num_candidates=len(truth), exact=True)
    ids = np.array(sorted(truth))
    expected = numpy_scores("cosine", np.array([truth[i] for i in ids]), q)
    assert [doc_id for doc_id, _ in found] == list(ids[np.argsort(-expected, kind="stable")])


@pytest.mark.parametrize(
    ("filter_doc", "matching"),
    [
        ({"n": 3}, lambda i: i % 10 == 3),  # 10%: post-filter at numCandidates 20
        ({"n": {"$in": [1, 2, 3, 4, 5]}}, lambda i: 1 <= i % 10 <= 5),
        ({"even": True}, lambda i: i % 2 == 0),
        ({"$and": [{"n": 7}, {"even": False}]}, lambda i: i % 10 == 7),
        ({"n": 42}, lambda i: False),  # matches nothing: pre-filter, empty
    ],
)
def test_filters_return_only_matching_documents_and_find_the_best(
    filter_doc: dict[str, Any], matching: Any
) -> None:
    index, data = filled("cosine", count=3000)
    compiled = compile_filter(filter_doc, frozenset({"n", "even"}))
    q = clustered(1, seed=11)[0]
    exact = index.search(q, limit=10, num_candidates=20, filter=compiled, exact=True)
    approx = index.search(q, limit=10, num_candidates=20, filter=compiled)
    assert all(matching(doc_id) for doc_id, _ in exact + approx)
    expected = [i for i in np.argsort(-numpy_scores("cosine", data, q)) if matching(i)][:10]
    assert [doc_id for doc_id, _ in exact] == expected
    assert len(set(expected) & {doc_id for doc_id, _ in approx}) >= 0.8 * len(expected)


def test_a_selective_filter_is_answered_exactly() -> None:
    index, data = filled("euclidean", count=3000)
    compiled = compile_filter({"n": 9, "even": True}, frozenset({"n", "even"}))  # none
    assert index.search(data[0], limit=5, num_candidates=50, filter=compiled) == []
    compiled = compile_filter({"n": 9}, frozenset({"n"}))  # 300 of 3000 at 100 candidates
    q = data[19]
    found = index.search(q, limit=5, num_candidates=100, filter=compiled)
    assert found == index.search(q, limit=5, num_candidates=100, filter=compiled, exact=True)
    assert found[0] == (19, 1.0)


def test_a_query_of_the_wrong_dimension_gets_mongodbs_error() -> None:
    index, _ = filled("cosine", count=20)
    with pytest.raises(VectorSearchQueryError) as caught:
        index.search([0.1, 0.2], limit=1, num_candidates=10)
    assert caught.value.code == 8 and caught.value.code_name == "UnknownError"
    assert str(caught.value).endswith(
        f"vector field is indexed with {DIM} dimensions but queried with 2"
    )
    with pytest.raises(VectorSearchQueryError, match="zero vector"):
        index.search([0.0] * DIM, limit=1, num_candidates=10)
    with pytest.raises(VectorSearchQueryError, match="not finite"):
        index.search([float("nan")] * DIM, limit=1, num_candidates=10)


def test_document_vectors_are_checked() -> None:
    assert coerce_vector([1, 2.5, Int64(3)], 3).tolist() == [1.0, 2.5, 3.0]
    floats = Binary.from_vector([0.5, -1.0], BinaryVectorDtype.FLOAT32)
    assert coerce_vector(floats, 2).tolist() == [0.5, -1.0]
    assert coerce_vector(Binary.from_vector([1, -2], BinaryVectorDtype.INT8), 2).tolist() == [
        1.0,
        -2.0,
    ]
    for bad in (
        None,
        "1,2",
        {"a": 1},
        [1, 2],
        [1, 2, 3, 4],
        [1, "2", 3],
        [1, True, 3],
        [1, None, 3],
        [1, float("inf"), 3],
        [[1], [2], [3]],
        Binary(b"abc"),
        Binary.from_vector([1, 0, 1], BinaryVectorDtype.PACKED_BIT),
    ):
        with pytest.raises(VectorInvalid):
            coerce_vector(bad, 3)
    with pytest.raises(VectorInvalid, match="zero vector"):
        LocalIndex(3, "cosine").prepare(np.zeros(3, dtype=np.float32))
    assert LocalIndex(3, "euclidean").prepare(np.zeros(3, dtype=np.float32)).tolist() == [0, 0, 0]


def test_any_bson_id_is_a_key() -> None:
    ids: list[Any] = [
        ObjectId(),
        "x",
        7,
        Int64(8),
        2.5,
        {"a": 1, "b": [1, 2]},
        [1, 2],
        True,
        None,
        uuid.UUID(int=5),
        Binary.from_uuid(uuid.UUID(int=6)),
        datetime.datetime(2024, 1, 1),
        Binary(b"\x00\x01", 0),
        Decimal128("1.5"),
    ]
    assert id_key(1) == id_key(1.0) == id_key(Int64(1)) and id_key(True) != id_key(1)
    assert id_key(uuid.UUID(int=5)) == id_key(Binary.from_uuid(uuid.UUID(int=5)))
    index = LocalIndex(2, "dotProduct")
    index.upsert_many((doc_id, np.array([0.1 * i, 0.0]), {}) for i, doc_id in enumerate(ids))
    assert len(index) == len(ids)
    for doc_id in ids:
        assert doc_id in index
    assert index.search([1.0, 0.0], limit=1, num_candidates=20)[0][0] == ids[-1]


def _round_trip_index() -> LocalIndex:
    index, _ = filled("cosine", count=500)
    index.remove_many(range(0, 500, 7))  # free slots inside
    when = {"when": datetime.datetime(2024, 5, 1)}
    index.upsert_many(
        [
            (ObjectId("65f0a0a0a0a0a0a0a0a0a0a0"), np.ones(DIM), when),
            ({"compound": 1}, -np.ones(DIM), {"tags": ["a", "b"]}),
        ]
    )
    return index


def test_an_index_survives_a_round_trip(tmp_path: Path) -> None:
    index = _round_trip_index()
    state = {"token": {"_data": "8265AB"}, "indexId": "abc"}
    persist.save_index(tmp_path / "idx", index, state)
    loaded, loaded_state = persist.load_index(tmp_path / "idx")
    assert loaded_state == state
    assert sorted(map(repr, loaded.ids())) == sorted(map(repr, index.ids()))
    assert loaded.get({"compound": 1})[1] == {"tags": ["a", "b"]}  # type: ignore[index]
    when = loaded.get(ObjectId("65f0a0a0a0a0a0a0a0a0a0a0"))[1]["when"]  # type: ignore[index]
    assert when.replace(tzinfo=None) == datetime.datetime(2024, 5, 1)
    for q in clustered(20, seed=4):
        assert loaded.search(q, limit=10, num_candidates=100) == index.search(
            q, limit=10, num_candidates=100
        )
    # The loaded index keeps changing like the original.
    loaded.upsert("new", np.ones(DIM), {})
    loaded.remove(1)
    assert "new" in loaded and 1 not in loaded and len(loaded) == len(index)
    # Saving again replaces the generation in one step and leaves one.
    persist.save_index(tmp_path / "idx", loaded, {})
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert names[0] == "CURRENT" and len(names) == 2
    assert persist.load_index(tmp_path / "idx")[1] == {}


def _flip_a_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["no directory", "no CURRENT", "vectors", "rows", "graph", "manifest", "CURRENT", "cut"],
)
def test_damage_is_detected(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "idx"
    persist.save_index(directory, _round_trip_index(), {"token": None})
    generation = next(directory.glob("g*"))
    if damage == "no directory":
        directory = tmp_path / "elsewhere"
    elif damage == "no CURRENT":
        (directory / "CURRENT").unlink()
    elif damage == "CURRENT":
        (directory / "CURRENT").write_text("g000001 0000\n")
    elif damage == "cut":
        graph = generation / "graph.hnsw"
        graph.write_bytes(graph.read_bytes()[:100])
    else:
        name = {"vectors": "vectors.npy", "rows": "rows.bson", "graph": "graph.hnsw"}.get(
            damage, "manifest.bson"
        )
        _flip_a_byte(generation / name)
    with pytest.raises(persist.IndexDamaged):
        persist.load_index(directory)


def test_a_checksummed_file_of_another_format_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "idx"
    index = LocalIndex(4, "euclidean")
    index.upsert(1, np.ones(4), {})
    persist.save(directory, index.snapshot(), {})
    snapshot, _ = persist.load(directory)
    # A graph whose checksum is right but which is no graph of these rows.
    other = LocalIndex(4, "euclidean")
    other.upsert_many([(1, np.ones(4), {}), (2, np.zeros(4), {})])
    other.snapshot(tmp_path / "other.hnsw")
    snapshot.graph_file = tmp_path / "other.hnsw"
    persist.save(directory, snapshot, {})
    with pytest.raises(persist.IndexDamaged, match="graph"):
        persist.load_index(directory)


def test_filter_values_of_any_type_are_kept(tmp_path: Path) -> None:
    values: Mapping[str, Any] = {"a": Decimal128("2.5"), "b": None, "c": {"d": [1, {"e": 2}]}}
    index = LocalIndex(2, "euclidean")
    index.upsert("x", np.zeros(2), values)
    persist.save_index(tmp_path / "i", index, {})
    assert persist.load_index(tmp_path / "i")[0].get("x")[1] == values  # type: ignore[index]


def test_hnsw_options_build_the_graph_and_survive_saving(tmp_path: Path) -> None:
    data = clustered(300, seed=1)
    default = LocalIndex(DIM, "cosine")
    assert default.graph_options == (16, 128)  # engine.search.ann's defaults
    index = LocalIndex(DIM, "cosine", connectivity=32, expansion_add=400)
    assert index.graph_options == (32, 400)
    index.upsert_many((i, data[i], {}) for i in range(len(data)))
    persist.save_index(tmp_path / "idx", index, {})
    loaded, _ = persist.load_index(tmp_path / "idx")
    assert loaded.graph_options == (32, 400)  # hnswlib's file keeps them
    # Rows without a graph file are rebuilt into a graph with the same options.
    snapshot, _ = persist.load(tmp_path / "idx")
    assert (snapshot.connectivity, snapshot.expansion_add) == (32, 400)
    snapshot.graph_file = None
    rebuilt = LocalIndex.from_snapshot(snapshot)
    assert rebuilt.graph_options == (32, 400)
    q = clustered(1, seed=8)[0]
    assert rebuilt.search(q, limit=5, num_candidates=50) == index.search(
        q, limit=5, num_candidates=50
    )


def test_search_now_answers_unless_a_writer_holds_the_index() -> None:
    import threading

    index, _ = filled("cosine", count=300)
    q = clustered(1, seed=3)[0]
    assert index.search_now(q, limit=5, num_candidates=50) == index.search(
        q, limit=5, num_candidates=50
    )
    assert index.search_now(q, limit=5, num_candidates=0, exact=True) == index.search(
        q, limit=5, num_candidates=0, exact=True
    )
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with index._lock:  # white box: a writer in the middle of a change
            held.set()
            release.wait()

    thread = threading.Thread(target=writer)
    thread.start()
    held.wait()
    try:
        assert index.search_now(q, limit=5, num_candidates=50) is None
    finally:
        release.set()
        thread.join()
    assert index.search_now(q, limit=5, num_candidates=50) is not None
