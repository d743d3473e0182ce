"""A JSON schema's string ``pattern`` as GBNF for the inside of a JSON string.

llama-cpp-python's converter copies a regex into GBNF almost as written: ``\\d`` and ``\\.`` become
escapes GBNF does not have (llama.cpp then refuses the whole grammar), and a quote or backslash the
regex allows is written raw, which ends the JSON string early (``^a"b$`` gave ``"a"b"``). Here the
regex is parsed by Python's own regex parser, and every character it allows is written as JSON
writes it inside a string: ``"`` as ``\\"``, ``\\`` as ``\\\\``, a control character as its escape.

What JSON Schema means by a pattern (ECMA-262) is kept where Python's syntax differs: ``\\d``,
``\\w`` and ``\\s`` are ASCII classes, and a pattern not anchored by ``^``/``$`` may match anywhere
in the string. What no grammar can say (back-references, look-arounds, ``\\b``, inline flags) is a
``PatternError``, a 400 for the request. Outside a class, ``.`` and a negated class never produce a
control character (the grammar allows less than the regex there, never more).

Two more forms write each character as itself, not as JSON. ``xml``: the pattern is for Qwen3.5's
XML ``<parameter>`` values, and ``<`` never stands in one (a value must not be able to write
``</parameter>``), so a class or ``.`` leaves it out and a pattern that needs one is a
``PatternError``. ``text``: the pattern is a whole answer (vLLM's ``guided_regex``), where nothing
follows that ``<`` could spoil, so every character stands as itself but NUL, which llama.cpp's
grammar can never match (it reads a token's text up to its first NUL). In both, a pattern not
anchored may have any other text around it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

try:  # Python 3.11+
    from re import _constants as sre
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

ANY_JSON_CHAR = r'( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )'
_CATEGORIES = {
    sre.CATEGORY_DIGIT: [(0x30, 0x39)],
    sre.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    sre.CATEGORY_SPACE: [(0x09, 0x0D), (0x20, 0x20)],
}
_NOT_CATEGORIES = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD, sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE}
_LINE_ENDS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
_RAW_NEVER = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
"""Characters a JSON string never holds raw (the project's strings also escape DEL)."""
_SURROGATES = [(0xD800, 0xDFFF)]
"""No character of a UTF-8 text: a regex's class may name them, the grammar never writes them."""
_RAW_TEXT_NEVER = {"xml": [(0x00, 0x00), (0x3C, 0x3C)], "text": [(0x00, 0x00)]}
"""What raw text never holds: NUL (no grammar matches it), and in an XML value ``<`` (which could
start ``</parameter>``)."""
_RAW_ANY = {"xml": "[^\\x00<]", "text": "[^\\x00]"}
_HOLDER = {"xml": "an XML parameter value", "text": "the answer"}
_WHY_NOT = {0x3C: " ('<' could start '</parameter>')", 0x00: " (llama.cpp's grammar never matches NUL)"}
FORMS = ("json", "xml", "text")
"""How the matched characters are written: inside a JSON string, raw in an XML value, raw as a
whole answer."""


MAX_EXPANDED = 4096
"""Elements llama.cpp spells out for a pattern's repetitions (``(a{100}){100}`` is 10,000 ``a``s)."""


class PatternError(ValueError):
    """A ``pattern`` no grammar here can express, or no valid regex at all."""


def pattern_to_gbnf(pattern: str, form: str = "json") -> str:
    """A GBNF expression for the text ``pattern`` matches, as ``form`` writes it (``FORMS``):
    between a JSON string's quotes, raw as an XML parameter value, or raw as a whole answer."""
    assert form in FORMS, form
    try:
        return _pattern_to_gbnf(pattern, form)
    except PatternError as exc:
        if form != "text":
            raise
        raise PatternError(_as_regex(str(exc), pattern)) from None


def _as_regex(message: str, regex: str) -> str:
    """A whole answer's regex is called a regex (vLLM's word), its own text left as it is."""
    quoted = {repr(regex), repr(regex[:80])}
    parts = re.split("(" + "|".join(re.escape(q) for q in sorted(quoted, key=len, reverse=True)) + ")", message)
    return "".join(part if part in quoted else part.replace("pattern", "regex") for part in parts)


def _pattern_to_gbnf(pattern: str, form: str) -> str:
    try:
        parsed = sre_parse.parse(pattern)
    except (sre.error, RecursionError, OverflowError) as exc:
        raise PatternError(f"the pattern {pattern!r} is no valid regular expression ({exc})") from None
    if _flags(parsed) & ~sre.SRE_FLAG_UNICODE:
        raise PatternError("inline flags such as (?i) are not supported in a pattern")
    items = list(parsed)
    if _size(items) > MAX_EXPANDED:
        raise PatternError(f"the pattern {pattern[:80]!r} repeats too much: llama.cpp would spell out over {MAX_EXPANDED:,} elements")
    anchored_start = bool(items) and items[0] == (sre.AT, sre.AT_BEGINNING)
    anchored_end = bool(items) and items[-1] == (sre.AT, sre.AT_END)
    items = items[1 if anchored_start else 0 : len(items) - 1 if anchored_end else len(items)]
    body = _sequence(items, form)
    anything = f"{_RAW_ANY.get(form, ANY_JSON_CHAR)}*"
    parts = ([] if anchored_start else [anything]) + [body] + ([] if anchored_end else [anything])
    return " ".join(p for p in parts if p)


def _flags(parsed: Any) -> int:
    state = getattr(parsed, "state", None) or getattr(parsed, "pattern", None)
    return int(getattr(state, "flags", 0))


def _size(items: Iterable[tuple[Any, Any]]) -> int:
    """How many elements the grammar of ``items`` spells out once llama.cpp expands repetitions."""
    total = 0
    for op, av in items:
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT) or op is getattr(sre, "POSSESSIVE_REPEAT", None):
            low, high, sub = av
            total += max(1, low if high is sre.MAXREPEAT else high) * _size(sub)
        elif op is sre.BRANCH:
            total += sum(_size(branch) for branch in av[1])
        elif op is sre.SUBPATTERN:
            total += _size(av[3])
        else:
            total += 1
    return total


