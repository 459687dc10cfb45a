"""Fetching images that documents reference by URL: httpx on trio, guarded and cached.

`Fetcher.fetch(url) -> bytes` is the `ImageSource` the input step calls. For each URL:

1. a failure remembered less than `negative_ttl` ago fails fast with the same message;
2. concurrent calls for one URL share one fetch (single flight);
3. the LMDB cache (`engine.cache`) answers hits without network, read in a worker
   thread so the event loop never blocks; stale entries (`revalidate_after`) are
   revalidated with If-None-Match / If-Modified-Since;
4. otherwise every hop (redirects are followed by hand, at most `max_redirects`) is
   resolved here, every address checked by `engine.addresses`, and the connection made
   to one of those checked addresses only (see `_PinnedBackend`), with the body streamed
   under a byte cap, a per-host concurrency limit, and retries for transient failures.

Every failure becomes an `ImageFetchError` (a PredictionError) naming the URL and the
reason, and is counted by reason (engine.metrics); no httpx, trio or OS exception leaves
this module.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import httpcore
import httpx
import trio

from engine.addresses import AddressPolicy, BlockedAddress, resolve_checked
from engine.cache import CachedEntry, CacheError, EntryMeta, ImageCache
from engine.errors import ImageFetchError, PredictionError
from engine.metrics import EngineMetrics, FetchErrorReason
from engine.stats import percentile

__all__ = ["FetchSettings", "Fetcher"]

log = logging.getLogger("modelgate.engine.fetch")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_LATENCY_WINDOW = 1024
_MAX_PINNED_HOSTS = 4096
_MAX_NEGATIVE = 10_000
_URL_IN_MESSAGE = 200  # characters of a URL quoted in an error message


@dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0  # one fetch() call: every hop, retry and backoff
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()  # names or CIDRs allowed even if private
    deny_hosts: tuple[str, ...] = ()  # names or CIDRs always refused
    allow_file: bool = False
    per_host_concurrency: int = 8
    retries: int = 2
    retry_backoff: float = 0.2  # seconds, doubled per retry
    negative_ttl: float = 30.0
    revalidate_after: float | None = None  # seconds; None: cached entries never expire

    def address_policy(self) -> AddressPolicy:
        return AddressPolicy.create(
            allow_private=self.allow_private,
            allow_hosts=self.allow_hosts,
            deny_hosts=self.deny_hosts,
        )


class _Failure(Exception):
    """One attempt failed; `retryable` says whether trying again may help, `kind` is the
    metrics' name for the reason."""

    def __init__(self, kind: FetchErrorReason, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retryable = retryable


@dataclass
class _Hop:
    body: bytes = b""
    redirect: str | None = None
    not_modified: bool = False
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    body: bytes | None = None
    error: str | None = None


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects a host name only to addresses the guard has checked.

    httpx would otherwise resolve the name again when it connects, and a DNS server that
    answers a public address to our check and 127.0.0.1 to the connect (DNS rebinding)
    would get through. Rewriting the URL to the IP instead would break TLS connection
    reuse across virtual hosts; here httpx keeps the real host name for the Host header,
    SNI and certificate checks, and only the TCP connect is redirected."""

    def __init__(self) -> None:
        self._inner = httpcore.TrioBackend()
        self._pins: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def pin(self, host: str, addresses: Iterable[str]) -> None:
        self._pins[host] = tuple(addresses)
        self._pins.move_to_end(host)
        while len(self._pins) > _MAX_PINNED_HOSTS:
            self._pins.popitem(last=False)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self._pins.get(host.lower())
        if not addresses:
            raise httpcore.ConnectError(f"no checked address for {host}")
        error: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used by the fetcher")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _short(url: str) -> str:
    return url if len(url) <= _URL_IN_MESSAGE else url[:_URL_IN_MESSAGE] + "..."


def _exception_chain(exc: BaseException) -> Iterable[BaseException]:
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(getattr(current, "exceptions", ()))
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _describe_connect_error(exc: BaseException) -> str:
    for inner in _exception_chain(exc):
        if isinstance(inner, ConnectionRefusedError):
            return "connection refused"
    return f"cannot connect ({exc})"


def _read_file(path: str, max_bytes: int) -> bytes:
    """Runs in a worker thread. Reads at most max_bytes + 1 to detect oversize files."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise _Failure(
            "file", f"cannot read file ({exc.strerror or exc})", retryable=False
        ) from None
    if len(data) > max_bytes:
        raise _Failure("too_large", f"larger than {max_bytes} bytes", retryable=False)
    return data


