"""GBNF for texts: literals written so llama.cpp reads them back exactly, the string formats a
grammar enforces, and the raw text of Qwen3.5's XML ``<parameter>`` values.

Literals: llama-cpp-python's converter escaped only quotes and newlines in its literals, so a
property named ``a"b`` ended the literal early (llama.cpp then refused the whole grammar) and one
named ``x\\y`` was written ``"x\\y"``, no JSON string. Here a literal escapes what GBNF needs
(``\\``, ``"``, control characters); a JSON text inside one (a property name, an ``enum`` value)
is written as ``json.dumps`` writes it, non-ASCII as itself, a lone surrogate and DEL escaped (no
UTF-8 text holds the one, and this project's JSON strings never hold the other raw).

Formats: ``date`` is a real calendar date (year 0001 to 9999, each month's own last day, 29
February in leap years only) as ``datetime.date.fromisoformat`` reads it; ``time`` and
``date-time`` are RFC 3339's (hours 00-23, minutes and seconds 00-59, an offset or ``Z``);
``uuid``, ``email``, ``hostname`` and ``ipv4`` a plain form of each; ``duration`` ISO 8601's
(pydantic's ``timedelta``). Each is one rule with no dependencies, so no property's rule name can
stand in for a part of it.

XML text: Qwen3.5's templates write a string parameter raw between ``<parameter=K>\\n`` and
``\\n</parameter>``, and the parsers end the value at the first ``</parameter>`` (and a whole call
at the first ``</tool_call>``). So a raw value may hold any text, ``<`` included, except those two
closing tags; ``text_without`` builds that language as one rule per state of the automaton that
looks for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .pattern import class_char

XML_CLOSING_TAGS = ("</parameter>", "</tool_call>")
"""What a raw XML parameter value may never contain: where the parsers end a value and a call."""
ANY_CHAR = r"[^\x00]"

_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_UNSAFE = re.compile("[\ud800-\udfff\x7f]")
_DIGIT2 = "[0-9] [0-9]"
_YEAR = '( [1-9] [0-9]{3} | "0" [1-9] [0-9]{2} | "00" [1-9] [0-9] | "000" [1-9] )'
_LEAP = '( "0" [48] | [2468] [048] | [13579] [26] )'
_DAYS_31 = '( ( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] ) )'
_DAYS_30 = '( ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" ) )'
_DAYS_28 = '( "02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) )'
DATE = f'( {_YEAR} "-" ( {_DAYS_31} | {_DAYS_30} | {_DAYS_28} ) | ( {_DIGIT2} {_LEAP} | {_LEAP} "00" ) "-02-29" )'
_HOUR = '( [01] [0-9] | "2" [0-3] )'
_SIXTY = "[0-5] [0-9]"
TIME = f'{_HOUR} ":" {_SIXTY} ":" {_SIXTY} ( "." [0-9]{{3}} )? ( "Z" | [+\\x2D] {_HOUR} ":" {_SIXTY} )'
_HEX = "[0-9a-fA-F]"
_LABEL = "[A-Za-z0-9] ( [A-Za-z0-9\\x2D]{0,61} [A-Za-z0-9] )?"
_ATOM = "[A-Za-z0-9_%+\\x2D]+"
_OCTET = '( "25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9] )'
_COUNT = "[0-9]+"
_SECOND = f'{_COUNT} ( "." [0-9]+ )? "S"'
_DURATION_TIME = f'"T" ( {_COUNT} "H" ( {_COUNT} "M" )? ( {_SECOND} )? | {_COUNT} "M" ( {_SECOND} )? | {_SECOND} )'
_DURATION_DATE = f'( {_COUNT} "Y" ( {_COUNT} "M" )? ( {_COUNT} "D" )? | {_COUNT} "M" ( {_COUNT} "D" )? | {_COUNT} "D" )'
DURATION = f'"P" ( {_DURATION_DATE} ( {_DURATION_TIME} )? | {_DURATION_TIME} | {_COUNT} "W" )'
"""An ISO 8601 duration (``P1DT2H``, ``PT30M``, ``P3W``) as pydantic writes a ``timedelta``: a unit
may be skipped (``P1Y35D``, ``PT1H1.25S``), and seconds have a fraction (``PT0.5S``)."""
STRING_FORMATS = {
    "date": DATE,
    "time": TIME,
    "date-time": f'{DATE} "T" {TIME}',
    "uuid": ' "-" '.join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12)),
    "email": f'{_ATOM} ( "." {_ATOM} )* "@" {_LABEL} ( "." {_LABEL} )+',
    "hostname": f'{_LABEL} ( "." {_LABEL} )*',
    "ipv4": f'{_OCTET} "." {_OCTET} "." {_OCTET} "." {_OCTET}',
    "duration": DURATION,
}
"""The text of each enforced ``format`` (no quotes: inside a JSON string or raw in an XML value)."""


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal that llama.cpp reads back as exactly ``text``."""
    if _SURROGATE.search(text):
        raise ValueError(f"{text[:40]!r} holds a lone surrogate, which no UTF-8 output can write")
    if "\x00" in text:  # written as \x00 it parses, but a grammar that must match it aborts the process
        raise ValueError(f"{text[:40]!r} holds NUL, which llama.cpp's grammar never matches")
    return '"' + "".join(_GBNF_ESCAPES.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 0x20 or c == "\x7f" else c) for c in text) + '"'


