"""Where the settings of `modelgate serve` come from, and the settings in effect written out.

Each setting is taken from its flag, else its MODELGATE_* variable, else the settings file
(`--config FILE`, else MODELGATE_CONFIG), else its dataclass default. The file is TOML, one
top-level key per option named as the option without its dashes (`sweep-interval = 0.5`; a
switch in the sense of its field: `change-streams = false`), values in TOML types: numbers,
true/false, lists of strings for LIST options, strings for the rest. A value of the right
type becomes the text a flag would give, read by the option's own reader, so a file refuses
what a flag would refuse. `settings_toml` writes the settings in effect as such a file.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.settings import CONFIG_VARIABLE, GROUPS, OPTIONS, InvalidSetting, Option, Settings

__all__ = ["load_settings", "read_settings_file", "settings_toml"]

_BY_NAME = {option.name: option for option in OPTIONS}


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Each setting from its flag, else its MODELGATE_* variable, else the settings file,
    else its dataclass default. An empty value stands for the default
    (`MODELGATE_UPSTREAM=` keeps the embedded one; `MODELGATE_CONFIG=` reads no file)."""
    flags = vars(args)
    if "config" in flags:
        config, config_origin = flags["config"], ""
    else:
        config, config_origin = environ.get(CONFIG_VARIABLE, ""), f" (from {CONFIG_VARIABLE})"
    in_file = read_settings_file(Path(config), config_origin) if config else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in flags:
            text, origin = flags[option.name], ""
        elif option.variable in environ:
            text, origin = environ[option.variable], f" (from {option.variable})"
        elif option.name in in_file:
            text, origin = in_file[option.name]
        else:
            continue
        if text:
            values[option.field] = option.read(text, origin)
    return _settings_with(values)


def read_settings_file(path: Path, origin: str = "") -> dict[str, tuple[str, str]]:
    """The text of each option the TOML file at `path` sets, keyed by option name, with
    the origin that ends a refusal of it; `origin` ends a refusal of the file itself."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise InvalidSetting(
            f"argument --config: cannot read {path}: {exc.strerror or exc}{origin}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSetting(
            f"argument --config: {path} is not valid TOML: {exc}{origin}"
        ) from None
    texts: dict[str, tuple[str, str]] = {}
    for key, value in document.items():
        option = _BY_NAME.get(key)
        if option is None:
            raise InvalidSetting(f"argument --config: {path}: {_unknown(key)}{origin}")
        where = f" (from {path}, key {key})"
        texts[key] = (option.text_in_file(value, where), where)
    return texts


def _unknown(key: str) -> str:
    guess = key.replace("_", "-").removeprefix("no-")
    close = difflib.get_close_matches(guess, _BY_NAME, n=1)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; the keys are the options of modelgate serve --help"


def _settings_with(values: Mapping[str, Any]) -> Settings:
    """The default Settings with the fields named by dotted paths replaced."""
    defaults = Settings()
    parts: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        part, _, name = path.rpartition(".")
        parts.setdefault(part, {})[name] = value
    nested = {
        part: replace(getattr(defaults, part), **fields) for part, fields in parts.items() if part
    }
    return replace(defaults, **parts.get("", {}), **nested)


def settings_toml(settings: Settings) -> str:
    """`settings` as a file for --config, group by group, secrets masked (each option's
    `show`). A setting left unset is a comment: TOML has no null."""
    lines = ["# modelgate serve: the settings in effect (--print-config)"]
    for title, options in GROUPS.items():
        lines += ["", f"# {title or 'general'}"]
        lines += [_toml_line(option, option.value_in(settings)) for option in options]
    return "\n".join(lines) + "\n"


def _toml_line(option: Option, value: Any) -> str:
    if value is None:
        meaning = f" ({option.shown_default})" if option.shown_default else ""
        return f"# {option.name}: not set{meaning}"
    if option.file_type is bool:
        literal = "true" if value else "false"
    elif option.file_type is float:
        literal = option.show(value)
    elif option.file_type is list:
        literal = "[" + ", ".join(_toml_string(item) for item in value) + "]"
    else:
        literal = _toml_string(option.show(value))
    return f"{option.name} = {literal}"


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = (
        _TOML_ESCAPES.get(char) or (f"\\u{ord(char):04X}" if char < " " or char == "\x7f" else char)
        for char in text
    )
    return '"' + "".join(escaped) + '"'
