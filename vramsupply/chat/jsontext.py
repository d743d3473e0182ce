"""JSON read from a model's output and written back into a tool call, kept to what every JSON
parser reads.

Python's ``json`` reads text a model may write into values it then writes back as no JSON at all:
``1e999`` becomes ``inf`` (written ``Infinity``), the literals ``NaN`` and ``Infinity`` are read
though JSON has neither, and an escaped lone surrogate (``"\\ud800"``) becomes a str with no UTF-8
form, which the response's encoder refuses (a 500, or a stream cut without ``[DONE]``). So:

- ``loads`` and ``DECODER`` refuse numbers no double holds and the non-JSON literals
  (``ValueError``, as for any text that is not JSON: the caller keeps the text as text);
- ``dumps`` writes a lone surrogate escaped, as the model wrote it, and refuses ``NaN`` and
  infinities (``ValueError``) from values that did not come through ``loads``;
- ``usable_name`` is a tool name trimmed, or None when it is blank or cannot be sent as UTF-8.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond a double's range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_SURROGATE = re.compile("[\ud800-\udfff]")

DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def loads(text: str) -> Any:
    """``json.loads`` for a model's text: ``ValueError`` for what a strict JSON parser refuses."""
    return DECODER.decode(text)


def dumps(value: Any) -> str:
    """Compact-spaced JSON as ``json.dumps`` writes it, non-ASCII kept, a lone surrogate escaped."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if _encodable(text):
        return text
    # Raw, a surrogate can only stand inside a string, where its escape means the same.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def usable_name(name: Any) -> str | None:
    """``name`` without surrounding spaces; None when that is empty or has no UTF-8 form."""
    if not isinstance(name, str) or not name.strip() or not _encodable(name):
        return None
    return name.strip()


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