class Fetcher:
    """Fetches image bytes by URL. Use as `async with Fetcher(settings, cache) as f:`; it
    owns one pooled httpx client for its lifetime. The cache, if any, is the caller's."""

    def __init__(
        self,
        settings: FetchSettings | None = None,
        cache: ImageCache | None = None,
        *,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.settings = settings or FetchSettings()
        self.cache = cache
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._policy = self.settings.address_policy()
        self._backend = _PinnedBackend()
        self._client: httpx.AsyncClient | None = None
        self._flights: dict[str, _Flight] = {}
        self._negative: dict[str, tuple[float, str]] = {}
        self._host_limiters: dict[str, trio.CapacityLimiter] = {}
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._counts = dict.fromkeys(
            (
                "hits",
                "misses",
                "fetches",
                "bytes_fetched",
                "errors",
                "negative_hits",
                "shared",
                "revalidated",
                "retries",
            ),
            0,
        )

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        transport = httpx.AsyncHTTPTransport(retries=0)
        # httpx has no argument for a network backend, so swap in a pool built with
        # ours; same options as httpx's own (TLS verification on, HTTP/1.1).
        ssl_context = httpx.create_ssl_context()
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=256,
            max_keepalive_connections=64,
            keepalive_expiry=30.0,
            network_backend=self._backend,
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,  # followed by hand, so each hop is checked
            trust_env=False,  # an environment proxy would bypass the address pinning
            timeout=httpx.Timeout(
                connect=s.connect_timeout,
                read=s.read_timeout,
                write=s.read_timeout,
                pool=s.connect_timeout,
            ),
            headers={
                "User-Agent": "modelgate",
                "Accept": "image/*, */*;q=0.5",
                # Images are compressed already; identity also keeps the byte cap on
                # the bytes received (no gzip bombs).
                "Accept-Encoding": "identity",
            },
        )
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()

    # -- the ImageSource protocol ---------------------------------------------------

    async def fetch(self, url: str) -> bytes:
        """The bytes at `url`, or ImageFetchError("cannot fetch <url>: <reason>")."""
        while True:
            now = trio.current_time()
            remembered = self._negative.get(url)
            if remembered is not None:
                if remembered[0] > now:
                    self._counts["negative_hits"] += 1
                    raise ImageFetchError(remembered[1])
                del self._negative[url]
            flight = self._flights.get(url)
            if flight is None:
                break
            # Someone is already fetching this URL: wait for their result.
            self._counts["shared"] += 1
            await flight.done.wait()
            if flight.body is not None:
                return flight.body
            if flight.error is not None:
                raise ImageFetchError(flight.error)
            # The leader was cancelled before finishing: try again, maybe as leader.

        flight = self._flights[url] = _Flight()
        try:
            flight.body = await self._fetch_uncached_or_cached(url)
            return flight.body
        except _Failure as failure:
            message = f"cannot fetch {_short(url)}: {failure.reason}"
            flight.error = message
            self._counts["errors"] += 1
            self.metrics.image_fetch_errors.labels(failure.kind).inc()
            self._remember_failure(url, message)
            raise ImageFetchError(message) from None
        finally:
            del self._flights[url]
            flight.done.set()

    def forget_failures(self) -> None:
        """Fetch remembered failures anew: an operator retrying failed documents (the
        retryFailed command) has fixed what failed, and says so."""
        self._negative.clear()

    def stats(self) -> dict[str, float]:
        result: dict[str, float] = dict(self._counts)
        ordered = sorted(self._latencies)
        result["latency_p50_ms"] = percentile(ordered, 50) * 1000
        result["latency_p99_ms"] = percentile(ordered, 99) * 1000
        result["in_flight"] = len(self._flights)
        return result

    # -- internals ------------------------------------------------------------------

    def _remember_failure(self, url: str, message: str) -> None:
        if self.settings.negative_ttl <= 0:
            return
        now = trio.current_time()
        if len(self._negative) >= _MAX_NEGATIVE:
            for key in [k for k, (until, _) in self._negative.items() if until <= now]:
                del self._negative[key]
            while len(self._negative) >= _MAX_NEGATIVE:
                del self._negative[next(iter(self._negative))]
        self._negative[url] = (now + self.settings.negative_ttl, message)

    async def _fetch_uncached_or_cached(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            if not self.settings.allow_file:
                raise _Failure(
                    "scheme", "unsupported scheme 'file' (file URLs are disabled)", retryable=False
                )
            return await self._fetch_file(url)
        if scheme not in ("http", "https"):
            raise _Failure("scheme", f"unsupported scheme {scheme!r}", retryable=False)

        entry = await self._cache_get(url)
        if entry is not None:
            age = time.time() - entry.fetched_at
            if self.settings.revalidate_after is None or age < self.settings.revalidate_after:
                self._counts["hits"] += 1
                return entry.body
        else:
            self._counts["misses"] += 1

        try:
            with trio.fail_after(self.settings.total_timeout):
                hop = await self._fetch_with_retries(url, entry)
        except trio.TooSlowError:
            failure = _Failure(
                "timeout",
                f"timed out (no answer within {self.settings.total_timeout:g} s)",
                retryable=True,
            )
            if entry is None:
                raise failure from None
            hop = None
        except _Failure as failure:
            if entry is None or not failure.retryable:
                raise
            hop = None
        if hop is None:
            # Revalidation failed for a transient reason: the stale copy is better
            # than no prediction.
            assert entry is not None
            log.warning("image revalidation failed; serving the cached copy")
            self._counts["hits"] += 1
            return entry.body
        if hop.not_modified and entry is not None:
            self._counts["revalidated"] += 1
            await self._cache_call(self._refresh, url)
            return entry.body
        meta = EntryMeta(
            content_type=hop.content_type,
            etag=hop.etag,
            last_modified=hop.last_modified,
            fetched_at=time.time(),
        )
        await self._cache_call(self._put, url, hop.body, meta)
        return hop.body

    async def _fetch_file(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _Failure("file", "file URLs must name a local path", retryable=False)
        path = url2pathname(parts.path)
        return await trio.to_thread.run_sync(_read_file, path, self.settings.max_bytes)

    async def _fetch_with_retries(self, url: str, entry: CachedEntry | None) -> _Hop:
        attempt = 0
        while True:
            try:
                return await self._follow_redirects(url, entry)
            except _Failure as failure:
                if not failure.retryable or attempt >= self.settings.retries:
                    raise
            await trio.sleep(self.settings.retry_backoff * (2**attempt))
            attempt += 1
            self._counts["retries"] += 1

    async def _follow_redirects(self, url: str, entry: CachedEntry | None) -> _Hop:
        headers: dict[str, str] = {}
        if entry is not None:
            if entry.etag:
                headers["If-None-Match"] = entry.etag
            if entry.last_modified:
                headers["If-Modified-Since"] = entry.last_modified
        current, seen = url, {url}
        limit = self.settings.max_redirects
        for _ in range(limit + 1):
            hop = await self._request(current, headers)
            if hop.redirect is None:
                if hop.not_modified and entry is None:
                    raise _Failure("http", "HTTP 304 to an unconditional request", retryable=False)
                return hop
            current = urljoin(current, hop.redirect)
            if current in seen:
                break
            seen.add(current)
        raise _Failure(
            "redirects",
            f"too many redirects (redirect loop or more than {limit} redirects)",
            retryable=False,
        )

    async def _request(self, url: str, headers: dict[str, str]) -> _Hop:
        """One HTTP request: check the address, connect to it, stream the body."""
        assert self._client is not None, "use `async with Fetcher(...)`"
        try:
            parsed = httpx.URL(url)
            raw_host = parsed.raw_host.decode("ascii").lower()
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise _Failure("invalid_url", f"invalid URL ({exc})", retryable=False) from None
        if parsed.scheme not in ("http", "https"):
            # Also refuses redirects to file:, whatever allow_file says.
            raise _Failure("scheme", f"unsupported scheme {parsed.scheme!r}", retryable=False)
        if not raw_host:
            raise _Failure("invalid_url", "invalid URL (no host)", retryable=False)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = await resolve_checked(raw_host, port, self._policy)
        except PredictionError as exc:
            kind: FetchErrorReason = "blocked" if isinstance(exc, BlockedAddress) else "dns"
            raise _Failure(kind, exc.message, retryable=False) from None
        self._backend.pin(raw_host, addresses)

        limiter = self._host_limiters.get(raw_host)
        if limiter is None:
            limiter = trio.CapacityLimiter(self.settings.per_host_concurrency)
            self._host_limiters[raw_host] = limiter
        started = trio.current_time()
        try:
            async with limiter:
                self._counts["fetches"] += 1
                self.metrics.image_fetches.inc()
                hop = await self._send(parsed, headers)
        finally:
            if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._host_limiters.pop(raw_host, None)
        self._latencies.append(trio.current_time() - started)
        return hop

    async def _send(self, url: httpx.URL, headers: dict[str, str]) -> _Hop:
        assert self._client is not None
        cap = self.settings.max_bytes
        try:
            async with self._client.stream("GET", url, headers=headers) as response:
                status = response.status_code
                if status in _REDIRECTS and "location" in response.headers:
                    return _Hop(redirect=response.headers["location"])
                if status == 304:
                    return _Hop(not_modified=True)
                if status >= 500:
                    raise _Failure("http_5xx", f"HTTP {status}", retryable=True)
                if not 200 <= status < 300:
                    kind: FetchErrorReason = "http_4xx" if 400 <= status < 500 else "http"
                    raise _Failure(kind, f"HTTP {status}", retryable=False)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cap:
                    raise _Failure("too_large", f"larger than {cap} bytes", retryable=False)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        # Leaving the `stream` block closes the connection mid-body.
                        raise _Failure("too_large", f"larger than {cap} bytes", retryable=False)
                    chunks.append(chunk)
                self._counts["bytes_fetched"] += size
                return _Hop(
                    body=b"".join(chunks),
                    content_type=response.headers.get("content-type"),
                    etag=response.headers.get("etag"),
                    last_modified=response.headers.get("last-modified"),
                )
        except httpx.TimeoutException:
            raise _Failure("timeout", "timed out", retryable=True) from None
        except httpx.ConnectError as exc:
            raise _Failure("connect", _describe_connect_error(exc), retryable=True) from None
        except httpx.TransportError as exc:
            reason = f"network error ({exc or type(exc).__name__})"
            raise _Failure("network", reason, retryable=True) from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise _Failure("http", f"HTTP error ({exc})", retryable=False) from None

    # -- cache calls (worker threads; a broken cache degrades to no cache) ----------

    async def _cache_get(self, url: str) -> CachedEntry | None:
        if self.cache is None:
            return None
        try:
            return await trio.to_thread.run_sync(self.cache.get, url)
        except CacheError as exc:
            log.warning("image cache read failed: %s", exc.message)
            return None

    async def _cache_call(self, function: Any, *args: Any) -> None:
        if self.cache is None:
            return
        try:
            await trio.to_thread.run_sync(function, *args)
        except CacheError as exc:
            log.warning("image cache write failed: %s", exc.message)

    def _put(self, url: str, body: bytes, meta: EntryMeta) -> None:
        assert self.cache is not None
        self.cache.put(url, body, meta)

    def _refresh(self, url: str) -> None:
        assert self.cache is not None
        self.cache.refresh(url)
