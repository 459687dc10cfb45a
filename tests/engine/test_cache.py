"""ImageCache: a bounded LRU on LMDB, shared by threads and processes, kept across restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from engine.cache import CacheError, EntryMeta, ImageCache

REPO = Path(__file__).resolve().parents[2]


def body(n: int, fill: int = 0) -> bytes:
    return bytes([fill % 256]) * n


def test_put_get_roundtrip_with_metadata(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c", max_bytes=1 << 20) as cache:
        assert cache.get("http://x/a.png") is None
        meta = EntryMeta(
            content_type="image/png",
            etag='"abc"',
            last_modified="Wed, 21 Oct 2015 07:28:00 GMT",
            fetched_at=1234.5,
        )
        assert cache.put("http://x/a.png", b"PNGDATA", meta)
        entry = cache.get("http://x/a.png")
        assert entry is not None
        assert entry.body == b"PNGDATA"
        assert entry.size == 7
        assert (entry.content_type, entry.etag, entry.last_modified, entry.fetched_at) == (
            "image/png",
            '"abc"',
            "Wed, 21 Oct 2015 07:28:00 GMT",
            1234.5,
        )
        assert "http://x/a.png" in cache
        stats = cache.stats()
        assert stats["entries"] == 1 and stats["bytes"] == 7
        assert stats["hits"] == 1 and stats["misses"] == 1


def test_fetched_at_defaults_to_now_and_refresh_updates_it(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c") as cache:
        before = time.time()
        cache.put("u", b"x")
        entry = cache.get("u")
        assert entry is not None and entry.fetched_at >= before
        assert cache.refresh("u", fetched_at=before + 100)
        entry = cache.get("u")
        assert entry is not None and entry.fetched_at == before + 100
        assert not cache.refresh("missing")


def test_overwrite_keeps_totals_right(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c") as cache:
        cache.put("u", body(100))
        cache.put("u", body(40))
        assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == 40
        assert cache.delete("u")
        assert not cache.delete("u")
        assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c"
    cache = ImageCache(path, max_bytes=10_000)
    cache.put("http://x/a", body(500, 1), EntryMeta(etag='"e"'))
    cache.close()
    with ImageCache(path, max_bytes=10_000) as again:
        entry = again.get("http://x/a")
        assert entry is not None and entry.body == body(500, 1) and entry.etag == '"e"'
        assert again.stats()["bytes"] == 500


def test_eviction_keeps_total_under_bound(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c", max_bytes=3_000) as cache:
        for i in range(10):
            cache.put(f"u{i}", body(1000, i))
            assert cache.stats()["bytes"] <= 3_000
        stats = cache.stats()
        assert stats["entries"] == 3 and stats["evictions"] == 7
        assert [f"u{i}" in cache for i in range(10)] == [False] * 7 + [True] * 3


def test_eviction_is_least_recently_used(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c", max_bytes=2_500) as cache:
        cache.put("A", body(1000, 1))
        cache.put("B", body(1000, 2))
        assert cache.get("A") is not None  # A is now more recent than B
        cache.put("C", body(1000, 3))
        assert "B" not in cache
        assert "A" in cache and "C" in cache
        assert cache.stats()["bytes"] == 2_000


def test_evict_to_explicit_bound(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c", max_bytes=10_000) as cache:
        for name in "ABCD":
            cache.put(name, body(1000))
        cache.get("A")
        assert cache.evict_to(2_000) == 2
        assert sorted(n for n in "ABCD" if n in cache) == ["A", "D"]


def test_body_larger_than_bound_is_not_stored(tmp_path: Path) -> None:
    with ImageCache(tmp_path / "c", max_bytes=1_000) as cache:
        cache.put("small", body(10))
        assert not cache.put("big", body(1_001))
        assert "big" not in cache and "small" in cache


def test_threads_share_one_cache(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "c", max_bytes=50_000)
    other = ImageCache(tmp_path / "c", max_bytes=50_000)  # same env, second handle
    errors: list[BaseException] = []

    def work(worker: int, handle: ImageCache) -> None:
        try:
            for i in range(60):
                url = f"w{worker}-{i}"
                handle.put(url, body(500, i))
                handle.get(url)
                handle.get(f"w{(worker + 1) % 4}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n, (cache, other)[n % 2])) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["bytes"] <= 50_000
    present = sum(f"w{w}-{i}" in cache for w in range(4) for i in range(60))
    assert present == stats["entries"] and stats["bytes"] == present * 500
    other.close()
    cache.close()


def _run_child(path: Path, code: str) -> subprocess.Popen[str]:
    snippet = (
        textwrap.dedent(
            f"""
        from engine.cache import ImageCache, EntryMeta
        cache = ImageCache({str(path)!r}, max_bytes=5_000)
        """
        )
        + textwrap.dedent(code)
        + "\ncache.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", snippet],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(child: subprocess.Popen[str]) -> str:
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    return out


def test_two_processes_share_entries_and_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with ImageCache(path, max_bytes=5_000) as cache:
        cache.put("from-parent", b"parent-bytes")
        out = _wait(
            _run_child(
                path,
                """
            entry = cache.get("from-parent")
            print(entry.body.decode() if entry else "MISSING")
            cache.put("from-child", b"child-bytes", EntryMeta(content_type="image/png"))
        """,
            )
        )
        assert out.strip() == "parent-bytes"
        entry = cache.get("from-child")
        assert entry is not None
        assert entry.body == b"child-bytes" and entry.content_type == "image/png"

        # Two processes filling concurrently: the bound holds and the totals stored in
        # the database match what is really there.
        children = [
            _run_child(
                path,
                f"""
                for i in range(30):
                    cache.put("p{n}-%d" % i, bytes(400))
                    assert cache.stats()["bytes"] <= 5_000
            """,
            )
            for n in range(2)
        ]
        for child in children:
            _wait(child)
        stats = cache.stats()
        assert stats["bytes"] <= 5_000
        names = ["from-parent", "from-child"] + [f"p{n}-{i}" for n in range(2) for i in range(30)]
        present = [name for name in names if name in cache]
        assert len(present) == stats["entries"]
        sizes = {"from-parent": 12, "from-child": 11}
        assert stats["bytes"] == sum(sizes.get(name, 400) for name in present)


def test_lmdb_errors_become_cache_errors(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(CacheError):
        ImageCache(not_a_dir / "sub")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(b"not an lmdb file" * 1000)
    with pytest.raises(CacheError, match="cannot open"):
        ImageCache(garbage)
    cache = ImageCache(tmp_path / "c")
    cache.close()
    with pytest.raises(CacheError, match="after close"):
        cache.get("u")
