"""The one settings object, and the one table that declares how each setting is given.

Each `Option` names a field of `Settings` (or of its parts), how its text is read, its
flag, MODELGATE_* variable, settings-file key and help. Defaults are the dataclass
defaults, read through the field path. Where values come from: `proxy.settings_sources`.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.deferred import DeferredSettings
from engine.fetch import FetchSettings
from engine.runtime import RuntimeSettings
from engine.search.keeper import SearchSettings

__all__ = [
    "CONFIG_VARIABLE",
    "GROUPS",
    "OPTIONS",
    "InvalidSetting",
    "ModelSourceSettings",
    "Option",
    "Settings",
    "add_serve_arguments",
    "masked_uri",
    "non_negative",
    "parse_host_port",
    "positive",
]


@dataclass(frozen=True)
class ModelSourceSettings:
    """Where registerModel may take a model's bytes from, and how large one may be."""

    # registerModel's `path` must name a regular file under it; None: `path` is refused.
    directory: Path | None = None
    # Sized for ResNet-50-class models (~100 MB) with room to spare; the bound on what one
    # registration makes the proxy hold in memory, whatever the source.
    max_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, int] = ("127.0.0.1", 27017)
    upstream: str | None = None  # None: start an embedded SecantusDB
    data_dir: Path = Path("modelgate-data")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_period: float = 10.0
    connect_timeout: float = 5.0
    # Bounds the sockets, memory and upstream connections a flood of clients takes (README
    # "Limits" says why 10,000).
    max_connections: int = 10_000
    frame_timeout: float = 30.0
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
    model_sources: ModelSourceSettings = field(default_factory=ModelSourceSettings)
    search_mode: str = "serve"  # or "passthrough" (see the option)
    search_dir: Path | None = None  # None: <data_dir>/search-indexes
    search: SearchSettings = field(default_factory=SearchSettings)

    @property
    def image_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "image-cache"

    @property
    def search_index_dir(self) -> Path:
        return self.search_dir or self.data_dir / "search-indexes"


_DEFAULTS = Settings()


class InvalidSetting(ValueError):
    """A value that cannot mean anything, worded as argparse refuses ("argument --FLAG: ...")."""


@dataclass(frozen=True)
class _Number:
    """A count or a duration, refusing what cannot mean anything."""

    convert: Callable[[str], Any]
    allow_zero: bool

    def __call__(self, text: str) -> Any:
        try:
            value = self.convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < 0 or (value == 0 and not self.allow_zero):
            bound = "zero or more" if self.allow_zero else "more than zero"
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return value


positive = functools.partial(_Number, allow_zero=False)
non_negative = functools.partial(_Number, allow_zero=True)


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _host_port_text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Secrets a MongoDB URI may carry in its query: key-file passwords, AWS session tokens.
_URI_QUERY_SECRETS = re.compile(r"(?i)([?&][^=&]*password=|AWS_SESSION_TOKEN:)[^&,]*")


