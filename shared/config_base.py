"""The pieces every config section is made of: the section base, help text next to each field,
and the checks of values the struct's types cannot express."""

from __future__ import annotations

from typing import Annotated, Literal, get_args, get_origin

import msgspec
from msgspec import Meta


def _help(text: str, metavar: str | None = None) -> Meta:
    return Meta(description=text, extra={"metavar": metavar} if metavar else {})


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""

    def check_choices(self) -> None:
        """A `Literal` field holds one of its values (the TOML decoder checks this itself; a
        config built in code, `ServerConfig.from_settings`, is checked here)."""
        for f in msgspec.structs.fields(self):
            choices = literal_choices(f.type)
            value = getattr(self, f.name)
            if choices and value not in choices:
                names = [str(c) for c in choices]
                listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
                raise ValueError(f"{f.name} must be {listed}, got {value!r}")


def literal_choices(annotation) -> tuple:
    """The values of a `Literal[...]` (inside `Annotated` or not); () for other types."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
