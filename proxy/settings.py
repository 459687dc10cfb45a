"""The one settings object, and the one table that declares how each setting is given.

Each `Option` names a field of `Settings` (or of its runtime/deferred/fetch parts), how its
text is read and checked, its flag, its MODELGATE_* variable and its help. Defaults are never
written here: they are the dataclass defaults, read through the field path. A value is taken
from the flag, else the variable, else the default; a further source (a config file) is one
more step in `load_settings`, and printing the effective values is `Option.show` over
`OPTIONS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.deferred import DeferredSettings
from engine.fetch import FetchSettings
from engine.runtime import RuntimeSettings

__all__ = [
    "OPTIONS",
    "InvalidSetting",
    "Option",
    "Settings",
    "add_serve_arguments",
    "load_settings",
    "non_negative",
    "parse_host_port",
    "positive",
]


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, int] = ("127.0.0.1", 27017)
    upstream: str | None = None  # None: start an embedded SecantusDB
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
    metrics_listen: tuple[str, int] | None = None  # None: no metrics/health listener
    log_format: str = "text"
    slow_ms: float = 100.0

    @property
    def image_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "image-cache"


_DEFAULTS = Settings()


class InvalidSetting(ValueError):
    """A flag or variable whose value cannot mean anything; worded like argparse's own
    refusals ("argument --FLAG: ...")."""


# Readers of a setting's text: each returns the value or raises ArgumentTypeError.


def _number(convert: Callable[[str], Any], *, allow_zero: bool) -> Callable[[str], Any]:
    """A count or a duration, refusing what cannot mean anything."""
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


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _host_port_text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise argparse.ArgumentTypeError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


def _log_format(text: str) -> str:
    if text.lower() not in {"text", "json"}:
        raise argparse.ArgumentTypeError(f"expected text or json, got {text!r}")
    return text.lower()


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _on_off(text: str) -> bool:
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"expected 1 or 0, got {text!r}")


def _text(value: Any) -> str:
    """A value written back the way it is given, for --help (and a printed config)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class Option:
    """One setting as users give it. A bool field is a switch: its flag turns the default
    around (`--tensorrt`, `--no-change-streams`) and its variable takes 1 or 0."""

    name: str  # --NAME (--no-NAME for a switch that is on by default) and MODELGATE_NAME
    field: str  # dotted path in Settings: "deferred.sweep_interval"
    help: str
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    show: Callable[[Any], str] = _text
    shown_default: str | None = None  # for a default that means something: "never"

    @property
    def default(self) -> Any:
        value: Any = _DEFAULTS
        for part in self.field.split("."):
            value = getattr(value, part)
        return value

    @property
    def is_switch(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def flag(self) -> str:
        return f"--no-{self.name}" if self.default is True else f"--{self.name}"

    @property
    def variable(self) -> str:
        return "MODELGATE_" + self.name.replace("-", "_").upper()

    def read(self, text: str, origin: str) -> Any:
        """The value of `text`; `origin` ends the message of a refusal."""
        try:
            return (_on_off if self.is_switch else self.parse)(text)
        except argparse.ArgumentTypeError as exc:
            raise InvalidSetting(f"argument {self.flag}: {exc}{origin}") from None

    def help_text(self) -> str:
        if self.is_switch:
            note = f"{self.variable}={_text(not self.default)}"
        else:
            shown = self.shown_default or ("" if self.default is None else self.show(self.default))
            note = f"{self.variable}; default {shown}" if shown else self.variable
        return f"{self.help} ({note})" if self.help else f"({note})"


# Argument groups of `modelgate serve --help` (None: the general one), in the order shown.
_GROUPS: dict[str | None, tuple[Option, ...]] = {
    None: (
        Option(
            "listen",
            "listen",
            "address to accept MongoDB clients on",
            parse_host_port,
            "HOST:PORT",
            show=_host_port_text,
        ),
        Option(
            "upstream",
            "upstream",
            "MongoDB URI to forward to, e.g. mongodb://db1:27017/?replicaSet=rs0. Without it, "
            "an embedded SecantusDB is started (needs the 'embedded' extra) with its data "
            "under --data-dir",
            metavar="URI",
        ),
        Option(
            "data-dir",
            "data_dir",
            "folder for the embedded upstream's data and the image cache",
            Path,
            "DIR",
        ),
        Option(
            "tls-cert",
            "tls_cert",
            "serve TLS to clients with this certificate chain",
            Path,
            "PEM",
        ),
        Option("tls-key", "tls_key", "private key for --tls-cert", Path, "PEM"),
        Option(
            "grace-period",
            "grace_period",
            "on SIGINT/SIGTERM, how long requests in flight may take to finish",
            non_negative(float),
            "SECONDS",
        ),
        Option(
            "connect-timeout",
            "connect_timeout",
            "how long to wait for the upstream before closing a client's connection",
            positive(float),
            "SECONDS",
        ),
        Option("log-level", "log_level", "DEBUG, INFO, WARNING or ERROR", _log_level, "LEVEL"),
    ),
    "operations": (
        Option(
            "metrics-listen",
            "metrics_listen",
            "serve Prometheus /metrics and the /healthz and /readyz probes over HTTP here",
            parse_host_port,
            "HOST:PORT",
            show=_host_port_text,
            shown_default="off",
        ),
        Option(
            "log-format",
            "log_format",
            "text, or json: one JSON object per line",
            _log_format,
            "FORMAT",
        ),
        Option(
            "slow-ms",
            "slow_ms",
            "log requests whose round trip through modelgate takes longer than this",
            positive(float),
            "MS",
        ),
    ),
    "models": (
        Option(
            "providers",
            "runtime.providers",
            "onnxruntime execution providers in order of preference, comma-separated",
            _names,
            "LIST",
            shown_default="CUDA when available, else CPU",
        ),
        Option(
            "tensorrt",
            "runtime.tensorrt",
            "prefer the TensorRT execution provider where available",
        ),
        Option(
            "intra-op-threads",
            "runtime.intra_op_threads",
            "onnxruntime threads per run; 0: onnxruntime's choice",
            non_negative(int),
            "N",
        ),
        Option(
            "inter-op-threads",
            "runtime.inter_op_threads",
            "",
            non_negative(int),
            "N",
        ),
        Option(
            "max-concurrent-runs",
            "runtime.max_concurrent_runs",
            "model runs at once across all models",
            positive(int),
            "N",
        ),
        Option(
            "registry-refresh",
            "registry_refresh",
            "how often to pick up models registered through other modelgate processes",
            positive(float),
            "SECONDS",
        ),
    ),
    "deferred models": (
        Option(
            "change-streams",
            "deferred.change_streams",
            "find writes made around the proxy by the periodic sweep only, without change streams",
        ),
        Option(
            "sweep-interval",
            "deferred.sweep_interval",
            "how often each deferred model looks for pending documents when nothing woke it",
            positive(float),
            "SECONDS",
        ),
        Option(
            "lease-seconds",
            "deferred.lease_seconds",
            "lease on claimed documents, renewed while they are worked on: how soon another "
            "process takes over the claims of one that died",
            positive(float),
            "SECONDS",
        ),
        Option(
            "max-attempts",
            "deferred.max_attempts",
            "attempts before a failing document gets an error record",
            positive(int),
            "N",
        ),
        Option(
            "retry-backoff",
            "deferred.retry_backoff",
            "first retry delay, doubled each attempt; the retry runs at the first sweep or "
            "write after it",
            non_negative(float),
            "SECONDS",
        ),
        Option(
            "progress-interval",
            "deferred.progress_interval",
            "how often a long deferred backfill logs its progress",
            positive(float),
            "SECONDS",
        ),
    ),
    "image URLs": (
        Option(
            "cache-dir",
            "cache_dir",
            "LMDB cache of fetched images, shared by the modelgate processes of a host",
            Path,
            "DIR",
            shown_default="<data-dir>/image-cache",
        ),
        Option(
            "cache-size",
            "cache_size",
            "bound on cached image bytes; least recently used go first",
            positive(int),
            "BYTES",
        ),
        Option(
            "cache-revalidate-after",
            "fetch.revalidate_after",
            "revalidate cached images older than this with their ETag/Last-Modified",
            positive(float),
            "SECONDS",
            shown_default="never",
        ),
        Option(
            "fetch-allow-private",
            "fetch.allow_private",
            "allow image URLs on private and loopback addresses; cloud metadata addresses "
            "are never fetched",
        ),
        Option(
            "fetch-allow-hosts",
            "fetch.allow_hosts",
            "hosts and CIDR ranges allowed even if private, comma-separated",
            _names,
            "LIST",
        ),
        Option(
            "fetch-deny-hosts",
            "fetch.deny_hosts",
            "hosts and CIDR ranges never fetched, comma-separated",
            _names,
            "LIST",
        ),
        Option("fetch-allow-file", "fetch.allow_file", "allow file:// image URLs"),
        Option(
            "fetch-timeout",
            "fetch.total_timeout",
            "total time for one image fetch, retries included",
            positive(float),
            "SECONDS",
        ),
        Option("fetch-connect-timeout", "fetch.connect_timeout", "", positive(float), "SECONDS"),
        Option("fetch-read-timeout", "fetch.read_timeout", "", positive(float), "SECONDS"),
        Option(
            "fetch-max-bytes",
            "fetch.max_bytes",
            "largest image body fetched",
            positive(int),
            "BYTES",
        ),
        Option("fetch-max-redirects", "fetch.max_redirects", "", non_negative(int), "N"),
    ),
}

OPTIONS: tuple[Option, ...] = tuple(option for group in _GROUPS.values() for option in group)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `modelgate serve`, one per option. They keep the text as given and set
    nothing when absent: `load_settings` reads the text and falls back to the variable."""
    for title, options in _GROUPS.items():
        group = parser if title is None else parser.add_argument_group(title)
        for option in options:
            # A switch's flag stands for the text its variable would take to turn it around.
            takes: dict[str, Any] = (
                {"action": "store_const", "const": _text(not option.default)}
                if option.is_switch
                else {"metavar": option.metavar}
            )
            group.add_argument(
                option.flag,
                dest=option.name,
                default=argparse.SUPPRESS,
                help=option.help_text(),
                **takes,
            )


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Each setting from its flag, else its MODELGATE_* variable, else its dataclass default.
    An empty value stands for the default (`MODELGATE_UPSTREAM=` keeps the embedded one)."""
    flags = vars(args)
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in flags:
            text, origin = flags[option.name], ""
        elif option.variable in environ:
            text, origin = environ[option.variable], f" (from {option.variable})"
        else:
            continue
        if text:
            values[option.field] = option.read(text, origin)
    return _settings_with(values)


def _settings_with(values: Mapping[str, Any]) -> Settings:
    """The default Settings with the fields named by dotted paths replaced."""
    parts: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        part, _, name = path.rpartition(".")
        parts.setdefault(part, {})[name] = value
    nested = {
        part: replace(getattr(_DEFAULTS, part), **fields) for part, fields in parts.items() if part
    }
    return replace(_DEFAULTS, **parts.get("", {}), **nested)
