"""Reading and writing dotted field paths in decoded BSON documents, and the codec
options under which a decode/encode round trip gives back the same bytes."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, DatetimeConversion

__all__ = [
    "FAITHFUL",
    "MISSING",
    "array_on_path",
    "get_path",
    "path_touches",
    "set_path",
    "through_array_message",
    "unset_path",
]

# Dates outside Python's range and UUIDs of any subtype survive decode + encode unchanged.
FAITHFUL: CodecOptions[dict[str, Any]] = CodecOptions(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
    uuid_representation=UuidRepresentation.UNSPECIFIED,
)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def get_path(document: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, or MISSING (arrays are not traversed)."""
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def array_on_path(document: Mapping[str, Any], path: str) -> str | None:
    """The first array a dotted path goes through before its end (as a path prefix), or
    None. Where there is one, get_path gives MISSING although MongoDB's queries see the
    field (`{"items.x": {"$exists": true}}` matches `{items: [{x: 1}]}`): the path names
    one value per element, not one value."""
    value: Any = document
    parts = path.split(".")
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
        if isinstance(value, list):
            return ".".join(parts[: depth + 1])
    return None


def through_array_message(path: str, through: str) -> str:
    """The error for an input path that goes through an array (at `through`)."""
    return (
        f"input '{path}' goes through an array at '{through}': a model's input must "
        "name one value, not one per element"
    )


def set_path(document: MutableMapping[str, Any], path: str, value: Any) -> None:
    """Set a dotted path, creating sub-documents; a non-document in the way is replaced."""
    parts = path.split(".")
    target: MutableMapping[str, Any] = document
    for part in parts[:-1]:
        child = target.get(part)
        if not isinstance(child, MutableMapping):
            child = {}
            target[part] = child
        target = child
    target[parts[-1]] = value


def unset_path(document: MutableMapping[str, Any], path: str) -> None:
    parts = path.split(".")
    target: Any = document
    for part in parts[:-1]:
        target = target.get(part) if isinstance(target, MutableMapping) else None
    if isinstance(target, MutableMapping):
        target.pop(parts[-1], None)


def path_touches(updated: str, field: str) -> bool:
    """Whether writing `updated` changes `field`: the same path, a parent or a child."""
    return updated == field or field.startswith(updated + ".") or updated.startswith(field + ".")
