"""What the engine's tests of deferred work share: the deferred model they work on, and
its work queue over a model's collection and the bookkeeping's, in memory or on the test
upstream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from engine.leases import WorkQueue
from engine.spec import ModelSpec, RawPostprocess, TensorPreprocess
from tests.engine.fake_collection import FakeCollection

Collections = dict[str, Any]
Queue = Callable[..., WorkQueue]


def deferred_spec(
    input_field: str = "x", output_field: str = "_outputs.m", **options: Any
) -> ModelSpec:
    """Deferred model "m" on db.items: a tensor in, the raw output out."""
    return ModelSpec(
        name="m",
        namespace="db.items",
        input_field=input_field,
        output_field=output_field,
        mode="deferred",
        preprocess=TensorPreprocess(),
        postprocess=RawPostprocess(),
        **options,
    )


@pytest.fixture(params=["fake", "upstream"])
def collections(request: pytest.FixtureRequest) -> Collections:
    """A model's collection ("items") and the deferred bookkeeping's, by name: in memory,
    or on the test upstream."""
    names = ("items", "leases", "failures", "stats")
    if request.param == "fake":
        return {name: FakeCollection() for name in names}
    database = request.getfixturevalue("direct")[request.getfixturevalue("db_name")]
    return {name: database[name] for name in names}


@pytest.fixture
def queue(collections: Collections) -> Queue:
    """Makes the work queue of a deferred_spec(**fields) over `collections`, with its
    indexes made as modelgate makes them before its first claim:
    queue(version=1, owner="a", **fields)."""

    def make(version: int = 1, owner: str = "a", **fields: Any) -> WorkQueue:
        work = WorkQueue(
            deferred_spec(**fields),
            version,
            owner,
            collection=collections["items"],
            leases=collections["leases"],
            failures=collections["failures"],
            stats=collections["stats"],
        )
        work.ensure_index()
        return work

    return make
