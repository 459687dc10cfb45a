"""Settings from flags, MODELGATE_* variables and the dataclass defaults (no processes)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bench.support.processes import ROOT
from proxy import cli
from proxy.settings import (
    CONFIG_VARIABLE,
    OPTIONS,
    InvalidSetting,
    Option,
    Settings,
    add_serve_arguments,
)
from proxy.settings_sources import load_settings


def _settings(*flags: str, environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="modelgate serve")
    add_serve_arguments(parser)
    return load_settings(parser.parse_args(flags), environ or {})


def _field(settings: Settings, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def test_nothing_given_is_the_dataclass_defaults() -> None:
    assert _settings() == Settings()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_a_default_written_back_reads_as_itself(option: Option) -> None:
    default = _field(Settings(), option.field)
    assert option.default == default
    if default is not None and default != ():
        assert option.read(option.show(default), "") == default


@pytest.mark.parametrize(
    ("flags", "environ", "path", "expected"),
    [
        (["--listen", "0.0.0.0:9000"], {}, "listen", ("0.0.0.0", 9000)),
        ([], {"MODELGATE_LISTEN": "[::1]:27018"}, "listen", ("::1", 27018)),
        (["--upstream", "mongodb://db:1/"], {}, "upstream", "mongodb://db:1/"),
        ([], {"MODELGATE_DATA_DIR": "/data"}, "data_dir", Path("/data")),
        (["--grace-period", "0"], {}, "grace_period", 0.0),
        ([], {"MODELGATE_LOG_LEVEL": "debug"}, "log_level", "DEBUG"),
        (
            ["--providers", "CPUExecutionProvider"],
            {},
            "runtime.providers",
            ("CPUExecutionProvider",),
        ),
        ([], {"MODELGATE_MAX_CONCURRENT_RUNS": "4"}, "runtime.max_concurrent_runs", 4),
        (["--tensorrt"], {}, "runtime.tensorrt", True),
        ([], {"MODELGATE_TENSORRT": "1"}, "runtime.tensorrt", True),
        (["--no-change-streams"], {}, "deferred.change_streams", False),
        ([], {"MODELGATE_CHANGE_STREAMS": "0"}, "deferred.change_streams", False),
        ([], {"MODELGATE_CHANGE_STREAMS": "on"}, "deferred.change_streams", True),
        (["--sweep-interval", "0.5"], {}, "deferred.sweep_interval", 0.5),
        ([], {"MODELGATE_CACHE_REVALIDATE_AFTER": "60"}, "fetch.revalidate_after", 60.0),
        (
            ["--fetch-allow-hosts", "a.test, 10.0.0.0/8"],
            {},
            "fetch.allow_hosts",
            ("a.test", "10.0.0.0/8"),
        ),
        ([], {"MODELGATE_FETCH_TIMEOUT": "3"}, "fetch.total_timeout", 3.0),
        (["--fetch-allow-file"], {}, "fetch.allow_file", True),
        (["--cache-size", "1024"], {}, "cache_size", 1024),
        # The flag wins over the variable.
        (["--lease-seconds", "2"], {"MODELGATE_LEASE_SECONDS": "9"}, "deferred.lease_seconds", 2.0),
        # An empty value stands for the default.
        ([], {"MODELGATE_UPSTREAM": ""}, "upstream", None),
        (["--grace-period", ""], {"MODELGATE_GRACE_PERIOD": "3"}, "grace_period", 10.0),
    ],
)
def test_flags_and_variables_set_their_field(
    flags: list[str], environ: dict[str, str], path: str, expected: object
) -> None:
    settings = _settings(*flags, environ=environ)
    assert _field(settings, path) == expected
    # Everything else keeps its default, undeclared fields included.
    assert settings.deferred.claim_size == Settings().deferred.claim_size
    others = [option.field for option in OPTIONS if option.field != path]
    assert [_field(settings, p) for p in others] == [_field(Settings(), p) for p in others]


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (
            ["--lease-seconds", "-1"],
            {},
            "argument --lease-seconds: expected more than zero, got '-1'",
        ),
        (
            ["--max-concurrent-runs", "0"],
            {},
            "argument --max-concurrent-runs: expected more than zero",
        ),
        (
            ["--retry-backoff", "soon"],
            {},
            "argument --retry-backoff: expected a number, got 'soon'",
        ),
        (
            ["--fetch-max-redirects", "-1"],
            {},
            "argument --fetch-max-redirects: expected zero or more",
        ),
        (["--listen", "27017"], {}, "argument --listen: expected HOST:PORT, got '27017'"),
        (["--providers", ","], {}, "argument --providers: expected names separated by commas"),
        (
            [],
            {"MODELGATE_SWEEP_INTERVAL": "0"},
            "argument --sweep-interval: expected more than zero, got '0' "
            "(from MODELGATE_SWEEP_INTERVAL)",
        ),
        ([], {"MODELGATE_LOG_LEVEL": "loud"}, "argument --log-level: expected DEBUG, INFO"),
        ([], {"MODELGATE_TENSORRT": "maybe"}, "argument --tensorrt: expected 1 or 0, got 'maybe'"),
        ([], {"MODELGATE_CHANGE_STREAMS": "2"}, "argument --no-change-streams: expected 1 or 0"),
    ],
)
def test_meaningless_values_are_refused(
    flags: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidSetting) as refused:
        _settings(*flags, environ=environ)
    assert message in str(refused.value)


def test_serve_refuses_a_bad_variable_like_a_bad_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELGATE_LEASE_SECONDS", "-1")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: modelgate serve")
    assert "modelgate serve: error: argument --lease-seconds: expected more than zero" in error


def _help() -> str:
    parser = argparse.ArgumentParser(prog="modelgate serve", formatter_class=_Wide)
    add_serve_arguments(parser)
    return parser.format_help()


class _Wide(argparse.HelpFormatter):
    """One line per flag, so that a flag's line holds all of its help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=1000, max_help_position=60)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_help_shows_each_flag_with_its_variable_and_default(option: Option) -> None:
    lines = [line for line in _help().splitlines() if line.strip().startswith(option.flag + " ")]
    assert len(lines) == 1, f"{option.flag} is not listed once"
    assert option.variable in lines[0]
    if option.is_switch:
        assert f"{option.variable}={int(not option.default)})" in lines[0]
    elif option.shown_default is not None:
        assert f"; default {option.shown_default})" in lines[0]
    elif option.default is not None and option.default != ():
        assert f"; default {option.show(option.default)})" in lines[0]


def test_help_shows_defaults_as_users_write_them() -> None:
    text = _help()
    assert "MODELGATE_LISTEN; default 127.0.0.1:27017" in text
    assert "MODELGATE_GRACE_PERIOD; default 10)" in text
    assert "MODELGATE_FETCH_MAX_BYTES; default 20000000)" in text
    assert "MODELGATE_CHANGE_STREAMS=0" in text


def test_every_flag_and_variable_of_the_readme_is_declared() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    flags = set(re.findall(r"`(--[a-z-]+)", table))
    variables = set(re.findall(r"\bMODELGATE_[A-Z_]+", table))
    shortened = set(re.findall(r"\.\.\._([A-Z_]+)", table))  # `..._DENY_HOSTS`
    assert len(flags) >= 25 and len(variables) >= 20 and shortened
    assert flags <= {option.flag for option in OPTIONS} | {"--config", "--print-config"}
    declared = {option.variable for option in OPTIONS} | {CONFIG_VARIABLE}
    assert variables <= declared
    for suffix in shortened:
        assert any(variable.endswith("_" + suffix) for variable in declared), suffix
