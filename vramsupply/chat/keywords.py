"""Which JSON Schema keywords a grammar enforces, so that ``strict: true`` can refuse the others.

A grammar holds what a schema says only as far as the converter (``schema.py``) writes it. A
keyword it does not write was silently unenforced: a forced call with ``uniqueItems`` could repeat
items, ``format: "email"`` could be any text. OpenAI's strict mode refuses what it cannot enforce,
so with ``strict: true`` (a tool's ``function.strict``, ``response_format.json_schema.strict``)
this server refuses such a keyword too, naming it and where it is (``UnenforcedKeyword``). Without
``strict`` the keyword is accepted and not enforced, as before; the README lists which are.

Each schema the converter visits takes one ``branch`` (the way it is written: a ``$ref``, a union,
an object…); ``unenforced`` lists the keywords present that apply to the instance types there and
that the branch does not write. Some hold by construction, and count as enforced: ``minProperties``
when the required properties are that many, ``uniqueItems`` when at most one item is allowed,
``dependentRequired`` when the dependencies are required anyway. An ``enum``'s or ``const``'s values
are checked here against their sibling keywords (``filter_values``), so those siblings are
enforced by leaving out what breaks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

ANY_TYPE = ("type", "enum", "const", "$ref", "$dynamicRef", "$recursiveRef", "allOf", "anyOf", "oneOf", "not", "if", "then", "else")
BY_TYPE: dict[str, tuple[str, ...]] = {
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "array": ("items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems"),
    "object": (
        "properties", "patternProperties", "additionalProperties", "required", "minProperties", "maxProperties",
        "propertyNames", "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
    ),  # fmt: skip
}
BY_TYPE["integer"] = BY_TYPE["number"]
MAX_PAIRED = 32
"""Branches of a ``oneOf`` compared pairwise for ``exclusive``."""
JSON_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
VALUE_CHECKS = ("type", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
VALUE_CHECKS += ("minItems", "maxItems", "uniqueItems", "required", "minProperties", "maxProperties")


class UnenforcedKeyword(ValueError):
    """``strict: true`` with a keyword the grammar cannot hold; the message names it and its place."""


def applicable(schema: Mapping[str, Any]) -> set[str]:
    """The assertion keywords that can apply to an instance of this schema's ``type``."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else JSON_TYPES
    return {*ANY_TYPE, *(k for kind in kinds for k in BY_TYPE.get(kind, ()))}


def unenforced(schema: Mapping[str, Any], enforced: Iterable[str]) -> list[str]:
    """The keywords of ``schema`` that apply and that neither ``enforced`` nor the schema itself
    makes hold (a ``then`` without ``if`` asserts nothing)."""
    done = set(enforced)
    return [k for k in schema if k in applicable(schema) and k not in done and not _no_op(schema, k)]


def _no_op(schema: Mapping[str, Any], key: str) -> bool:
    value = schema[key]
    if key in ("then", "else"):
        return "if" not in schema
    if key in ("minContains", "maxContains"):
        return "contains" not in schema
    if key == "additionalItems":
        return not isinstance(schema.get("items"), list)
    if key in ("exclusiveMinimum", "exclusiveMaximum", "uniqueItems"):
        return value is False
    if key in ("unevaluatedItems", "unevaluatedProperties", "additionalProperties", "propertyNames"):
        return value is True or value == {}
    return key == "required" and value == []


def object_enforced(schema: Mapping[str, Any], declared: Iterable[str], required: Iterable[str], free: bool) -> set[str]:
    """What the object rule holds: its members, and the counts and dependencies that follow from
    which members it can write (``declared``; ``free``: other names too) and must write."""
    declared, required = set(declared), set(required)
    done = {"type", "properties", "required", "additionalProperties"}
    low, high = schema.get("minProperties"), schema.get("maxProperties")
    if isinstance(low, int) and len(required) >= low:
        done.add("minProperties")
    if isinstance(high, int) and not free and len(declared) <= high:
        done.add("maxProperties")
    if schema.get("additionalProperties") is False:
        done.add("unevaluatedProperties")
    if not free and not declared:  # a regex is never run here: a buyer's pattern could take forever
        done.add("patternProperties")
    names = schema.get("propertyNames")
    if isinstance(names, Mapping) and not free and checkable(names) and all(satisfies(name, names) for name in declared):
        done.add("propertyNames")
    for key in ("dependentRequired", "dependencies"):
        needs = schema.get(key)
        if isinstance(needs, Mapping) and all(isinstance(v, list) and ((k not in declared and not free) or set(v) <= required) for k, v in needs.items()):
            done.add(key)
    return done


def array_enforced(schema: Mapping[str, Any]) -> set[str]:
    """What the array rule holds: ``items`` with ``minItems``/``maxItems``, or a tuple (``prefixItems``,
    or a list ``items``) of exactly its length, with no item after it."""
    items, prefix = schema.get("items"), schema.get("prefixItems")
    tuple_items = items if isinstance(items, list) else prefix if isinstance(prefix, list) and not items else None
    if tuple_items is None:
        done = {"type", "items", "minItems", "maxItems", "unevaluatedItems"}
        most = schema.get("maxItems")
    else:
        length = most = len(tuple_items)
        done = {"type", "items", "additionalItems", "unevaluatedItems", "prefixItems" if tuple_items is prefix else "items"}
        done |= {"minItems"} if _count(schema, "minItems", lambda n: n <= length) else set()
        done |= {"maxItems"} if _count(schema, "maxItems", lambda n: n >= length) else set()
    if isinstance(most, int) and most <= 1:
        done.add("uniqueItems")
    return done


