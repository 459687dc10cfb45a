"""Log formats: JSON lines that parse and carry their context, and the text format's
"[connN]" prefix, from records made by a connection's logger."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from bench.support.processes import ROOT
from proxy.logs import ConnectionLog, JsonFormatter, TextFormatter


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("tests.proxy.logs")
    logger.setLevel(logging.DEBUG)
    yield logger
    logger.handlers.clear()


def _written(logger: logging.Logger, formatter: logging.Formatter) -> io.StringIO:
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return output


def _lines(output: io.StringIO) -> list[str]:
    return output.getvalue().splitlines()


def test_json_line_carries_time_level_logger_connection_and_message(
    logger: logging.Logger,
) -> None:
    output = _written(logger, JsonFormatter())
    ConnectionLog(logger, 7).warning("closing connection: %s", "bad frame")
    (line,) = _lines(output)
    entry = json.loads(line)
    assert entry["time"].endswith("Z")
    assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "tests.proxy.logs"
    assert entry["connection_id"] == 7
    assert entry["message"] == "closing connection: bad frame"
    assert "exception" not in entry


def test_json_line_has_the_call_context_and_the_exception_text(logger: logging.Logger) -> None:
    output = _written(logger, JsonFormatter())
    connection = ConnectionLog(logger, 3)
    connection.warning("slow", extra={"command": "find", "namespace": "db.coll"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("unexpected")
    slow, failure = (json.loads(line) for line in _lines(output))
    assert (slow["connection_id"], slow["command"], slow["namespace"]) == (3, "find", "db.coll")
    assert "connection_id" not in failure  # not from a connection's logger
    assert failure["level"] == "ERROR"
    assert "ValueError: boom" in failure["exception"]
    assert failure["exception"].startswith("Traceback")


def test_text_format_prefixes_a_connections_records(logger: logging.Logger) -> None:
    output = _written(logger, TextFormatter())
    ConnectionLog(logger, 12).info("command %s on %s", "listModels", "admin")
    logger.info("listening")
    with_connection, without = _lines(output)
    assert with_connection.endswith(" INFO tests.proxy.logs: [conn12] command listModels on admin")
    assert without.endswith(" INFO tests.proxy.logs: listening")


def test_text_prefix_is_not_repeated_by_a_second_handler(logger: logging.Logger) -> None:
    first, second = _written(logger, TextFormatter()), _written(logger, TextFormatter())
    ConnectionLog(logger, 5).info("accepted")
    assert _lines(first)[0].endswith(": [conn5] accepted")
    assert _lines(second)[0].endswith(": [conn5] accepted")


def test_configured_json_logging_writes_one_object_per_line_to_stderr() -> None:
    program = (
        "import logging\n"
        "from proxy.logs import ConnectionLog, configure\n"
        "configure('info', 'json')\n"
        "ConnectionLog(logging.getLogger('proxy.session'), 4).info('closed')\n"
        "logging.getLogger('proxy.app').debug('not at info')\n"
        "logging.getLogger('proxy.app').warning('stopping')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["logger"], e["level"], e["message"]) for e in entries] == [
        ("proxy.session", "INFO", "closed"),
        ("proxy.app", "WARNING", "stopping"),
    ]
    assert entries[0]["connection_id"] == 4
