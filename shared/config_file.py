"""Reading the configuration: the TOML file, then the command line's flags on top.

The file has one table per section of `ServerConfig` (`[worker]`, `[scheduler]`, ...).
A key written at the top level, as the flat files of earlier versions did, is refused
with a message that names its table, so an old file fails at start-up with the fix in
the message rather than being half-applied.
"""

from __future__ import annotations

import tomllib
from typing import Any

import msgspec

from shared.config import FIELD_SECTIONS, SECTIONS, ServerConfig
from shared.config_base import literal_choices


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """The TOML file at `path`, then `overrides` on top: command-line flags by field name
    (`{"block_size": "16"}`; strings are converted, "16" -> 16).

    Raises ConfigError naming the file, the key and the problem."""
    from_file: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                from_file = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        _refuse_flat_keys(path, from_file)
    try:
        config = msgspec.convert(from_file, ServerConfig)  # TOML is typed: no "16" for 16 here
    except msgspec.ValidationError as e:
        raise ConfigError(f"config file {path}: {_name_the_key(e)}") from None
    if overrides:
        unknown = sorted(set(overrides) - set(FIELD_SECTIONS))
        if unknown:
            raise ConfigError(f"command line: unknown setting {unknown[0]!r}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in overrides.items():
            by_section.setdefault(FIELD_SECTIONS[name], {})[name] = _list_flag(name, value)
        try:
            given = msgspec.convert(by_section, ServerConfig, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"command line: {_name_the_key(e)}") from None
        config = msgspec.structs.replace(config, **{
            section: msgspec.structs.replace(getattr(config, section),
                                             **{k: getattr(getattr(given, section), k) for k in fields})
            for section, fields in by_section.items()})
    try:
        config.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def _list_flag(name: str, value: Any) -> Any:
    """A list setting given as one flag is comma-separated (`--engines ADDR,ADDR`)."""
    field = next(f for f in msgspec.structs.fields(SECTIONS[FIELD_SECTIONS[name]]) if f.name == name)
    base = getattr(field.type, "__origin__", field.type)  # Annotated[list[str], ...] -> list[str]
    if isinstance(value, str) and getattr(base, "__origin__", base) is list:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _refuse_flat_keys(path: str, from_file: dict[str, Any]) -> None:
    for key, value in from_file.items():
        if key in SECTIONS and isinstance(value, dict):
            continue
        if key in FIELD_SECTIONS:
            section = FIELD_SECTIONS[key]
            raise ConfigError(f"config file {path}: top-level key {key!r} is now {section}.{key}: move it under "
                              f"[{section}] (settings are grouped by section since this version)")
        raise ConfigError(f"config file {path}: unknown key {key!r} (sections: {', '.join(SECTIONS)})")


def _name_the_key(e: msgspec.ValidationError) -> str:
    """msgspec says `... - at `$.worker.block_size``; say `worker.block_size: ...` instead, and
    list the valid values of an enum."""
    text = str(e)
    message, sep, where = text.rpartition(" - at `$.")
    if not sep:
        return text
    key = where.rstrip("`")
    section, _, name = key.partition(".")
    if section in SECTIONS and name:
        field = next((f for f in msgspec.structs.fields(SECTIONS[section]) if f.name == name), None)
        choices = literal_choices(field.type) if field is not None else ()
        if choices:
            message += f" (one of: {', '.join(map(str, choices))})"
    return f"{key}: {message}"
