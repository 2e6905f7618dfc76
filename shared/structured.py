"""Structured output: what a request asks its tokens to match (vLLM's `StructuredOutputsParams`).

Exactly one of `json` (a JSON Schema), `regex`, `choice`, `grammar` (Lark, or GBNF as
llama.cpp writes it) or `json_object` (any JSON object). The scheduler compiles it with
llguidance (scheduler/grammar_compiler.py) and masks each sampled token to what the grammar
allows; this module only checks the shape, sizes and syntax a client can get wrong without
a compiler, so that the frontend and the scheduler answer the same.
"""

from __future__ import annotations

import json as _json
from typing import Any

from msgspec import Struct

MAX_GRAMMAR_CHARS = 1 << 16  # schema, regex or grammar text; and all choices together
MAX_CHOICES = 1024
KINDS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputs(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Set exactly one of the five. `json` may be the schema as an object or as JSON text.
    `whitespace_pattern` (a regex) is the whitespace allowed between JSON tokens; by default
    none (compact JSON: `{"a":1}`), which keeps small models from looping on whitespace."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None

    def kind(self) -> str:
        """The one kind set; call after `validate`."""
        for name in KINDS[:-1]:
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def validate(self) -> None:
        """Raise ValueError naming the problem (the caller prefixes `structured_outputs`)."""
        chosen = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of {', '.join(KINDS)}; got {', '.join(chosen) or 'none'}")
        if isinstance(self.json, str):
            try:
                schema = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"json: the schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("json: a JSON Schema is an object (or true/false)")
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"choice: give 1 to {MAX_CHOICES} strings, got {len(self.choice)}")
            if any(not c for c in self.choice):
                raise ValueError("choice: every choice must be a non-empty string")
        for name in ("regex", "grammar"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} is empty")
        if len(self.text()) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{self.kind()}: longer than {MAX_GRAMMAR_CHARS} characters")
        if self.whitespace_pattern is not None and self.kind() not in ("json", "json_object"):
            raise ValueError("whitespace_pattern applies to json and json_object only")

    def text(self) -> str:
        """The constraint as one canonical string (a schema object serialized with sorted keys)."""
        kind = self.kind()
        if kind == "json":
            return self.json if isinstance(self.json, str) else _json.dumps(self.json, sort_keys=True)
        if kind == "choice":
            return _json.dumps(self.choice)
        if kind == "json_object":
            return '{"type": "object"}'
        return getattr(self, kind)

    def cache_key(self) -> str:
        """Equal keys compile to the same grammar."""
        return _json.dumps([self.kind(), self.text(), self.whitespace_pattern])
