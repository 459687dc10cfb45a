"""The one settings object: built from CLI flags and MODELGATE_* environment variables,
then passed explicitly to whatever needs it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.deferred import DeferredSettings
from engine.fetch import FetchSettings
from engine.runtime import RuntimeSettings

__all__ = ["Settings", "add_serve_arguments", "non_negative", "parse_host_port", "positive"]

DEFAULT_LISTEN = "127.0.0.1:27017"


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _variable(flag: str) -> str:
    """The environment variable that gives a flag its default: --cache-dir ->
    MODELGATE_CACHE_DIR."""
    return "MODELGATE_" + flag.removeprefix("--").replace("-", "_").upper()


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
            listen=args.listen,
            upstream=args.upstream or None,
            data_dir=Path(args.data_dir),
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            grace_period=args.grace_period,
            connect_timeout=args.connect_timeout,
            log_level=args.log_level,
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


def _option(
    group: argparse._ActionsContainer,
    flag: str,
    help: str,
    *,
    type: Callable[[str], Any] = str,
    default: str | None = None,
    metavar: str | None = None,
    shown_default: str | None = None,
) -> None:
    """A flag whose default comes from MODELGATE_<FLAG> (argparse converts it, so a bad
    environment value is reported like a bad flag)."""
    variable = _variable(flag)
    shown = shown_default or ("%(default)s" if default is not None else None)
    note = f"{variable}; default {shown}" if shown else variable
    group.add_argument(
        flag,
        type=type,
        default=os.environ.get(variable, default),
        metavar=metavar,
        help=f"{help} ({note})" if help else f"({note})",
    )


def _switch(group: argparse._ActionsContainer, flag: str, help: str) -> None:
    """An on/off flag, also turned on by MODELGATE_<FLAG>=1."""
    variable = _variable(flag)
    group.add_argument(
        flag,
        action="store_true",
        default=os.environ.get(variable, "").lower() in {"1", "true", "yes", "on"},
        help=f"{help} ({variable}=1)",
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `modelgate serve`; each defaults to its MODELGATE_* variable."""
    _option(
        parser,
        "--listen",
        "address to accept MongoDB clients on",
        type=parse_host_port,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
    )
    _option(
        parser,
        "--upstream",
        "MongoDB URI to forward to, e.g. "
        "mongodb://db1:27017/?replicaSet=rs0. Without it, an embedded SecantusDB is "
        "started (needs the 'embedded' extra) with its data under --data-dir",
        metavar="URI",
    )
    _option(
        parser,
        "--data-dir",
        "folder for the embedded upstream's data and the image cache",
        default="modelgate-data",
        metavar="DIR",
    )
    _option(parser, "--tls-cert", "serve TLS to clients with this certificate chain", metavar="PEM")
    _option(parser, "--tls-key", "private key for --tls-cert", metavar="PEM")
    _option(
        parser,
        "--grace-period",
        "on SIGINT/SIGTERM, how long requests in flight may take to finish",
        type=non_negative(float),
        default="10",
        metavar="SECONDS",
    )
    _option(
        parser,
        "--connect-timeout",
        "how long to wait for the upstream before closing a client's connection",
        type=positive(float),
        default="5",
        metavar="SECONDS",
    )
    _option(
        parser,
        "--log-level",
        "DEBUG, INFO, WARNING or ERROR",
        type=_log_level,
        default="INFO",
        metavar="LEVEL",
    )

    models = parser.add_argument_group("models")
    _option(
        models,
        "--providers",
        "onnxruntime execution providers in order of preference, comma-separated",
        metavar="LIST",
        shown_default="CUDA when available, else CPU",
    )
    _switch(models, "--tensorrt", "prefer the TensorRT execution provider where available")
    _option(
        models,
        "--intra-op-threads",
        "onnxruntime threads per run; 0: onnxruntime's choice",
        type=non_negative(int),
        default="0",
        metavar="N",
    )
    _option(models, "--inter-op-threads", "", type=non_negative(int), default="0", metavar="N")
    _option(
        models,
        "--max-concurrent-runs",
        "model runs at once across all models",
        type=positive(int),
        default="2",
        metavar="N",
    )
    _option(
        models,
        "--registry-refresh",
        "how often to pick up models registered through other modelgate processes",
        type=positive(float),
        default="2",
        metavar="SECONDS",
    )

    deferred = parser.add_argument_group("deferred models")
    deferred.add_argument(
        "--no-change-streams",
        dest="change_streams",
        action="store_false",
        default=os.environ.get("MODELGATE_CHANGE_STREAMS", "1").lower()
        not in {"0", "false", "no", "off"},
        help="find writes made around the proxy by the periodic sweep only, without change "
        "streams (MODELGATE_CHANGE_STREAMS=0)",
    )
    _option(
        deferred,
        "--sweep-interval",
        "how often each deferred model looks for pending documents when nothing woke it",
        type=positive(float),
        default="5",
        metavar="SECONDS",
    )
    _option(
        deferred,
        "--lease-seconds",
        "lease on claimed documents, renewed while they are worked on: how soon "
        "another process takes over the claims of one that died",
        type=positive(float),
        default="30",
        metavar="SECONDS",
    )
    _option(
        deferred,
        "--max-attempts",
        "attempts before a failing document gets an error record",
        type=positive(int),
        default="3",
        metavar="N",
    )
    _option(
        deferred,
        "--retry-backoff",
        "first retry delay, doubled each attempt; the retry runs at the first sweep or "
        "write after it",
        type=non_negative(float),
        default="1",
        metavar="SECONDS",
    )
    _option(
        deferred,
        "--progress-interval",
        "how often a long deferred backfill logs its progress",
        type=positive(float),
        default="10",
        metavar="SECONDS",
    )

    images = parser.add_argument_group("image URLs")
    _option(
        images,
        "--cache-dir",
        "LMDB cache of fetched images, shared by the modelgate processes of a host",
        metavar="DIR",
        shown_default="<data-dir>/image-cache",
    )
    _option(
        images,
        "--cache-size",
        "bound on cached image bytes; least recently used go first",
        type=positive(int),
        default=str(1 << 30),
        metavar="BYTES",
    )
    _option(
        images,
        "--cache-revalidate-after",
        "revalidate cached images older than this with their ETag/Last-Modified",
        type=positive(float),
        metavar="SECONDS",
        shown_default="never",
    )
    _switch(
        images,
        "--fetch-allow-private",
        "allow image URLs on private and loopback "
        "addresses; cloud metadata addresses are never fetched",
    )
    _option(
        images,
        "--fetch-allow-hosts",
        "hosts and CIDR ranges allowed even if private, comma-separated",
        metavar="LIST",
    )
    _option(
        images,
        "--fetch-deny-hosts",
        "hosts and CIDR ranges never fetched, comma-separated",
        metavar="LIST",
    )
    _switch(images, "--fetch-allow-file", "allow file:// image URLs")
    _option(
        images,
        "--fetch-timeout",
        "total time for one image fetch, retries included",
        type=positive(float),
        default="30",
        metavar="SECONDS",
    )
    _option(
        images, "--fetch-connect-timeout", "", type=positive(float), default="5", metavar="SECONDS"
    )
    _option(
        images, "--fetch-read-timeout", "", type=positive(float), default="10", metavar="SECONDS"
    )
    _option(
        images,
        "--fetch-max-bytes",
        "largest image body fetched",
        type=positive(int),
        default="20000000",
        metavar="BYTES",
    )
    _option(images, "--fetch-max-redirects", "", type=non_negative(int), default="5", metavar="N")


def _number(convert: Callable[[str], Any], *, allow_zero: bool) -> Callable[[str], Any]:
    """An argparse type for a count or a duration, refusing what cannot mean anything."""
    bound = "zero or more" if allow_zero else "more than zero"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return value

    return parse


def positive(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return _number(convert, allow_zero=False)


def non_negative(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return _number(convert, allow_zero=True)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise argparse.ArgumentTypeError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level
