"""32 JSON Schemas for the structured-output tests, as agents send them: tool arguments,
extraction records, routing decisions. Every string, array and number is bounded, so a
135M model sampling at temperature 1.0 finishes each within a few dozen tokens."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SHORT = {"type": "string", "maxLength": 8}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCORE = {"type": "number", "minimum": 0, "maximum": 10}
FLAG = {"type": "boolean"}
COLOR = {"enum": ["red", "green", "blue"]}
TAGS = {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}


def obj(required: dict, optional: dict | None = None, **extra) -> dict:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required),
            "additionalProperties": False, **extra}


SCHEMAS = [
    obj({"name": NAME, "age": AGE}),
    obj({"city": NAME, "country": NAME}),
    obj({"ok": FLAG}),
    obj({"color": COLOR}),
    obj({"tags": TAGS}),
    obj({"score": SCORE, "passed": FLAG}),
    obj({"id": {"type": "integer", "minimum": 1000, "maximum": 9999}, "label": SHORT}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "state": {"enum": ["CA", "NY", "TX"]}}),
    obj({"person": obj({"name": NAME, "age": AGE})}),
    obj({"user": obj({"id": AGE, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}})}),
    obj({"point": obj({"x": AGE, "y": AGE})}),
    obj({"items": {"type": "array", "items": obj({"sku": SHORT, "qty": AGE}), "minItems": 1, "maxItems": 2}}),
    obj({"matrix": {"type": "array", "items": {"type": "array", "items": AGE, "minItems": 2, "maxItems": 2},
                    "minItems": 2, "maxItems": 2}}),
    obj({"name": NAME}, {"nickname": SHORT}),
    obj({"title": NAME}, {"year": {"type": "integer", "minimum": 1900, "maximum": 2030}, "rating": SCORE}),
    obj({"tool": {"const": "search"}, "arguments": obj({"query": NAME, "limit": {"type": "integer", "minimum": 1,
                                                                                "maximum": 10}})}),
    obj({"tool": {"enum": ["get_weather", "get_time"]}, "arguments": obj({"city": NAME})}),
    obj({"route": {"enum": ["billing", "support", "sales"]}, "confidence": SCORE}),
    obj({"answer": {"enum": ["yes", "no", "unsure"]}, "reason": SHORT}),
    obj({"value": {"anyOf": [AGE, FLAG]}}),
    obj({"contact": {"oneOf": [obj({"email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"}}),
                               obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}})]}}),
    obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    obj({"status": {"type": ["string", "null"], "maxLength": 6}}),
    obj({"counts": {"type": "array", "items": AGE, "minItems": 3, "maxItems": 3}}),
    obj({"pair": {"type": "array", "prefixItems": [NAME, AGE], "items": False, "minItems": 2}}),
    {"$defs": {"person": obj({"name": NAME, "age": AGE})},
     **obj({"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}})},
    {"$defs": {"color": COLOR}, **obj({"fg": {"$ref": "#/$defs/color"}, "bg": {"$ref": "#/$defs/color"}})},
    obj({"meta": obj({"version": {"type": "integer", "minimum": 1, "maximum": 9}, "stable": FLAG}),
         "name": NAME}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50}, "unit": {"enum": ["C", "F"]}}),
    obj({"steps": {"type": "array", "items": obj({"n": {"type": "integer", "minimum": 1, "maximum": 5},
                                                  "done": FLAG}), "minItems": 1, "maxItems": 2}}),
    {"type": "array", "items": COLOR, "minItems": 1, "maxItems": 3},
]