def _count(schema: Mapping[str, Any], key: str, fits: Any) -> bool:
    value = schema.get(key)
    return isinstance(value, int) and fits(value)


def exclusive(branches: list[Any]) -> bool:
    """Whether no value fits two of ``branches`` (``$ref``s resolved): then ``anyOf`` is ``oneOf``.
    Told apart by type, by ``enum``/``const`` values, or by a required property whose values
    differ (a tagged union's discriminator). Past ``MAX_PAIRED`` branches, not looked into."""
    return len(branches) <= MAX_PAIRED and all(_apart(a, b) for i, a in enumerate(branches) for b in branches[i + 1 :])


def _apart(a: Any, b: Any) -> bool:
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return False
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None and not _overlap(types_a, types_b):
        return True
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None:
        return not any(_same(x, y) for x in values_a for y in values_b)
    shared = set(_required(a)) & set(_required(b))
    return any(_apart(_property(a, k), _property(b, k)) for k in shared)


def _types(schema: Mapping[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return set(kind)
    values = _values(schema)
    return None if values is None else {type_of(v) for v in values}


def _overlap(a: set[str], b: set[str]) -> bool:
    widen = {"integer": {"integer", "number"}, "number": {"integer", "number"}}
    return any(widen.get(x, {x}) & widen.get(y, {y}) for x in a for y in b)


def _values(schema: Mapping[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def _required(schema: Mapping[str, Any]) -> list[str]:
    required = schema.get("required")
    return [k for k in required if isinstance(k, str)] if isinstance(required, list) else []


def _property(schema: Mapping[str, Any], key: str) -> Any:
    properties = schema.get("properties")
    return properties.get(key) if isinstance(properties, Mapping) else None


def _same(a: Any, b: Any) -> bool:
    kinds = {type_of(a), type_of(b)}
    return (len(kinds) == 1 or kinds == {"integer", "number"}) and a == b


# ---- enum and const values against their sibling keywords -------------------------------------


def type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "unknown")


def checkable(schema: Mapping[str, Any]) -> bool:
    """Whether ``satisfies`` can decide every assertion ``schema`` makes on a value."""
    return not unenforced(schema, (*VALUE_CHECKS, "enum", "const"))


def filter_values(schema: Mapping[str, Any], values: list[Any]) -> list[Any]:
    """The ``enum``/``const`` values that the sibling keywords ``satisfies`` checks allow."""
    return [v for v in values if satisfies(v, schema)]


def satisfies(value: Any, schema: Mapping[str, Any]) -> bool:
    """Whether ``value`` meets ``schema``'s type, enum/const, length, bound and count keywords
    (not ``pattern``: no buyer's regex is run, one could backtrack for ever)."""
    kinds = schema.get("type")
    kind = type_of(value)
    if isinstance(kinds, (str, list)) and not any(k == kind or (k == "number" and kind == "integer") for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return False
    if "const" in schema and not _same(value, schema["const"]):
        return False
    if isinstance(schema.get("enum"), list) and not any(_same(value, v) for v in schema["enum"]):
        return False
    if kind == "string":
        return _string_fits(value, schema)
    if kind in ("integer", "number"):
        return _number_fits(value, schema)
    if kind == "array":
        return _counts_fit(len(value), schema, "Items") and not (schema.get("uniqueItems") is True and _repeats(value))
    if kind == "object":
        return _counts_fit(len(value), schema, "Properties") and all(k in value for k in _required(schema))
    return True


def _string_fits(value: str, schema: Mapping[str, Any]) -> bool:
    return _counts_fit(len(value), schema, "Length")


def _number_fits(value: float, schema: Mapping[str, Any]) -> bool:
    def bound(key: str) -> Any:
        limit = schema.get(key)
        return limit if isinstance(limit, (int, float)) and not isinstance(limit, bool) else None

    above, below = schema.get("exclusiveMinimum") is True, schema.get("exclusiveMaximum") is True  # draft 4
    checks = [("minimum", lambda b: value > b if above else value >= b), ("maximum", lambda b: value < b if below else value <= b)]
    checks += [("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b)]
    if not all(bound(key) is None or fits(bound(key)) for key, fits in checks):
        return False
    step = bound("multipleOf")
    try:
        return step is None or step <= 0 or Decimal(str(value)) % Decimal(str(step)) == 0
    except InvalidOperation:
        return False


def _counts_fit(count: int, schema: Mapping[str, Any], noun: str) -> bool:
    low, high = schema.get("min" + noun), schema.get("max" + noun)
    return not (isinstance(low, int) and count < low) and not (isinstance(high, int) and count > high)


def _repeats(values: list[Any]) -> bool:
    return any(_same(a, b) for i, a in enumerate(values) for b in values[i + 1 :])
