"""`modelgate serve --config FILE` (TOML) and `--print-config` (no processes)."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

from bench.support.processes import ROOT
from proxy import cli
from proxy.settings import InvalidSetting, Settings, add_serve_arguments, masked_uri
from proxy.settings_sources import load_settings, settings_toml

# Every kind of value a file holds, none of them a default.
EVERY_KIND = """\
listen = "0.0.0.0:9000"
upstream = "mongodb://db1:27017,db2:27017/?replicaSet=rs0"
data-dir = "/var/lib/modelgate"
grace-period = 2.5
metrics-listen = "[::1]:9216"
log-format = "json"
providers = ["CPUExecutionProvider"]
tensorrt = true
max-concurrent-runs = 4
change-streams = false
sweep-interval = 0.5
fetch-allow-hosts = ["a.test", "10.0.0.0/8"]
cache-revalidate-after = 60
cache-size = 1024
"""


def _settings(*flags: str, environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="modelgate serve")
    add_serve_arguments(parser)
    return load_settings(parser.parse_args(flags), environ or {})


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "modelgate.toml"
    path.write_text(text)
    return str(path)


def test_a_file_sets_each_kind_of_value(tmp_path: Path) -> None:
    settings = _settings("--config", _file(tmp_path, EVERY_KIND))
    assert settings.listen == ("0.0.0.0", 9000)
    assert settings.upstream == "mongodb://db1:27017,db2:27017/?replicaSet=rs0"
    assert settings.data_dir == Path("/var/lib/modelgate")
    assert settings.grace_period == 2.5
    assert settings.metrics_listen == ("::1", 9216)
    assert settings.log_format == "json"
    assert settings.runtime.providers == ("CPUExecutionProvider",)
    assert settings.runtime.tensorrt is True
    assert settings.runtime.max_concurrent_runs == 4
    assert settings.deferred.change_streams is False
    assert settings.deferred.sweep_interval == 0.5
    assert settings.fetch.allow_hosts == ("a.test", "10.0.0.0/8")
    assert settings.fetch.revalidate_after == 60.0
    assert settings.cache_size == 1024
    # What the file does not name keeps its default.
    assert settings.connect_timeout == Settings().connect_timeout
    assert settings.deferred.lease_seconds == Settings().deferred.lease_seconds


def test_flag_beats_variable_beats_file_beats_default(tmp_path: Path) -> None:
    config = _file(
        tmp_path, "lease-seconds = 1\nsweep-interval = 1\nmax-attempts = 1\nlog-level = 'DEBUG'\n"
    )
    environ = {"MODELGATE_LEASE_SECONDS": "2", "MODELGATE_SWEEP_INTERVAL": "2"}
    settings = _settings("--config", config, "--lease-seconds", "3", environ=environ)
    assert settings.deferred.lease_seconds == 3.0  # flag
    assert settings.deferred.sweep_interval == 2.0  # variable
    assert settings.deferred.max_attempts == 1  # file
    assert settings.log_level == "DEBUG"  # file
    assert settings.deferred.retry_backoff == Settings().deferred.retry_backoff  # default


def test_modelgate_config_names_the_file_and_the_flag_wins_over_it(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("max-attempts = 7\n")
    (tmp_path / "b.toml").write_text("max-attempts = 9\n")
    environ = {"MODELGATE_CONFIG": str(tmp_path / "a.toml")}
    assert _settings(environ=environ).deferred.max_attempts == 7
    assert (
        _settings("--config", str(tmp_path / "b.toml"), environ=environ).deferred.max_attempts == 9
    )
    # Empty stands for the default, as for every variable: no file.
    assert _settings(environ={"MODELGATE_CONFIG": ""}) == Settings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sweep_interval = 1\n", "unknown key 'sweep_interval'; did you mean 'sweep-interval'?"),
        ("no-change-streams = true\n", "did you mean 'change-streams'?"),
        ("[models]\nproviders = []\n", "unknown key 'models'"),
        ("colour = 'blue'\n", "unknown key 'colour'; the keys are the options of"),
        (
            "sweep-interval = '0.5'\n",
            "argument --sweep-interval: expected a number, got '0.5' (from {file}, key "
            "sweep-interval)",
        ),
        ("tensorrt = 1\n", "argument --tensorrt: expected true or false, got 1 (from {file}"),
        ("upstream = 27017\n", "argument --upstream: expected a string, got 27017"),
        ("providers = 'CPUExecutionProvider'\n", "argument --providers: expected a list of"),
        ("fetch-deny-hosts = [1, 2]\n", "argument --fetch-deny-hosts: expected a list of"),
        ("change-streams = true\nmax-attempts = true\n", "argument --max-attempts: expected a"),
        (
            "lease-seconds = 0\n",
            "argument --lease-seconds: expected more than zero, got '0' (from {file}, key "
            "lease-seconds)",
        ),
        ("max-attempts = 2.5\n", "argument --max-attempts: expected a number, got '2.5'"),
        ("listen = '27017'\n", "argument --listen: expected HOST:PORT, got '27017' (from {file}"),
        ("log-level = 'loud'\n", "argument --log-level: expected DEBUG, INFO"),
        ("sweep-interval = \n", "argument --config: {file} is not valid TOML: "),
    ],
)
def test_a_file_refuses_what_a_flag_would(tmp_path: Path, text: str, message: str) -> None:
    config = _file(tmp_path, text)
    with pytest.raises(InvalidSetting) as refused:
        _settings("--config", config)
    assert message.format(file=config) in str(refused.value)


def test_a_missing_file_is_refused_naming_where_it_was_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.toml")
    with pytest.raises(InvalidSetting) as refused:
        _settings(environ={"MODELGATE_CONFIG": missing})
    assert str(refused.value) == (
        f"argument --config: cannot read {missing}: No such file or directory "
        "(from MODELGATE_CONFIG)"
    )


def test_serve_refuses_a_bad_file_like_a_bad_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _file(tmp_path, "lease-seconds = -1\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--config", config])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: modelgate serve")
    assert (
        f"modelgate serve: error: argument --lease-seconds: expected more than zero, got '-1' "
        f"(from {config}, key lease-seconds)"
    ) in error


def test_printed_settings_read_back_as_themselves(tmp_path: Path) -> None:
    given = _settings("--config", _file(tmp_path, EVERY_KIND), "--tls-cert", 'a "q" \\ é.pem')
    assert given != Settings()
    printed = settings_toml(given)
    tomllib.loads(printed)  # valid TOML
    assert _settings("--config", _file(tmp_path, printed)) == given
    # The defaults too: unset settings are comments, since TOML has no null.
    defaults = settings_toml(Settings())
    assert "# upstream: not set (embedded SecantusDB)" in defaults
    assert "# metrics-listen: not set (off)" in defaults
    assert "change-streams = true" in defaults
    assert _settings("--config", _file(tmp_path, defaults)) == Settings()


def test_the_readme_example_file_is_accepted(tmp_path: Path) -> None:
    (example,) = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    settings = _settings("--config", _file(tmp_path, example))
    assert settings.deferred.change_streams is False
    assert settings.runtime.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("mongodb://user:secret@db:27017/", "mongodb://user:****@db:27017/"),
        ("mongodb+srv://u:p@ss@cluster.test/app", "mongodb+srv://u:****@cluster.test/app"),
        (
            "mongodb://user@db/?authMechanism=MONGODB-X509",
            "mongodb://user@db/?authMechanism=MONGODB-X509",
        ),
        ("mongodb://db1,db2/?replicaSet=rs0", "mongodb://db1,db2/?replicaSet=rs0"),
        (
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=pw&appName=x",
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=****&appName=x",
        ),
        (
            "mongodb://k:s@db/?authMechanismProperties=AWS_SESSION_TOKEN:tok,X:y",
            "mongodb://k:****@db/?authMechanismProperties=AWS_SESSION_TOKEN:****,X:y",
        ),
    ],
)
def test_secrets_of_an_upstream_uri_are_masked(uri: str, masked: str) -> None:
    assert masked_uri(uri) == masked


def test_serve_print_config_prints_masked_settings_and_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELGATE_UPSTREAM", "mongodb://app:hunter2@db:27017/?replicaSet=rs0")
    config = _file(tmp_path, "sweep-interval = 0.25\n")
    assert cli.main(["serve", "--config", config, "--print-config", "--max-attempts", "6"]) == 0
    printed = capsys.readouterr().out
    document = tomllib.loads(printed)
    assert document["upstream"] == "mongodb://app:****@db:27017/?replicaSet=rs0"
    assert "hunter2" not in printed
    assert document["sweep-interval"] == 0.25
    assert document["max-attempts"] == 6
    assert document["listen"] == "127.0.0.1:27017"


def test_without_onnxruntime_the_command_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # its import now fails
    assert cli.main(["serve"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("modelgate: error: modelgate needs onnxruntime")
    assert "pip install 'modelgate[cpu]'" in error
    assert "pip install 'modelgate[gpu]'" in error
