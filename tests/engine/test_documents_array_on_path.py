"""engine.documents.array_on_path: where a dotted path meets an array before its end
(get_path gives MISSING there, while MongoDB's queries see the field)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.documents import MISSING, array_on_path, get_path, through_array_message


@pytest.mark.parametrize(
    ("document", "path", "expected"),
    [
        ({"items": [{"x": 1}]}, "items.x", "items"),
        ({"items": []}, "items.x", "items"),
        ({"a": {"items": [{"x": 1}]}}, "a.items.x", "a.items"),
        ({"a": [{"items": {"x": 1}}]}, "a.items.x", "a"),  # the first array met
        ({"items": [{"x": 1}]}, "items.0.x", "items"),  # no index paths either
        ({"items": {"x": [1, 2]}}, "items.x", None),  # an array at the end is the value
        ({"x": [1, 2]}, "x", None),
        ({"items": {"x": 1}}, "items.x", None),
        ({"items": 5}, "items.x", None),  # absent, not through an array
        ({}, "items.x", None),
    ],
)
def test_array_on_path(document: dict[str, Any], path: str, expected: str | None) -> None:
    assert array_on_path(document, path) == expected
    if expected is not None:
        assert get_path(document, path) is MISSING


def test_the_message_names_the_path_and_the_array() -> None:
    message = through_array_message("a.items.x", "a.items")
    assert "'a.items.x'" in message and "through an array at 'a.items'" in message