def _sequence(items: Iterable[tuple[Any, Any]], form: str) -> str:
    return " ".join(_item(op, av, form) for op, av in items) or '""'


def _item(op: Any, av: Any, form: str) -> str:
    if op is sre.LITERAL:
        return _char(av, form)
    if op is sre.NOT_LITERAL:
        return _excluding([(av, av)], form)
    if op is sre.ANY:
        return _excluding(_LINE_ENDS, form)
    if op is sre.IN:
        return _char_set(av, form)
    if op is sre.BRANCH:
        return "( " + " | ".join(_sequence(branch, form) for branch in av[1]) + " )"
    if op is sre.SUBPATTERN:
        _, add_flags, del_flags, items = av
        if add_flags or del_flags:
            raise PatternError("inline flags such as (?i) are not supported in a pattern")
        return f"( {_sequence(items, form)} )"
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT) or op is getattr(sre, "POSSESSIVE_REPEAT", None):
        return _repeat(*av, form)
    what = _name(av if op is sre.AT else op)
    raise PatternError(f"{what} is not supported in a pattern (back-references, look-arounds, \\b, or ^ and $ not at its ends)")


def _repeat(low: int, high: Any, items: Any, form: str) -> str:
    unit = f"( {_sequence(items, form)} )"
    if high is sre.MAXREPEAT:
        return f"{unit}*" if low == 0 else f"{unit}+" if low == 1 else f"{unit}{{{low},}}"
    if (low, high) == (0, 1):
        return f"{unit}?"
    return f"{unit}{{{low}}}" if low == high else f"{unit}{{{low},{high}}}"


def _char_set(items: list[tuple[Any, Any]], form: str) -> str:
    negated = bool(items) and items[0][0] is sre.NEGATE
    ranges: list[tuple[int, int]] = []
    for op, av in items[1:] if negated else items:
        if op is sre.LITERAL:
            ranges.append((av, av))
        elif op is sre.RANGE:
            ranges.append(av)
        elif op is sre.CATEGORY and av in _CATEGORIES:
            ranges += _CATEGORIES[av]
        elif op is sre.CATEGORY and av in _NOT_CATEGORIES and not negated:
            return _set_with_negated_category(items, av, form)
        else:
            raise PatternError(f"{_name(av)} is not supported inside a [...] of a pattern")
    return _excluding(ranges, form) if negated else _including(ranges, form)


