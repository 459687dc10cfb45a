"""The train/validation split: a hash of each document's `_id`."""

from __future__ import annotations

import hashlib
from typing import Any

import bson

__all__ = ["is_validation"]


def is_validation(document_id: Any, fraction: float) -> bool:
    """Whether a document belongs to the validation split: sha1 of its BSON-encoded `_id`,
    read as a number in [0, 1). Depends on the `_id` only, so it is stable across runs
    and a document never changes side as the collection grows."""
    digest = hashlib.sha1(bson.encode({"_id": document_id})).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction
