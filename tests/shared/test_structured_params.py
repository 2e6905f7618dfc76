"""StructuredOutputs: exactly one kind, shapes and sizes checked with messages naming the field,
a canonical text for the cache, and the wire form a client sends (schema as object or text)."""

from __future__ import annotations

import msgspec
import pytest

from shared.protocol import SamplingParams
from shared.structured import MAX_GRAMMAR_CHARS, StructuredOutputs


@pytest.mark.parametrize(("spec", "message"), [
    (StructuredOutputs(), "set exactly one of json, regex, choice, grammar, json_object; got none"),
    (StructuredOutputs(regex="a", choice=["a"]), "got regex, choice"),
    (StructuredOutputs(json="{not json"), "json: the schema is not valid JSON"),
    (StructuredOutputs(json="[1, 2]"), "json: a JSON Schema is an object"),
    (StructuredOutputs(choice=[]), "choice: give 1 to 1024 strings, got 0"),
    (StructuredOutputs(choice=["a", ""]), "choice: every choice must be a non-empty string"),
    (StructuredOutputs(regex="x" * (MAX_GRAMMAR_CHARS + 1)), "regex: longer than"),
    (StructuredOutputs(regex="[0-9]+", whitespace_pattern=" "), "whitespace_pattern applies to json"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match="structured_outputs: .*" + message.replace("[", r"\[").replace("(", r"\(")):
        SamplingParams(structured_outputs=spec).validate()


def test_schema_object_and_text_compile_to_one_cache_key():
    as_object = StructuredOutputs(json={"type": "object", "required": ["b", "a"]})
    as_text = StructuredOutputs(json='{"required": ["b", "a"], "type": "object"}')
    assert as_object.kind() == "json"
    assert as_object.text() == '{"required": ["b", "a"], "type": "object"}'
    assert as_object.cache_key() == StructuredOutputs(json=as_object.text()).cache_key()
    assert as_text.cache_key() != StructuredOutputs(json=as_object.text(), whitespace_pattern=" ").cache_key()
    assert StructuredOutputs(json_object=True).kind() == "json_object"


def test_wire_form_round_trips_and_unknown_fields_are_refused():
    params = SamplingParams(structured_outputs=StructuredOutputs(choice=["yes", "no"]))
    params.validate()
    wire = msgspec.msgpack.encode(params)
    assert msgspec.msgpack.decode(wire, type=SamplingParams) == params
    with pytest.raises(msgspec.ValidationError, match="guided"):
        msgspec.json.decode(b'{"structured_outputs": {"guided_regex": "x"}}', type=SamplingParams)
