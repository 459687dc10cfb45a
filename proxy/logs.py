"""Log records with context, and the two formats they are written in.

Context travels as record attributes (`connection_id`, and for a slow request its
`command`, `namespace`, `duration_ms` and `inference_ms`), not inside the message, so
that the JSON format gives each its own field. The text format shows a connection's
records as it always has, behind a "[connN]" prefix.

No level, DEBUG included, writes credentials or document contents: modelgate's own lines
name commands and namespaces, never bodies, and the libraries that would write payloads
are held at WARNING."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["CONTEXT_FIELDS", "ConnectionLog", "JsonFormatter", "TextFormatter", "configure"]

CONTEXT_FIELDS = ("connection_id", "command", "namespace", "duration_ms", "inference_ms")

# Libraries that write payloads below WARNING; held at WARNING by `configure`.
_PAYLOAD_LOGGERS = (
    # The proxy's own client (registry, deferred work) logs each command and reply, so
    # the documents deferred work reads and writes (pymongo redacts only authentication).
    "pymongo.command",
    # httpx logs each image URL, a document's field value that may carry a signature
    # (presigned URLs); httpcore each fetch's host and response headers.
    "httpx",
    "httpcore",
    # The structure of each decoded image.
    "PIL",
)


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger for one client connection: every record carries its `connection_id`
    (merged with the call's own `extra`)."""

    def __init__(self, logger: logging.Logger, connection_id: int) -> None:
        super().__init__(logger, {"connection_id": connection_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = self.extra if extra is None else {**(self.extra or {}), **extra}
        return msg, kwargs


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: [connN] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        connection_id = getattr(record, "connection_id", None)
        if connection_id is not None:
            # format() sets record.message afresh for every handler, so this prefix is
            # never applied twice.
            record.message = f"[conn{connection_id}] {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, the context fields
    the record has, message, and the exception's text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level` in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for name in _PAYLOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