def masked_uri(uri: str) -> str:
    """`uri` with its secrets as ****: the password of its user info
    (mongodb://user:****@host/) and the secrets its options may hold."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    # As drivers read it: the user info ends at the last "@" before the first "/".
    hosts, slash, tail = rest.partition("/")
    userinfo, at, host_list = hosts.rpartition("@")
    if at and ":" in userinfo:
        hosts = f"{userinfo.partition(':')[0]}:****@{host_list}"
    tail = _URI_QUERY_SECRETS.sub(r"\1****", tail)
    return f"{scheme}://{hosts}{slash}{tail}"


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise argparse.ArgumentTypeError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


def _one_of(*choices: str) -> Callable[[str], str]:
    def read(text: str) -> str:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(choices)}, got {text!r}")
        return text.lower()

    return read


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


# What a config file's value must be, as refusals say it.
_FILE_TYPES: dict[type, str] = {
    bool: "true or false",
    float: "a number",
    list: "a list of strings",
    str: "a string",
}


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
        return self.value_in(_DEFAULTS)

    def value_in(self, settings: Settings) -> Any:
        value: Any = settings
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

    @property
    def file_type(self) -> type:
        """The TOML type of its value in a config file: bool for a switch, float for a
        number (an integer will do), list (of strings) for a LIST, else str."""
        if self.is_switch:
            return bool
        if isinstance(self.parse, _Number):
            return float
        return list if self.parse is _names else str

    def text_in_file(self, value: Any, origin: str) -> str:
        """The text that a config file's `value` stands for, refused unless of `file_type`."""
        given = type(value)
        expected = self.file_type
        fits = given is expected or (expected is float and given is int)
        if expected is list and fits:
            fits = all(type(item) is str for item in value)
        if not fits:
            raise InvalidSetting(
                f"argument {self.flag}: expected {_FILE_TYPES[expected]}, got {value!r}{origin}"
            )
        return _text(tuple(value) if expected is list else value)

    def help_text(self) -> str:
        if self.is_switch:
            note = f"{self.variable}={_text(not self.default)}"
        else:
            shown = self.shown_default or ("" if self.default is None else self.show(self.default))
            note = f"{self.variable}; default {shown}" if shown else self.variable
        return f"{self.help} ({note})" if self.help else f"({note})"


# Argument groups of `modelgate serve --help` (None: the general one), in the order shown.
GROUPS: dict[str | None, tuple[Option, ...]] = {
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
            show=masked_uri,
            shown_default="embedded SecantusDB",
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
    "limits": (
        Option(
            "max-connections",
            "max_connections",
            "client connections served at once; past it new ones are closed at once",
            positive(int),
            "N",
        ),
        Option(
            "frame-timeout",
            "frame_timeout",
            "time a client has to send the rest of a message (or a TLS handshake) once it has "
            "begun; past it the connection is closed. Idle connections are not affected",
            positive(float),
            "SECONDS",
        ),
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
            _one_of("text", "json"),
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
            "onnxruntime threads per run; 0: the usable cores / --max-concurrent-runs",
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
            "model-dir",
            "model_sources.directory",
            "registerModel's 'path' may name regular files under this folder (symlinks "
            "leading out of it refused)",
            Path,
            "DIR",
            shown_default="off: 'path' is refused",
        ),
        Option(
            "max-model-bytes",
            "model_sources.max_bytes",
            "largest ONNX model registerModel takes, from 'onnx', 'path' or a GridFS upload",
            positive(int),
            "BYTES",
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
    "vector search": (
        Option(
            "search",
            "search_mode",
            "serve: modelgate serves search itself; passthrough: the upstream does (Atlas, mongot)",
            _one_of("serve", "passthrough"),
            "MODE",
        ),
        Option(
            "search-dir",
            "search_dir",
            "folder of this process's vector indexes (rebuilt from MongoDB when lost)",
            Path,
            "DIR",
            shown_default="<data-dir>/search-indexes",
        ),
        Option(
            "search-sweep-interval",
            "search.sweep_interval",
            "how often each vector index rereads its collection to see writes around the proxy",
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

OPTIONS: tuple[Option, ...] = tuple(option for group in GROUPS.values() for option in group)


CONFIG_VARIABLE = "MODELGATE_CONFIG"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `modelgate serve`: --config and --print-config, then one per option. They
    keep the text as given and set nothing when absent: `load_settings` reads the text and
    falls back to the variable, then to the file."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read settings from this TOML file: a top-level key per option below, named "
        "without its leading dashes and 'no-' (sweep-interval = 0.5, change-streams = false, "
        'providers = ["CPUExecutionProvider"]); flags and variables win over it '
        f"({CONFIG_VARIABLE})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the settings in effect as a file for --config (passwords masked) and exit",
    )
    for title, options in GROUPS.items():
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