def json_text(value: Any) -> str:
    """``value`` as JSON text (``json.dumps``'s spacing), non-ASCII written as itself."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def json_literal(value: Any) -> str:
    """The GBNF literal of ``value``'s JSON text."""
    return gbnf_literal(json_text(value))


def xml_writable(text: str) -> bool:
    """Whether ``text`` can stand raw as an XML parameter value (and be read back as itself)."""
    return not any(tag in text for tag in XML_CLOSING_TAGS) and not _SURROGATE.search(text) and "\x00" not in text


def text_without(words: tuple[str, ...], name: str) -> dict[str, str]:
    """Rules (``name`` first) for any text that contains none of ``words``, each of which starts
    with ``<`` and holds no other ``<``: a state per prefix of a word read so far, where a ``<``
    starts a new prefix and any other character that does not go on with one starts afresh."""
    assert all(w.startswith("<") and "<" not in w[1:] for w in words)
    prefixes = sorted({w[:i] for w in words for i in range(len(w))}, key=lambda p: (len(p), p))
    state = {p: f"{name}-{i}" if p else name for i, p in enumerate(prefixes)}
    rules = {}
    for prefix in prefixes:
        nexts = sorted({w[len(prefix)] for w in words if w.startswith(prefix)})
        options = [f"{gbnf_literal(c)} {state[prefix + c]}" for c in nexts if prefix + c in state]
        if "<" not in nexts:
            options.append(f'"<" {state["<"]}')
        others = "".join(class_char(ord(c)) for c in sorted({"<", *nexts}))
        options.append(f"[^{others}] {name}")
        rules[state[prefix]] = "( " + " | ".join(options) + " )?"
    return rules


_ESCAPE = r'\\(?:[\\"nrt\[\]]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})'
GBNF_TOKEN = re.compile(
    rf'(?P<space>\s+)|(?P<literal>"(?:[^"\\\n]|{_ESCAPE})*")|(?P<class>\[\^?(?:[^\]\\\n]|{_ESCAPE})*\])'
    r"|(?P<name>[A-Za-z0-9-]+)|(?P<open>\()|(?P<close>\))|(?P<op>[|*+?]|\{\d+(?:,\d*)?\})"
)


def check_gbnf(grammar: str) -> str:
    """``grammar``, after checking that llama.cpp will parse it: every literal and class uses
    escapes it knows, brackets balance, every rule referenced is defined, and there is a ``root``.
    A grammar refused later would fail the request from inside the engine (with ``auto``, rather
    than dropping the lazy check); a ``ValueError`` here is handled as any other schema error."""
    rules: dict[str, str] = {}
    for line in grammar.splitlines():
        name, sep, body = line.partition(" ::= ")
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name):
            raise ValueError(f"the grammar built is not valid GBNF (line {line[:60]!r})")
        if not body.strip():
            raise ValueError(f"the grammar built is not valid GBNF (rule {name} is empty)")
        rules[name] = body
    used = {"root"}
    for name, body in rules.items():
        depth, pos = 0, 0
        while pos < len(body):
            match = GBNF_TOKEN.match(body, pos)
            if match is None or match.end() == pos:
                raise ValueError(f"the grammar built is not valid GBNF (rule {name}, at {body[pos:pos + 40]!r})")
            depth += (match.lastgroup == "open") - (match.lastgroup == "close")
            if depth < 0:
                raise ValueError(f"the grammar built is not valid GBNF (rule {name} closes a bracket it never opened)")
            if match.lastgroup == "name":
                used.add(match.group())
            pos = match.end()
        if depth:
            raise ValueError(f"the grammar built is not valid GBNF (rule {name} leaves a bracket open)")
    missing = sorted(used - set(rules))
    if missing:
        raise ValueError(f"the grammar built is not valid GBNF (no rule {missing[0]!r})")
    return grammar


def renamed(body: str, names: dict[str, str]) -> str:
    """A rule's body with the rules it references renamed by ``names`` (literals and classes kept)."""
    return "".join(
        names.get(m.group(), m.group()) if m.lastgroup == "name" else m.group() for m in GBNF_TOKEN.finditer(body)
    )


def grammar_rules(grammar: str) -> dict[str, str]:
    """A grammar's rules by name, to be joined with others' (``grammar_text``)."""
    return dict(line.split(" ::= ", 1) for line in grammar.splitlines() if " ::= " in line)


def unused_name(rules: Mapping[str, str], name: str) -> str:
    """``name``, or a longer one no rule has (with its ``-1``, ``-2``… the thought's rules use)."""
    while any(rule == name or rule.startswith(name + "-") for rule in rules):
        name += "x"
    return name


def grammar_text(rules: Mapping[str, str]) -> str:
    """The GBNF of ``rules`` (one has to be ``root``), checked as llama.cpp will read it."""
    return check_gbnf("".join(f"{name} ::= {body}\n" for name, body in sorted(rules.items())))
