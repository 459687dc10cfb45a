"""A size-bounded, least-recently-used image cache on LMDB that survives restarts.

Layout (named databases in one LMDB environment; `key` is sha256(url), 32 bytes):

    meta    key -> JSON {url, content_type, size, etag, last_modified, fetched_at}
    body    key -> the bytes
    atime   key -> last access, 8-byte big-endian nanoseconds
    lru     atime(8) + key(32) -> b""   (sorted by access time: the first is evicted first)
    totals  b"bytes" / b"entries" -> 8-byte big-endian counts

The totals live in the database, not in memory, so several processes sharing one
directory agree on the bound; every put and its evictions are one write transaction.

Reads are read-only transactions. A hit's new access time is kept in memory and written
in batches (on the next put, eviction, close, or when enough have piled up): a write
transaction per hit would serialise every reader behind LMDB's single writer and an
fsync. LRU order is therefore exact within this process and at most a flush behind
across processes, which is all an LRU cache needs.

Methods are synchronous and thread-safe; the async fetcher calls them through
`trio.to_thread.run_sync`. Every lmdb exception becomes `CacheError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lmdb

from engine.errors import ModelgateError
from engine.metrics import EngineMetrics

__all__ = ["CacheError", "CachedEntry", "EntryMeta", "ImageCache"]

_U64 = struct.Struct(">Q")
_FLUSH_EVERY = 1024  # pending access times before a get() writes them
_FLUSH_SECONDS = 5.0  # or this long since the last write


class CacheError(ModelgateError):
    """The image cache could not be read or written (LMDB error)."""


@dataclass(frozen=True)
class EntryMeta:
    """What is stored next to a body. fetched_at is epoch seconds (0 means now)."""

    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    fetched_at: float = 0.0


@dataclass(frozen=True)
class CachedEntry:
    body: bytes
    content_type: str | None
    size: int
    etag: str | None
    last_modified: str | None
    fetched_at: float


def cache_key(url: str) -> bytes:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()


class _SharedEnv:
    """One lmdb.Environment per directory per process, shared by every ImageCache on it.

    LMDB forbids opening the same environment twice in one process (its locks are per
    process: closing the second handle would drop the first one's locks)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.users = 0
        with env.begin(write=True) as txn:
            self.meta = env.open_db(b"meta", txn=txn)
            self.body = env.open_db(b"body", txn=txn)
            self.atime = env.open_db(b"atime", txn=txn)
            self.lru = env.open_db(b"lru", txn=txn)
            self.totals = env.open_db(b"totals", txn=txn)


_envs: dict[str, _SharedEnv] = {}
_envs_lock = threading.Lock()


@contextmanager
def _lmdb_errors(action: str) -> Iterator[None]:
    try:
        yield
    except (lmdb.Error, OSError) as exc:
        raise CacheError(f"image cache: cannot {action}: {exc}") from exc


class ImageCache:
    """LMDB image cache bounded to `max_bytes` of bodies. Open several on one path freely
    (threads or processes; give them the same max_bytes: the first opener in a process
    sizes the map); call close() once per instance."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = 1 << 30,
        *,
        metrics: EngineMetrics | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = os.path.realpath(os.fspath(path))
        self.max_bytes = max_bytes
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._lock = threading.Lock()
        self._pending: dict[bytes, int] = {}
        self._last_flush = time.monotonic()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._closed = False
        # Bodies overflow into contiguous page runs, so the file needs slack above the
        # bound; map_size only reserves address space.
        map_size = max_bytes * 2 + (64 << 20)
        with _envs_lock, _lmdb_errors(f"open {self.path}"):
            shared = _envs.get(self.path)
            if shared is None:
                os.makedirs(self.path, exist_ok=True)
                env = lmdb.open(
                    self.path,
                    map_size=map_size,
                    max_dbs=8,
                    lock=True,
                    subdir=True,
                    readahead=False,
                    max_readers=256,
                    # No fsync per put (it cost ~7 ms per fetched image here). A crashed
                    # process loses nothing (the pages are in the OS's cache); a power
                    # loss may drop recent entries, which only means fetching them again.
                    sync=False,
                    metasync=False,
                )
                shared = _envs[self.path] = _SharedEnv(env)
            shared.users += 1
        self._shared = shared
        with _lmdb_errors("read"), shared.env.begin() as txn:
            self.metrics.image_cache_bytes.set(self._totals(txn)[0])

    # -- reading --------------------------------------------------------------------

    def get(self, url: str) -> CachedEntry | None:
        """The entry for `url`, or None. Marks it as recently used."""
        key = cache_key(url)
        s = self._open()
        with _lmdb_errors("read"), s.env.begin(buffers=False) as txn:
            raw_meta = txn.get(key, db=s.meta)
            body = txn.get(key, db=s.body) if raw_meta is not None else None
        if raw_meta is None or body is None:
            with self._lock:
                self._misses += 1
            self.metrics.image_cache_misses.inc()
            return None
        meta = json.loads(raw_meta)
        self.metrics.image_cache_hits.inc()
        with self._lock:
            self._hits += 1
            self._pending[key] = time.time_ns()
            due = (
                len(self._pending) >= _FLUSH_EVERY
                or time.monotonic() - self._last_flush > _FLUSH_SECONDS
            )
        if due:
            self.flush()
        return CachedEntry(
            body=body,
            content_type=meta.get("content_type"),
            size=len(body),
            etag=meta.get("etag"),
            last_modified=meta.get("last_modified"),
            fetched_at=float(meta.get("fetched_at", 0.0)),
        )

    def __contains__(self, url: str) -> bool:
        s = self._open()
        with _lmdb_errors("read"), s.env.begin() as txn:
            return txn.get(cache_key(url), db=s.meta) is not None

    def stats(self) -> dict[str, int]:
        """entries and bytes are the database's (all processes); hits, misses and
        evictions count this instance's calls."""
        s = self._open()
        with _lmdb_errors("read"), s.env.begin() as txn:
            total, entries = self._totals(txn)
        with self._lock:
            return {
                "entries": entries,
                "bytes": total,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
            }

    # -- writing --------------------------------------------------------------------

    def put(self, url: str, body: bytes, meta: EntryMeta | None = None) -> bool:
        """Store `body` for `url`, evicting least recently used entries to stay within
        max_bytes. Returns False (and stores nothing) if the body alone exceeds it."""
        if len(body) > self.max_bytes:
            return False
        meta = meta or EntryMeta()
        key = cache_key(url)
        record = json.dumps(
            {
                "url": url,
                "content_type": meta.content_type,
                "size": len(body),
                "etag": meta.etag,
                "last_modified": meta.last_modified,
                "fetched_at": meta.fetched_at or time.time(),
            }
        ).encode()
        s = self._open()
        pending = self._take_pending()
        for attempt in range(2):
            try:
                with s.env.begin(write=True) as txn:
                    self._apply_access_times(txn, pending)
                    self._delete(txn, key)
                    now = time.time_ns()
                    txn.put(key, record, db=s.meta)
                    txn.put(key, body, db=s.body)
                    txn.put(key, _U64.pack(now), db=s.atime)
                    txn.put(_U64.pack(now) + key, b"", db=s.lru)
                    total, entries = self._totals(txn)
                    self._set_totals(txn, total + len(body), entries + 1)
                    self._evict(txn, self.max_bytes, keep=key)
                return True
            except lmdb.MapFullError as exc:
                # Fragmentation filled the map: make room and try once more.
                if attempt:
                    raise CacheError(f"image cache: cannot write: {exc}") from exc
                self.evict_to(self.max_bytes // 2)
            except lmdb.Error as exc:
                raise CacheError(f"image cache: cannot write: {exc}") from exc
        return False  # pragma: no cover - the loop returns or raises

    def refresh(self, url: str, fetched_at: float | None = None) -> bool:
        """Mark an entry as just validated (HTTP 304): new fetched_at, recently used."""
        key = cache_key(url)
        s = self._open()
        with _lmdb_errors("write"), s.env.begin(write=True) as txn:
            raw = txn.get(key, db=s.meta)
            if raw is None:
                return False
            record = json.loads(raw)
            record["fetched_at"] = fetched_at if fetched_at is not None else time.time()
            txn.put(key, json.dumps(record).encode(), db=s.meta)
            self._apply_access_times(txn, {key: time.time_ns()})
        return True

    def delete(self, url: str) -> bool:
        s = self._open()
        with _lmdb_errors("write"), s.env.begin(write=True) as txn:
            return self._delete(txn, cache_key(url))

    def evict_to(self, bound: int) -> int:
        """Evict least recently used entries until the stored bytes are <= bound.
        Returns how many were evicted."""
        s = self._open()
        pending = self._take_pending()
        with _lmdb_errors("evict"), s.env.begin(write=True) as txn:
            self._apply_access_times(txn, pending)
            return self._evict(txn, bound)

    def flush(self) -> None:
        """Write the access times of recent hits."""
        pending = self._take_pending()
        if not pending:
            return
        s = self._open()
        with _lmdb_errors("write"), s.env.begin(write=True) as txn:
            self._apply_access_times(txn, pending)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            with _envs_lock:
                self._shared.users -= 1
                if self._shared.users == 0:
                    _envs.pop(self.path, None)
                    self._shared.env.sync(True)  # puts are not synced one by one
                    self._shared.env.close()

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called inside a transaction) ------------------------------------

    def _open(self) -> _SharedEnv:
        if self._closed:
            raise CacheError("image cache: used after close()")
        return self._shared

    def _take_pending(self) -> dict[bytes, int]:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = time.monotonic()
        return pending

    def _totals(self, txn: Any) -> tuple[int, int]:
        s = self._shared
        raw_bytes = txn.get(b"bytes", db=s.totals)
        raw_entries = txn.get(b"entries", db=s.totals)
        return (
            _U64.unpack(raw_bytes)[0] if raw_bytes else 0,
            _U64.unpack(raw_entries)[0] if raw_entries else 0,
        )

    def _set_totals(self, txn: Any, total: int, entries: int) -> None:
        s = self._shared
        txn.put(b"bytes", _U64.pack(max(total, 0)), db=s.totals)
        txn.put(b"entries", _U64.pack(max(entries, 0)), db=s.totals)
        # Set before the commit: a transaction that aborts (rare: a full map, which the
        # put retries at once) leaves the gauge off until the next write.
        self.metrics.image_cache_bytes.set(max(total, 0))

    def _apply_access_times(self, txn: Any, times: dict[bytes, int]) -> None:
        s = self._shared
        for key, ns in times.items():
            old = txn.get(key, db=s.atime)
            if old is None:  # evicted meanwhile (maybe by another process)
                continue
            if _U64.unpack(old)[0] >= ns:
                continue
            txn.delete(old + key, db=s.lru)
            txn.put(key, _U64.pack(ns), db=s.atime)
            txn.put(_U64.pack(ns) + key, b"", db=s.lru)

    def _delete(self, txn: Any, key: bytes) -> bool:
        s = self._shared
        raw = txn.get(key, db=s.meta)
        if raw is None:
            return False
        size = int(json.loads(raw)["size"])
        old = txn.get(key, db=s.atime)
        if old is not None:
            txn.delete(old + key, db=s.lru)
        for db in (s.meta, s.body, s.atime):
            txn.delete(key, db=db)
        total, entries = self._totals(txn)
        self._set_totals(txn, total - size, entries - 1)
        return True

    def _evict(self, txn: Any, bound: int, keep: bytes | None = None) -> int:
        s = self._shared
        total, _ = self._totals(txn)
        if total <= bound:
            return 0
        victims: list[tuple[bytes, bytes]] = []
        with txn.cursor(db=s.lru) as cursor:
            for raw_lru_key in cursor.iternext(keys=True, values=False):
                lru_key = bytes(raw_lru_key)
                key = lru_key[8:]
                if key == keep:
                    continue
                raw = txn.get(key, db=s.meta)
                total -= int(json.loads(raw)["size"]) if raw is not None else 0
                victims.append((lru_key, key))
                if total <= bound:
                    break
        for lru_key, key in victims:
            if not self._delete(txn, key):  # an orphaned index row: drop it
                txn.delete(lru_key, db=s.lru)
        with self._lock:
            self._evictions += len(victims)
        return len(victims)
