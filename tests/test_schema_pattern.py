"""A JSON schema's string ``pattern``, as llama.cpp enforces it: the grammar accepts exactly the
JSON strings whose text the regex matches (ECMA-262's meaning: ``\\d`` and ``\\w`` are ASCII, an
unanchored pattern matches anywhere), with quotes and backslashes escaped as JSON writes them.

Checked on the real grammar sampler (``gbnf_check.py``), against Python's ``re`` on every string of
a small alphabet that holds the characters JSON must escape.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from gbnf_check import GrammarChecker
from vramsupply.chat.limits import schema_grammar
from vramsupply.chat.pattern import PatternError

ALPHABET = ["a", "b", "7", '"', "\\", ".", "-", " ", "é"]
STRINGS = ["".join(chars) for n in range(4) for chars in itertools.product(ALPHABET, repeat=n)]
PATTERNS = [
    r"^[0-9]+\.[0-9]+$",  # a version number: \. was written into the grammar as-is, which llama.cpp refused
    r"^\d{1,2}$",
    r"^\w+$",
    r'^a"b$',  # a quote the regex allows was written raw, ending the JSON string early
    r'^[a"\\]{2}$',
    r"^.+$",
    r"^[^a7]*$",
    r"^(a|\\|\"){2,3}$",
    r"^a-?b$",
    r"7\.",  # unanchored: anywhere in the string
    r"^é$",
    r"^[\Da]$",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_grammar_accepts_the_json_strings_the_pattern_matches(checker: GrammarChecker, pattern: str) -> None:
    grammar = schema_grammar({"type": "string", "pattern": pattern})
    regex = re.compile(pattern, re.ASCII)

    wrong = [s for s in STRINGS if checker.accepts(grammar, json.dumps(s, ensure_ascii=False)) != bool(regex.search(s))]

    assert wrong == []


def test_a_control_character_the_pattern_names_is_written_escaped(checker: GrammarChecker) -> None:
    grammar = schema_grammar({"type": "string", "pattern": r"^a\tb$"})
    assert checker.accepts(grammar, '"a\\tb"')
    assert not checker.accepts(grammar, '"a\tb"'), "a raw tab is no JSON"


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        (r"^(ab$", "no valid regular expression"),
        (r"(?i)^abc$", "inline flags"),
        (r"^(a)\1$", "not supported"),
        (r"^(?=a)a$", "not supported"),
        (r"^(a{100}){100}$", "repeats too much"),
    ],
)
def test_a_pattern_no_grammar_can_express_is_refused_with_its_reason(pattern: str, says: str) -> None:
    with pytest.raises(PatternError, match=re.escape(says)):
        schema_grammar({"type": "string", "pattern": pattern})
