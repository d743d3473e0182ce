"""JSON schema → GBNF: the one converter behind ``response_format`` and forced tool calls.

It is llama-cpp-python's converter (a port of llama.cpp's json-schema-to-grammar) with the gaps
that let a constrained answer break its schema closed:

- a string character excludes raw control characters (a raw newline inside a string is invalid
  JSON); llama.cpp's own converter excludes them too;
- ``minimum``, ``maximum``, ``exclusiveMinimum`` and ``exclusiveMaximum`` (draft-4 boolean form
  included) of ``integer`` and ``number`` are enforced digit by digit (``numbers.py``); a range no
  number fits is an error, not a grammar that can never finish;
- a ``type`` list (``["integer", "null"]``) keeps the schema's other keywords in every branch;
- a string ``pattern`` is converted by ``pattern.py``, which writes what the regex allows as JSON
  writes it inside a string (the base converter wrote quotes raw and GBNF-invalid escapes).

``multipleOf`` is not enforced.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter

from .numbers import MAX_DIGITS, Bound, Node, decimals, integers, to_gbnf
from .pattern import PatternError, pattern_to_gbnf

JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_BOUND_DIGITS = 100
"""Digits of a bound written out (1e-300 has 300): the pattern grows with them."""


class UnsatisfiableSchema(ValueError):
    """No JSON value fits the schema (e.g. ``minimum`` above ``maximum``)."""


class JsonSchemaConverter(SchemaConverter):
    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def add_schema(self, schema: Any, name: str) -> str:
        """The rule for ``schema`` (``$ref``s resolved within it), named after ``name``."""
        resolved = self.resolve_refs(json.loads(json.dumps(schema)), name)
        return self.visit(resolved, name)

    def visit(self, schema: Any, name: str) -> str:
        if isinstance(schema, dict) and not any(k in schema for k in ("$ref", "oneOf", "anyOf", "const", "enum")):
            kind = schema.get("type")
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"  # as the base class names it
            if isinstance(kind, list):
                return self._add_rule(rule_name, self._generate_union_rule(name, [{**schema, "type": t} for t in kind]))
            if kind in ("integer", "number") and any(_number(schema, k) is not None for k in _BOUND_KEYS):
                rule = to_gbnf(_bounded(schema))
                return self._add_rule(rule_name, f"({rule}) space")
        return super().visit(schema, name)

    def _visit_pattern(self, pattern: str, name: str) -> str:
        if not isinstance(pattern, str):
            raise PatternError("'pattern' must be a string")
        return self._add_rule(name, f'"\\"" {pattern_to_gbnf(pattern)} "\\"" space')

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if rule is PRIMITIVE_RULES["char"]:
            rule = BuiltinRule(JSON_CHAR, [])
        return super()._add_primitive(name, rule)


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """A grammar whose every sentence is a JSON value valid under ``schema``."""
    converter = JsonSchemaConverter()
    converter.add_schema(schema, "")
    return converter.format_grammar()


def _number(schema: dict[str, Any], key: str) -> Decimal | None:
    value = schema.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return Decimal(str(value))


def _bounds(schema: dict[str, Any]) -> tuple[Bound | None, Bound | None]:
    """The tighter of the inclusive and exclusive bound on each side."""
    low, high = _number(schema, "minimum"), _number(schema, "maximum")
    lower = None if low is None else Bound(low, schema.get("exclusiveMinimum") is not True)
    upper = None if high is None else Bound(high, schema.get("exclusiveMaximum") is not True)
    above, below = _number(schema, "exclusiveMinimum"), _number(schema, "exclusiveMaximum")
    if above is not None and (lower is None or above >= lower.value):
        lower = Bound(above, False)
    if below is not None and (upper is None or below <= upper.value):
        upper = Bound(below, False)
    # An open end writes at most MAX_DIGITS integer digits: a bound beyond those holds anyway.
    if upper is not None and upper.value >= 10**MAX_DIGITS:
        upper = None
    if lower is not None and lower.value <= -(10**MAX_DIGITS):
        lower = None
    for bound in (lower, upper):
        if bound is not None and sum(c.isdigit() for c in f"{bound.value:f}") > MAX_BOUND_DIGITS:
            raise ValueError(f"a bound written out in more than {MAX_BOUND_DIGITS} digits ({bound.value}) is not supported")
    return lower, upper


def _bounded(schema: dict[str, Any]) -> Node:
    lower, upper = _bounds(schema)
    if schema["type"] == "integer":
        low = None if lower is None else math.ceil(lower.value) if lower.inclusive else math.floor(lower.value) + 1
        high = None if upper is None else math.floor(upper.value) if upper.inclusive else math.ceil(upper.value) - 1
        node = integers(low, high)
    else:
        node = decimals(lower, upper)
    if node is None:
        bounds = {k: schema[k] for k in _BOUND_KEYS if k in schema}
        raise UnsatisfiableSchema(f"no {schema['type']} satisfies {json.dumps(bounds)}")
    return node