def _set_with_negated_category(items: list[tuple[Any, Any]], category: Any, form: str) -> str:
    """``[\\Da]``: anything but a digit, or ``a``."""
    others = [(op, av) for op, av in items if (op, av) != (sre.CATEGORY, category)]
    alternatives = [_excluding(_CATEGORIES[_NOT_CATEGORIES[category]], form)] + ([_char_set(others, form)] if others else [])
    return "( " + " | ".join(alternatives) + " )"


def _including(ranges: list[tuple[int, int]], form: str = "json") -> str:
    """Any character of ``ranges``, each as a JSON string writes it (or raw)."""
    ranges = _subtract(ranges, _SURROGATES)
    if form != "json":
        ranges = _subtract(ranges, _RAW_TEXT_NEVER[form])
        if not ranges:
            why = " ('<' cannot stand raw)" if form == "xml" else ""
            raise PatternError(f"a pattern's [...] matches no character {_HOLDER[form]} can hold{why}")
        return f"[{_class(ranges)}]"
    raw = _subtract(ranges, _RAW_NEVER)
    escaped = sorted({c for low, high in _clip(ranges, _RAW_NEVER) for c in range(low, high + 1)})
    alternatives = ([f"[{_class(raw)}]"] if raw else []) + [_json_char(c) for c in escaped]
    if not alternatives:
        raise PatternError("a pattern's [...] matches no character")
    return alternatives[0] if len(alternatives) == 1 else "( " + " | ".join(alternatives) + " )"


def _excluding(ranges: list[tuple[int, int]], form: str = "json") -> str:
    """Any character but those of ``ranges`` (and control characters), as JSON writes it (or raw)."""
    if form != "json":
        return f"[^{_class(_RAW_TEXT_NEVER[form] + _SURROGATES + ranges)}]"
    raw = f"[^{_class(_RAW_NEVER + _SURROGATES + ranges)}]"
    escaped = [_json_char(c) for c in (0x22, 0x5C) if not any(low <= c <= high for low, high in ranges)]
    return "( " + " | ".join([raw, *escaped]) + " )" if escaped else raw


def _char(code: int, form: str) -> str:
    if form == "json":
        return _json_char(code)
    if 0xD800 <= code <= 0xDFFF:
        raise PatternError(f"the pattern needs {chr(code)!r}, a lone surrogate, which no UTF-8 text holds")
    if any(low <= code <= high for low, high in _RAW_TEXT_NEVER[form]):
        raise PatternError(f"the pattern needs {chr(code)!r}, which {_HOLDER[form]} cannot hold raw{_WHY_NOT.get(code, '')}")
    return "[" + class_char(code) + "]"


def _json_char(code: int) -> str:
    """The GBNF literal for one character as it stands inside a JSON string."""
    written = json.dumps(chr(code), ensure_ascii=False)[1:-1] if code != 0x7F else "\\u007f"
    return '"' + "".join(_escape(c) for c in written) + '"'


def _escape(char: str) -> str:
    return "\\" + char if char in '"\\' else char


def _class(ranges: list[tuple[int, int]]) -> str:
    return "".join(class_char(low) if low == high else f"{class_char(low)}-{class_char(high)}" for low, high in ranges)


def class_char(code: int) -> str:
    """One character inside a GBNF ``[...]``: an ASCII letter or digit as itself, any other escaped."""
    if chr(code).isalnum() and code < 0x80:
        return chr(code)
    return f"\\x{code:02X}" if code <= 0xFF else f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _subtract(ranges: list[tuple[int, int]], removed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    result = list(ranges)
    for cut_low, cut_high in removed:
        kept = []
        for low, high in result:
            if high < cut_low or low > cut_high:
                kept.append((low, high))
                continue
            if low < cut_low:
                kept.append((low, cut_low - 1))
            if high > cut_high:
                kept.append((cut_high + 1, high))
        result = kept
    return result


def _clip(ranges: list[tuple[int, int]], within: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(max(low, w_low), min(high, w_high)) for low, high in ranges for w_low, w_high in within if low <= w_high and high >= w_low]


def _name(value: Any) -> str:
    return str(value).lower().replace("_", " ")
