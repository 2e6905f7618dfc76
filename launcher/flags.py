"""The server flags: one per `ServerConfig` field, made from the config struct itself.

Each field's help text and metavar are written once, in its `Meta` (shared/config.py);
the default shown is the struct's. Flags carry no argparse defaults: only the flags
given override the config file (shared/config_file.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from shared.config import SECTIONS, ServerConfig
from shared.config_base import literal_choices
from shared.config_file import ConfigError, load_config

ALIASES = {"drain_timeout_s": ["--drain-timeout"], "heartbeat_timeout_s": ["--heartbeat-timeout"]}


def _metavar(field: msgspec.structs.FieldInfo, meta: dict[str, Any]) -> str:
    choices = literal_choices(field.type)
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return meta.get("metavar", "VALUE")


def _default_text(field: msgspec.structs.FieldInfo) -> str:
    if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT:
        return ""
    default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if default is None or default == "" or default == []:
        return ""  # the help text says what an unset value means
    if isinstance(default, bool):
        return f" (default: {str(default).lower()})"
    return f" (default: {default})"


def _field_meta(field: msgspec.structs.FieldInfo) -> tuple[str, dict[str, Any]]:
    """(help text, extra) from the field's `Annotated[..., Meta(...)]`."""
    for meta in getattr(field.type, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta):
            return meta.description or "", dict(meta.extra or {})
    return "", {}


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file of settings, one table per section ([model], [worker], [scheduler], ...; "
                             "see systemd/pagedserve.toml); flags override it")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]", (cls.__doc__ or "").strip().splitlines()[0])
        for field in msgspec.structs.fields(cls):
            text, extra = _field_meta(field)
            choices = literal_choices(field.type)
            group.add_argument("--" + field.name.replace("_", "-"), *ALIASES.get(field.name, []), dest=field.name,
                               default=None, metavar=_metavar(field, extra), choices=choices or None,
                               help=text.replace("%", "%%") + _default_text(field))


def config_reloader(args: argparse.Namespace):
    """A function that reads the config file and the same flags again (ConfigError when the file
    is now bad): the frontend's SIGHUP takes `[routing] engines` from it (docs/data_parallel.md)."""
    from shared.config import FIELD_SECTIONS

    given = {name: getattr(args, name) for name in FIELD_SECTIONS if getattr(args, name, None) is not None}
    return lambda: load_config(getattr(args, "config", None), given)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config file, then the flags given; a bad one exits 2 with a message naming it."""
    from shared.config import FIELD_SECTIONS

    given = {name: getattr(args, name) for name in FIELD_SECTIONS if getattr(args, name, None) is not None}
    try:
        return load_config(getattr(args, "config", None), given)
    except ConfigError as e:
        print(f"pagedserve {args.command}: bad configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None
