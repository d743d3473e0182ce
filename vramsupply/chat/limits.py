"""Limits on what one JSON schema may ask of the server, for ``response_format`` and for tools.

Converting a schema is pure Python, a grammar is parsed by llama.cpp when the request is
submitted, and while generating it is walked for the tokens it refuses (on the grammar worker,
``engine/offthread.py``). Each of those costs grows with the schema, so a schema is checked
against these limits first (cheap, and bounding what the converter can be asked to build), and the
grammar it yields is capped in size. The request field is named in the 400 by the caller. The
limits are in the README.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .metaschema import InvalidSchema, at, check_valid, schema_text
from .schema import MAX_SPELLED_LENGTH, schema_to_gbnf

MAX_SCHEMA_BYTES = 32 * 1024
"""The schema as JSON text."""
MAX_SCHEMA_DEPTH = 16
"""Nesting of objects and arrays in the schema."""
MAX_ALTERNATIVES = 128
"""Values of one ``enum`` and branches of one ``anyOf``/``oneOf``: each is a grammar alternative
that is tried against every candidate token."""
MAX_REPETITION = MAX_SPELLED_LENGTH
"""Bounds on lengths and counts (``maxItems``, ``minLength``, regex ``{n,m}``...): the converter
spells out each repetition, so ``maxItems: 1000000`` would build a grammar of a million rules
before its size could be checked."""
MAX_GRAMMAR_BYTES = 32 * 1024
"""The GBNF text handed to llama.cpp."""
MAX_CHECKED_BYTES = 128 * 1024
"""Schemas past the limits (with ``tool_choice`` ``auto``, used without a grammar) are still held
to JSON Schema's rules, up to this much JSON text in one request (``CheckBudget``). The meta-schema
check costs about 0.1 s of CPU for a valid 127 KB schema on the bench VM, 0.5 s for an invalid one
and 9 s at 1.2 MB, taken from every stream; with the budget per schema, 32 tools of 127 KB took
3.3 s a request. Past it a schema is not checked, as none was before the check ran past the limits;
a verdict is kept (``metaschema``), so an agent resending its tools pays once."""

_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains")
_REGEX_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaTooComplex(ValueError):
    """The schema passes a limit; the message says which and what the limit is."""


def schema_grammar(schema: dict[str, Any], strict: bool = False, root: str = "the schema") -> str:
    """Check the limits, convert, check the grammar's size. Blocking: run it in a thread. With
    ``strict``, a keyword the grammar cannot hold is an ``UnenforcedKeyword`` naming its place
    under ``root`` (the request field, e.g. ``response_format.json_schema.schema``); one that breaks
    JSON Schema's own rules is an ``InvalidSchema``."""
    check_schema(schema)
    check_valid(schema)  # after the limits: the meta-schema's validator recurses once per level
    return check_grammar_size(schema_to_gbnf(schema, strict, root))


def check_strict(schema: dict[str, Any], root: str) -> None:
    """For a tool with ``strict: true`` (whatever ``tool_choice`` says): ``UnenforcedKeyword``
    when its parameters hold a keyword no call grammar can enforce, ``SchemaTooComplex`` past a
    limit, ``ValueError`` for a schema no grammar can express. ``root`` names the field
    (``tools[0].function.parameters``)."""
    schema_grammar(schema or {"type": "object"}, strict=True, root=root)


def check_schema(schema: Any) -> None:
    """Refuse a schema past a limit (``SchemaTooComplex``), before any conversion."""
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaTooComplex(f"the schema is {len(text):,} bytes of JSON; at most {MAX_SCHEMA_BYTES:,} are accepted")
    check_limits(schema)


class CheckBudget:
    """The JSON text of schemas past the limits that one request may have checked (``MAX_CHECKED_BYTES``)."""

    def __init__(self, nbytes: int = MAX_CHECKED_BYTES) -> None:
        self.left = nbytes

    def take(self, size: int) -> None:
        """Spend ``size`` bytes, or ``SchemaTooComplex`` (not checked) when fewer are left."""
        if size > self.left:
            raise SchemaTooComplex(f"{size:,} bytes of JSON past the limits; at most {MAX_CHECKED_BYTES:,} are checked in one request")
        self.left -= size


def check_valid_at_any_size(schema: Any, budget: CheckBudget | None = None) -> None:
    """``InvalidSchema`` for a schema that breaks JSON Schema's rules, past the size limits too:
    the limits' own reasons where it is within them, else the meta-schema's. ``SchemaTooComplex``
    for one nested too deep to be read (the meta-schema's validator recurses once per level) or
    past what is left of the request's ``budget``: not checked."""
    try:
        check_schema(schema)
    except SchemaTooComplex:
        check_depth(schema)
        text = schema_text(schema)  # as long as the text the limit measured: only the keys' order differs
        (budget or CheckBudget()).take(len(text))
        check_valid(schema, text)
        return
    check_valid(schema)


def check_depth(node: Any, depth: int = 0) -> None:
    """Refuse a schema whose objects and arrays nest deeper than ``check_limits`` lets them."""
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaTooComplex(f"it nests deeper than {MAX_SCHEMA_DEPTH} levels")
    for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
        if isinstance(child, (dict, list)):
            check_depth(child, depth + 1)


def check_grammar_size(grammar: str) -> str:
    """``grammar``, unless it is larger than llama.cpp should be asked to parse for one request."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise SchemaTooComplex(f"its grammar would be {len(grammar):,} bytes; at most {MAX_GRAMMAR_BYTES:,} are accepted")
    return grammar


def check_limits(node: Any, depth: int = 0, path: str = "") -> None:
    """Walk the schema and refuse what would make the grammar, or applying it, expensive; ``path``
    is ``node``'s place in the schema (``.properties.a``)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaTooComplex(f"it nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_limits(item, depth + 1, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        return
    for key in ("enum", "anyOf", "oneOf"):
        values = node.get(key)
        if isinstance(values, list) and len(values) > MAX_ALTERNATIVES:
            raise SchemaTooComplex(f"'{key}' has {len(values):,} entries; at most {MAX_ALTERNATIVES} are accepted")
    for key in _COUNTS:
        value = node.get(key)  # a dict or a boolean here is a schema: "properties" may name a field "maxItems"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not isinstance(value, int) or value < 0:  # a maxItems of NaN meant no bound at all
            raise InvalidSchema(f"'{key}' must be a whole number of at least 0, not {json.dumps(value)[:40]}, {at(path + '.' + key)}", f"{path}.{key}")
        if value > MAX_REPETITION and key != "maxLength":  # a longer one is left unenforced (``schema._unspelled_length``)
            raise SchemaTooComplex(f"'{key}' is {value}; at most {MAX_REPETITION} is accepted")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for low, high in _REGEX_REPEAT.findall(pattern):
            if max(int(low), int(high or 0)) > MAX_REPETITION:
                raise SchemaTooComplex(f"'pattern' repeats {{{low},{high}}} times; at most {MAX_REPETITION} is accepted")
    for key, value in node.items():
        if isinstance(value, (dict, list)):
            check_limits(value, depth + 1, f"{path}.{key}")
