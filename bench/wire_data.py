"""The documents of `bench wire`: the driver benchmark spec's shapes and sizes.

The spec's data sets cannot be downloaded here, so documents of the same shapes and
sizes are generated (SMALL_DOC about 275 bytes, TWEET about 1.6 KB, LARGE_DOC about
2.7 MB), from a fixed seed. Dataset sizes are measured from the generated BSON, not
copied from the spec."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bson

__all__ = ["Dataset", "make_dataset"]

# Spec sizes, in bytes of BSON.
SMALL_DOC_BYTES = 275
TWEET_BYTES = 1_622
LARGE_DOC_BYTES = 2_731_089


def _element_size(key: str, value: object) -> int:
    # An element's bytes inside a document: the one-element document less its
    # 4-byte length and trailing NUL.
    return len(bson.encode({key: value})) - 5


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choices(string.ascii_letters, k=rng.randint(low, high)))


def _fill(
    rng: random.Random,
    target: int,
    value: Callable[[], object],
    key_len: tuple[int, int],
    doc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add random keys with `value()` values to `doc` until its BSON is about `target`."""
    doc = {} if doc is None else doc
    size = len(bson.encode(doc))
    while True:
        key = _word(rng, *key_len)
        if key in doc:
            continue
        item = value()
        grow = _element_size(key, item)
        if size + grow > target:
            break
        doc[key] = item
        size += grow
    # Top up with one string so the size lands on the target exactly (where it can).
    room = target - size - (1 + 3 + 1 + 4 + 1)  # type, 3-byte key, NUL, length, NUL
    if room >= 0:
        key = _word(rng, 3, 3)
        while key in doc:
            key = _word(rng, 3, 3)
        doc[key] = "x" * room
    return doc


def small_doc(rng: random.Random) -> dict[str, Any]:
    """SMALL_DOC's shape: 20-30 fields of short random ASCII keys, ints and strings."""

    def value() -> object:
        return rng.randint(0, 2**31 - 1) if rng.random() < 0.5 else _word(rng, 2, 6)

    return _fill(rng, SMALL_DOC_BYTES, value, (2, 4))


def tweet_doc(rng: random.Random) -> dict[str, Any]:
    """TWEET's shape: a status with a nested user, entities and counters."""
    user = {
        "id": rng.randint(10**8, 10**9),
        "name": _word(rng, 6, 14),
        "screen_name": _word(rng, 6, 12),
        "location": _word(rng, 5, 15),
        "url": "http://" + _word(rng, 5, 12).lower() + ".example.com/",
        "description": "",
        "protected": False,
        "followers_count": rng.randint(0, 10**5),
        "friends_count": rng.randint(0, 10**4),
        "listed_count": rng.randint(0, 500),
        "created_at": "Mon Dec 16 02:53:17 +0000 2013",
        "favourites_count": rng.randint(0, 10**4),
        "utc_offset": -18000,
        "time_zone": "Eastern Time (US & Canada)",
        "geo_enabled": True,
        "verified": False,
        "statuses_count": rng.randint(0, 10**5),
        "lang": "en",
        "profile_background_color": "C0DEED",
        "profile_image_url": "http://pbs.example.com/profile_images/" + _word(rng, 10, 10),
        "default_profile": True,
    }
    doc: dict[str, Any] = {
        "text": " ".join(_word(rng, 2, 9) for _ in range(18)),
        "in_reply_to_status_id": None,
        "retweet_count": rng.randint(0, 1000),
        "contributors": None,
        "created_at": "Fri Jan 03 22:26:51 +0000 2014",
        "geo": None,
        "source": '<a href="http://example.com" rel="nofollow">Example client</a>',
        "coordinates": None,
        "in_reply_to_screen_name": None,
        "truncated": False,
        "entities": {
            "user_mentions": [
                {
                    "indices": [0, 12],
                    "screen_name": _word(rng, 6, 10),
                    "id": rng.randint(10**8, 10**9),
                    "name": _word(rng, 6, 12),
                }
            ],
            "hashtags": [{"indices": [20, 28], "text": _word(rng, 4, 8)}],
            "urls": [],
        },
        "retweeted": False,
        "place": None,
        "user": user,
        "favorited": False,
        "in_reply_to_user_id": None,
        "id": rng.randint(10**17, 10**18),
    }
    room = TWEET_BYTES - len(bson.encode(doc))
    user["description"] = " ".join(_word(rng, 3, 8) for _ in range(room // 5 + 1))[: max(room, 0)]
    return doc


def large_doc(rng: random.Random) -> dict[str, Any]:
    """LARGE_DOC's shape: thousands of fields, mostly strings, some ints and arrays."""

    def value() -> object:
        roll = rng.random()
        if roll < 0.1:
            return rng.randint(0, 2**31 - 1)
        if roll < 0.15:
            return [_word(rng, 4, 12) for _ in range(rng.randint(2, 8))]
        return _word(rng, 20, 220)

    return _fill(rng, LARGE_DOC_BYTES, value, (4, 12))


@dataclass(frozen=True)
class Dataset:
    small: dict[str, Any]
    tweet: dict[str, Any]
    large: dict[str, Any]

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "small_doc": len(bson.encode(self.small)),
            "tweet": len(bson.encode(self.tweet)),
            "large_doc": len(bson.encode(self.large)),
        }


def make_dataset(seed: int = 20160813) -> Dataset:
    rng = random.Random(seed)
    return Dataset(small=small_doc(rng), tweet=tweet_doc(rng), large=large_doc(rng))
