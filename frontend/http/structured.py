"""Structured output from an OpenAI body: `response_format` (json_schema, json_object), vLLM's
`structured_outputs` object, or vLLM's older `guided_*` fields; at most one of the three ways.
Whether the schema, regex or grammar compiles is the scheduler's answer (400 naming it)."""

from __future__ import annotations

from typing import Any

from frontend.http.errors import bad_field
from shared.structured import StructuredOutputs

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(body) -> StructuredOutputs | None:
    """The body's constraint, or None; raises the 400 `bad_field` for a malformed one."""
    given = [name for name in ("response_format", "structured_outputs", *GUIDED)
             if _present(name, getattr(body, name))]
    if len(given) > 1:
        raise bad_field(given[1], f"give one of {', '.join(given)}: each asks for structured output")
    if not given:
        return None
    name = given[0]
    if name == "structured_outputs":
        return body.structured_outputs
    if name == "response_format":
        return _from_response_format(body.response_format)
    spec = {GUIDED[name]: getattr(body, name)}
    if body.guided_whitespace_pattern is not None:
        spec["whitespace_pattern"] = body.guided_whitespace_pattern
    return StructuredOutputs(**spec)


def _present(name: str, value: Any) -> bool:
    if name == "response_format":
        kind = value.get("type") if isinstance(value, dict) else value
        return kind not in (None, "text")
    return value is not None


def _from_response_format(fmt: Any) -> StructuredOutputs:
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind != "json_schema":
        raise bad_field("response_format", f"response_format type {kind!r} is not supported: "
                                           f"text, json_object or json_schema")
    inner = fmt.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
        raise bad_field("response_format", "response_format.json_schema must be an object with a "
                                           "\"schema\" object (and a \"name\")")
    return StructuredOutputs(json=inner["schema"])
