"""A JSON schema's numeric bounds, read as the number grammar's bounds (``numbers.py``).

``minimum``/``maximum`` and their exclusive forms (draft 4's booleans too) give, per side, the
tighter bound; a number's bound is read as the double its text will be parsed into, an integer's
rounded inward; a range no value fits is an ``UnsatisfiableSchema``. Apart from ``schema.py``,
which walks a schema, because this is arithmetic on one node.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from .numbers import MAX_DIGITS, Bound, Node, decimals, double_bound, integers
from .schema_normal import UnsatisfiableSchema

BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_BOUND_DIGITS = 100


def bound_number(schema: dict[str, Any], key: str) -> int | float | None:
    value = schema.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _side(schema: dict[str, Any], key: str, exclusive_key: str, lower: bool) -> tuple[int | float, bool] | None:
    """The tighter of the inclusive and the exclusive bound on one side: (value, inclusive)."""
    value = bound_number(schema, key)
    side = None if value is None else (value, schema.get(exclusive_key) is not True)  # draft 4: a boolean
    other = bound_number(schema, exclusive_key)
    if other is not None and (side is None or (other >= side[0] if lower else other <= side[0])):
        side = (other, False)
    # An open end writes at most MAX_DIGITS integer digits: a bound beyond those holds anyway.
    if side is not None and (side[0] <= -(10**MAX_DIGITS) if lower else side[0] >= 10**MAX_DIGITS):
        return None
    if side is not None and sum(c.isdigit() for c in f"{Decimal(str(side[0])):f}") > MAX_BOUND_DIGITS:
        raise ValueError(f"a bound written out in more than {MAX_BOUND_DIGITS} digits ({side[0]}) is not supported")
    return side


def _bounds(schema: dict[str, Any]) -> tuple[Bound | None, Bound | None]:
    low = _side(schema, "minimum", "exclusiveMinimum", True)
    high = _side(schema, "maximum", "exclusiveMaximum", False)
    return (None if low is None else _text_bound(schema, *low, True)), (None if high is None else _text_bound(schema, *high, False))


def _text_bound(schema: dict[str, Any], value: int | float, inclusive: bool, lower: bool) -> Bound:
    if schema["type"] == "number":
        return double_bound(value, inclusive, lower)  # the text is read as a double
    return Bound(Decimal(str(value)), inclusive)


def bounded(schema: dict[str, Any]) -> Node:
    lower, upper = _bounds(schema)
    if schema["type"] == "integer":
        low = None if lower is None else math.ceil(lower.value) if lower.inclusive else math.floor(lower.value) + 1
        high = None if upper is None else math.floor(upper.value) if upper.inclusive else math.ceil(upper.value) - 1
        node = integers(low, high)
    else:
        node = decimals(lower, upper)
    if node is None:
        bounds = {k: schema[k] for k in BOUND_KEYS if k in schema}
        raise UnsatisfiableSchema(f"no {schema['type']} satisfies {json.dumps(bounds)}")
    return node
