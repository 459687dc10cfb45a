"""Fixtures shared by the engine's tests of deferred work."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine.fake_collection import FakeCollection


@pytest.fixture(params=["fake", "upstream"])
def collections(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A model's collection ("items") and the deferred bookkeeping's, by name: in memory,
    or on the test upstream."""
    names = ("items", "leases", "failures", "stats")
    if request.param == "fake":
        return {name: FakeCollection() for name in names}
    database = request.getfixturevalue("direct")[request.getfixturevalue("db_name")]
    return {name: database[name] for name in names}
