"""The one settings object: built from CLI flags and MODELGATE_* environment variables,
then passed explicitly to whatever needs it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.deferred import DeferredSettings
from engine.fetch import FetchSettings
from engine.runtime import RuntimeSettings

__all__ = ["Settings", "add_serve_arguments", "parse_host_port"]

DEFAULT_LISTEN = "127.0.0.1:27017"


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MODELGATE_{name}", default)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _env_flag(name: str) -> bool:
    return (_env(name) or "").lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, int] = ("127.0.0.1", 27017)
    upstream: str | None = None
    data_dir: Path = Path("modelgate-data")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_period: float = 10.0
    connect_timeout: float = 5.0
    log_level: str = "INFO"
    registry_refresh: float = 2.0
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    deferred: DeferredSettings = field(default_factory=DeferredSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    cache_dir: Path | None = None  # None: <data_dir>/image-cache
    cache_size: int = 1 << 30

    @property
    def image_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "image-cache"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            listen=parse_host_port(args.listen),
            upstream=args.upstream or None,
            data_dir=Path(args.data_dir),
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            grace_period=args.grace_period,
            connect_timeout=args.connect_timeout,
            log_level=args.log_level.upper(),
            registry_refresh=args.registry_refresh,
            runtime=RuntimeSettings(
                providers=tuple(args.providers.split(",")) if args.providers else None,
                tensorrt=args.tensorrt,
                intra_op_threads=args.intra_op_threads,
                inter_op_threads=args.inter_op_threads,
                max_concurrent_runs=args.max_concurrent_runs,
            ),
            deferred=DeferredSettings(
                change_streams=args.change_streams,
                sweep_interval=args.sweep_interval,
                lease_seconds=args.lease_seconds,
                max_attempts=args.max_attempts,
                retry_backoff=args.retry_backoff,
                progress_interval=args.progress_interval,
            ),
            fetch=FetchSettings(
                connect_timeout=args.fetch_connect_timeout,
                read_timeout=args.fetch_read_timeout,
                total_timeout=args.fetch_timeout,
                max_bytes=args.fetch_max_bytes,
                max_redirects=args.fetch_max_redirects,
                allow_private=args.fetch_allow_private,
                allow_hosts=_split(args.fetch_allow_hosts),
                deny_hosts=_split(args.fetch_deny_hosts),
                allow_file=args.fetch_allow_file,
                revalidate_after=args.cache_revalidate_after,
            ),
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            cache_size=args.cache_size,
        )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `modelgate serve`; each defaults to its MODELGATE_* variable."""
    parser.add_argument(
        "--listen",
        default=_env("LISTEN", DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help="address to accept MongoDB clients on (MODELGATE_LISTEN; default %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        default=_env("UPSTREAM"),
        metavar="URI",
        help="MongoDB URI to forward to, e.g. mongodb://db1:27017/?replicaSet=rs0 "
        "(MODELGATE_UPSTREAM). Without it, an embedded SecantusDB is started "
        "(needs the 'embedded' extra) with its data under --data-dir.",
    )
    parser.add_argument(
        "--data-dir",
        default=_env("DATA_DIR", "modelgate-data"),
        metavar="DIR",
        help="folder for the embedded upstream's data and the image cache "
        "(MODELGATE_DATA_DIR; default %(default)s)",
    )
    parser.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT"),
        metavar="PEM",
        help="serve TLS to clients with this certificate chain (MODELGATE_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=_env("TLS_KEY"),
        metavar="PEM",
        help="private key for --tls-cert (MODELGATE_TLS_KEY)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=float(_env("GRACE_PERIOD", "10") or 10),
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long requests in flight may take to finish "
        "(MODELGATE_GRACE_PERIOD; default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=float(_env("CONNECT_TIMEOUT", "5") or 5),
        metavar="SECONDS",
        help="how long to wait for the upstream before closing a client's connection "
        "(MODELGATE_CONNECT_TIMEOUT; default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
        help="(MODELGATE_LOG_LEVEL; default %(default)s)",
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--providers",
        default=_env("PROVIDERS"),
        metavar="LIST",
        help="onnxruntime execution providers in order of preference, comma-separated "
        "(MODELGATE_PROVIDERS; default: CUDA when available, else CPU)",
    )
    models.add_argument(
        "--tensorrt",
        action="store_true",
        default=_env_flag("TENSORRT"),
        help="prefer the TensorRT execution provider where it is available (MODELGATE_TENSORRT=1)",
    )
    models.add_argument(
        "--intra-op-threads",
        type=int,
        default=int(_env("INTRA_OP_THREADS", "0") or 0),
        metavar="N",
        help="onnxruntime threads per run; 0 = onnxruntime's choice (MODELGATE_INTRA_OP_THREADS)",
    )
    models.add_argument(
        "--inter-op-threads",
        type=int,
        default=int(_env("INTER_OP_THREADS", "0") or 0),
        metavar="N",
        help="(MODELGATE_INTER_OP_THREADS)",
    )
    models.add_argument(
        "--max-concurrent-runs",
        type=int,
        default=int(_env("MAX_CONCURRENT_RUNS", "2") or 2),
        metavar="N",
        help="model runs at once across all models (MODELGATE_MAX_CONCURRENT_RUNS; "
        "default %(default)s)",
    )
    models.add_argument(
        "--registry-refresh",
        type=float,
        default=float(_env("REGISTRY_REFRESH", "2") or 2),
        metavar="SECONDS",
        help="how often to pick up models registered through other "
        "modelgate processes (MODELGATE_REGISTRY_REFRESH; default %(default)s)",
    )
    deferred = parser.add_argument_group("deferred models")
    deferred.add_argument(
        "--no-change-streams",
        dest="change_streams",
        action="store_false",
        default=(_env("CHANGE_STREAMS", "1") or "1").lower() not in {"0", "false", "no", "off"},
        help="find writes made around the proxy by the periodic sweep only, without change "
        "streams (MODELGATE_CHANGE_STREAMS=0)",
    )
    deferred.add_argument(
        "--sweep-interval",
        type=float,
        default=float(_env("SWEEP_INTERVAL", "5") or 5),
        metavar="SECONDS",
        help="how often each deferred model looks for pending documents "
        "when nothing woke it (MODELGATE_SWEEP_INTERVAL; default %(default)s)",
    )
    deferred.add_argument(
        "--lease-seconds",
        type=float,
        default=float(_env("LEASE_SECONDS", "30") or 30),
        metavar="SECONDS",
        help="how long a claim on a document lasts before another process "
        "may take it over (MODELGATE_LEASE_SECONDS; default %(default)s)",
    )
    deferred.add_argument(
        "--max-attempts",
        type=int,
        default=int(_env("MAX_ATTEMPTS", "3") or 3),
        metavar="N",
        help="attempts before a failing document gets an error record "
        "(MODELGATE_MAX_ATTEMPTS; default %(default)s)",
    )
    deferred.add_argument(
        "--progress-interval",
        type=float,
        default=float(_env("PROGRESS_INTERVAL", "10") or 10),
        metavar="SECONDS",
        help="how often a long deferred backfill logs its progress "
        "(MODELGATE_PROGRESS_INTERVAL; default %(default)s)",
    )
    deferred.add_argument(
        "--retry-backoff",
        type=float,
        default=float(_env("RETRY_BACKOFF", "1") or 1),
        metavar="SECONDS",
        help="first retry delay, doubled each attempt "
        "(MODELGATE_RETRY_BACKOFF; default %(default)s)",
    )
    images = parser.add_argument_group("image URLs")
    images.add_argument(
        "--cache-dir",
        default=_env("CACHE_DIR"),
        metavar="DIR",
        help="LMDB cache of fetched images, shared by the modelgate processes of a host "
        "(MODELGATE_CACHE_DIR; default <data-dir>/image-cache)",
    )
    images.add_argument(
        "--cache-size",
        type=int,
        default=int(_env("CACHE_SIZE", str(1 << 30)) or 1 << 30),
        metavar="BYTES",
        help="bound on cached image bytes; least recently used go first "
        "(MODELGATE_CACHE_SIZE; default 1 GiB)",
    )
    images.add_argument(
        "--cache-revalidate-after",
        type=float,
        default=float(_env("CACHE_REVALIDATE_AFTER") or 0) or None,
        metavar="SECONDS",
        help="revalidate cached images older than this with their ETag/Last-Modified "
        "(MODELGATE_CACHE_REVALIDATE_AFTER; default: never)",
    )
    images.add_argument(
        "--fetch-allow-private",
        action="store_true",
        default=_env_flag("FETCH_ALLOW_PRIVATE"),
        help="allow image URLs on private and loopback addresses (MODELGATE_FETCH_ALLOW_PRIVATE=1)"
        "; cloud metadata addresses are never fetched",
    )
    images.add_argument(
        "--fetch-allow-hosts",
        default=_env("FETCH_ALLOW_HOSTS"),
        metavar="LIST",
        help="hosts and CIDR ranges allowed even if private, comma-separated "
        "(MODELGATE_FETCH_ALLOW_HOSTS)",
    )
    images.add_argument(
        "--fetch-deny-hosts",
        default=_env("FETCH_DENY_HOSTS"),
        metavar="LIST",
        help="hosts and CIDR ranges never fetched, comma-separated (MODELGATE_FETCH_DENY_HOSTS)",
    )
    images.add_argument(
        "--fetch-allow-file",
        action="store_true",
        default=_env_flag("FETCH_ALLOW_FILE"),
        help="allow file:// image URLs (MODELGATE_FETCH_ALLOW_FILE=1)",
    )
    images.add_argument(
        "--fetch-timeout",
        type=float,
        default=float(_env("FETCH_TIMEOUT", "30") or 30),
        metavar="SECONDS",
        help="total time for one image fetch, retries included "
        "(MODELGATE_FETCH_TIMEOUT; default %(default)s)",
    )
    images.add_argument(
        "--fetch-connect-timeout",
        type=float,
        default=float(_env("FETCH_CONNECT_TIMEOUT", "5") or 5),
        metavar="SECONDS",
        help="(MODELGATE_FETCH_CONNECT_TIMEOUT; default %(default)s)",
    )
    images.add_argument(
        "--fetch-read-timeout",
        type=float,
        default=float(_env("FETCH_READ_TIMEOUT", "10") or 10),
        metavar="SECONDS",
        help="(MODELGATE_FETCH_READ_TIMEOUT; default %(default)s)",
    )
    images.add_argument(
        "--fetch-max-bytes",
        type=int,
        default=int(_env("FETCH_MAX_BYTES", "20000000") or 20_000_000),
        metavar="BYTES",
        help="largest image body fetched (MODELGATE_FETCH_MAX_BYTES; default %(default)s)",
    )
    images.add_argument(
        "--fetch-max-redirects",
        type=int,
        default=int(_env("FETCH_MAX_REDIRECTS", "5") or 5),
        metavar="N",
        help="(MODELGATE_FETCH_MAX_REDIRECTS; default %(default)s)",
    )
