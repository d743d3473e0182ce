"""``response_format`` → a llama.cpp GBNF grammar that constrains sampling to valid JSON.

The grammar comes from the same JSON-schema converter that forces tool calls
(``vramsupply.chat.schema``: strings without raw control characters, numeric bounds enforced);
``json_object`` is the schema of any object. The engine only ever sees the grammar text.

One request's schema must not cost every other buyer: converting a schema is pure Python and a
grammar is applied to every candidate token of every step on the scheduler thread that all slots
share. So a schema is checked against limits first (cheap, and bounding what the converter can be
asked to build), converted in a worker thread, and the grammar it yields is capped in size. Past a
limit the answer is a 400 naming ``response_format``. The limits are in the README.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from vramsupply.chat.schema import schema_to_gbnf
from vramsupply.server.errors import ApiError
from vramsupply.server.schemas import ResponseFormat

MAX_SCHEMA_BYTES = 32 * 1024
"""The schema as JSON text."""
MAX_SCHEMA_DEPTH = 16
"""Nesting of objects and arrays in the schema."""
MAX_ALTERNATIVES = 128
"""Values of one ``enum`` and branches of one ``anyOf``/``oneOf``: each is a grammar alternative
that is tried against every candidate token."""
MAX_REPETITION = 1000
"""Bounds on lengths and counts (``maxItems``, ``minLength``, regex ``{n,m}``...): the converter
spells out each repetition, so ``maxItems: 1000000`` would build a grammar of a million rules
before its size could be checked."""
MAX_GRAMMAR_BYTES = 32 * 1024
"""The GBNF text handed to llama.cpp."""

PARAM = "response_format"
JSON_OBJECT = schema_to_gbnf({"type": "object"})
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains")
_REGEX_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaTooComplex(ValueError):
    """The schema passes a limit; the message says which and what the limit is."""


async def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The grammar for a response format; ``None`` means unconstrained text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT
    assert response_format.json_schema is not None  # guaranteed by ResponseFormat's validator
    schema = response_format.json_schema.schema_
    if not schema:
        return JSON_OBJECT
    try:
        return await asyncio.to_thread(schema_grammar, schema)
    except SchemaTooComplex as exc:
        raise ApiError(400, f"'{PARAM}.json_schema.schema' is too complex for this server: {exc}", param=PARAM, code="invalid_value") from None
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors on schemas it cannot express
        raise ApiError(
            400,
            f"Invalid value for '{PARAM}.json_schema.schema': cannot turn this JSON schema into a grammar ({exc})",
            param=f"{PARAM}.json_schema.schema",
            code="invalid_value",
        ) from None


def schema_grammar(schema: dict[str, Any]) -> str:
    """Check the limits, convert, check the grammar's size. Blocking: run it in a thread."""
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaTooComplex(f"the schema is {len(text):,} bytes of JSON; at most {MAX_SCHEMA_BYTES:,} are accepted")
    check_limits(schema)
    grammar = schema_to_gbnf(schema)
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise SchemaTooComplex(f"its grammar would be {len(grammar):,} bytes; at most {MAX_GRAMMAR_BYTES:,} are accepted")
    return grammar


def check_limits(node: Any, depth: int = 0) -> None:
    """Walk the schema and refuse what would make the grammar, or applying it, expensive."""
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaTooComplex(f"it nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        for item in node:
            check_limits(item, depth + 1)
        return
    if not isinstance(node, dict):
        return
    for key in ("enum", "anyOf", "oneOf"):
        values = node.get(key)
        if isinstance(values, list) and len(values) > MAX_ALTERNATIVES:
            raise SchemaTooComplex(f"'{key}' has {len(values):,} entries; at most {MAX_ALTERNATIVES} are accepted")
    for key in _COUNTS:
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_REPETITION:
            raise SchemaTooComplex(f"'{key}' is {value}; at most {MAX_REPETITION} is accepted")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for low, high in _REGEX_REPEAT.findall(pattern):
            if max(int(low), int(high or 0)) > MAX_REPETITION:
                raise SchemaTooComplex(f"'pattern' repeats {{{low},{high}}} times; at most {MAX_REPETITION} is accepted")
    for value in node.values():
        if isinstance(value, (dict, list)):
            check_limits(value, depth + 1)
