"""Numeric bounds and JSON strings in the grammars built from JSON schemas, checked without a model.

A bound becomes a digit pattern (``vramsupply.chat.numbers``) that renders both as GBNF and as a
Python regex. Over thousands of random ranges (wide, negative, open, exclusive, fractional), the
regex must accept exactly the numbers the bound allows; and for a sample of them, llama.cpp's own
grammar engine (``gbnf_check``) must accept exactly the same texts from the GBNF. Last, the string
parameters of Qwen3.5's XML calls, which are plain text rather than JSON; numbers that must keep
their bounds once read as doubles; and the string formats a grammar enforces (real calendar dates).
"""

from __future__ import annotations

import datetime
import json
import random
import re
from decimal import Decimal

import pytest

from gbnf_check import GrammarChecker
from vramsupply.chat import ReasoningMarkers
from vramsupply.chat.limits import MAX_CHECKED_BYTES, MAX_SCHEMA_BYTES, CheckBudget, InvalidSchema, SchemaTooComplex, check_valid_at_any_size, schema_grammar
from vramsupply.chat.forced import after_thought, forced_call_grammar
from vramsupply.chat.numbers import Bound, decimals, integers, to_regex
from vramsupply.chat.schema import UnsatisfiableSchema, schema_to_gbnf
from vramsupply.chat.syntaxes import syntax_for

NEVER_NUMBERS = ("-0", "-0.0", "00", "01", "1.", ".5", "+1", "1e3", "1E3", "-", "")


def matcher(node: object) -> re.Pattern[str] | None:
    return None if node is None else re.compile(to_regex(node))  # type: ignore[arg-type]


def accepted(pattern: re.Pattern[str] | None, text: str) -> bool:
    return pattern is not None and pattern.fullmatch(text) is not None


def random_integer_bound(rng: random.Random) -> int | None:
    if rng.random() < 0.2:
        return None
    return rng.randint(-1500, 1500) * rng.choice([1, 1, 1, 7, 1000, 10**9])


def in_range(value: Decimal, low: Bound | None, high: Bound | None) -> bool:
    above = low is None or (value >= low.value if low.inclusive else value > low.value)
    below = high is None or (value <= high.value if high.inclusive else value < high.value)
    return above and below


def random_decimal_bound(rng: random.Random) -> Bound | None:
    if rng.random() < 0.2:
        return None
    return Bound(Decimal(rng.randint(-3000, 3000)) / 10 ** rng.randint(0, 3), rng.random() < 0.5)


def decimal_texts(rng: random.Random) -> list[str]:
    fractions = ["", ".0", ".00", ".5", ".05", ".1", ".25", ".999", ".001", ".0001", ".50"]
    texts = [f"{whole}{fraction}" for whole in range(-32, 33) for fraction in fractions]
    texts += [f"{rng.randint(-32, 32)}.{rng.randint(0, 9999):0{rng.randint(1, 4)}d}" for _ in range(400)]
    return [t for t in texts if not (t.startswith("-0") and Decimal(t) == 0)]  # "-0…" is never written


def test_integer_ranges_accept_exactly_their_integers() -> None:
    rng = random.Random(13)
    for _ in range(1000):
        low, high = random_integer_bound(rng), random_integer_bound(rng)
        pattern = matcher(integers(low, high))
        window = [n for n in range(-2000, 2001)] + [b + d for b in (low, high) if b is not None for d in (-1, 0, 1)]
        for n in window:
            fits = (low is None or n >= low) and (high is None or n <= high)
            assert accepted(pattern, str(n)) == fits, (low, high, n)
        assert not any(accepted(pattern, text) for text in NEVER_NUMBERS), (low, high)


def test_open_integer_ranges_stop_at_sixteen_digits_unless_the_bound_is_longer() -> None:
    assert accepted(matcher(integers(5, None)), "9" * 16) and not accepted(matcher(integers(5, None)), "1" + "0" * 16)
    assert accepted(matcher(integers(10**20, None)), str(10**20 + 7))
    assert accepted(matcher(integers(None, -(10**20))), str(-(10**20) - 1))
    assert integers(3, 2) is None


def test_decimal_ranges_accept_exactly_their_numbers() -> None:
    rng = random.Random(31)
    texts = decimal_texts(rng)
    for _ in range(1000):
        low, high = random_decimal_bound(rng), random_decimal_bound(rng)
        if low is not None and rng.random() < 0.3:  # narrow ranges, often within one integer
            high = Bound(low.value + Decimal(rng.randint(0, 30)) / 100, rng.random() < 0.5)
        pattern = matcher(decimals(low, high))
        for text in texts:
            assert accepted(pattern, text) == in_range(Decimal(text), low, high), (low, high, text)
        assert not any(accepted(pattern, text) for text in NEVER_NUMBERS), (low, high)


def test_a_unit_interval_allows_its_end_but_nothing_past_it() -> None:
    pattern = matcher(decimals(Bound(Decimal(0)), Bound(Decimal(1))))
    assert [t for t in ("0", "0.5", "1", "1.0", "1.000", "0.999") if accepted(pattern, t)] == ["0", "0.5", "1", "1.0", "1.000", "0.999"]
    assert not any(accepted(pattern, t) for t in ("1.5", "1.01", "1.0001", "2", "-0.5", "-1"))


def test_llama_cpp_enforces_the_same_bounds_from_the_gbnf(checker: GrammarChecker) -> None:
    rng = random.Random(7)
    texts = decimal_texts(rng)[::9]
    for _ in range(150):
        low, high = random_decimal_bound(rng), random_decimal_bound(rng)
        schema = {"type": "number", **bounds_keywords(low, high)}
        grammar = schema_grammar_or_none(schema)
        for text in texts:
            fits = in_range(Decimal(text), low, high)
            assert checker.accepts(grammar, text) == fits if grammar else not fits, (schema, text)
    for _ in range(150):
        low, high = random_integer_bound(rng), random_integer_bound(rng)
        schema = {"type": "integer", **({"minimum": low} if low is not None else {}), **({"maximum": high} if high is not None else {})}
        grammar = schema_grammar_or_none(schema)
        for n in [*range(-30, 31, 3), *(b + d for b in (low, high) if b is not None for d in (-1, 0, 1))]:
            fits = (low is None or n >= low) and (high is None or n <= high)
            assert (checker.accepts(grammar, str(n)) if grammar else False) == fits, (schema, n)


def bounds_keywords(low: Bound | None, high: Bound | None) -> dict[str, float]:
    keywords = {}
    if low is not None:
        keywords["minimum" if low.inclusive else "exclusiveMinimum"] = float(low.value)
    if high is not None:
        keywords["maximum" if high.inclusive else "exclusiveMaximum"] = float(high.value)
    return keywords


def schema_grammar_or_none(schema: dict) -> str | None:
    try:
        return schema_to_gbnf(schema)
    except UnsatisfiableSchema:
        return None


def test_every_bound_keyword_is_enforced(checker: GrammarChecker) -> None:
    cases = [
        ({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 40}, ["-2", "39"], ["-3", "40"]),
        ({"type": "integer", "minimum": 1.5, "maximum": 4.5}, ["2", "4"], ["1", "5"]),
        ({"type": "integer", "minimum": 5, "exclusiveMinimum": True}, ["6"], ["5"]),  # draft 4
        ({"type": "number", "exclusiveMinimum": 0}, ["0.001", "7"], ["0", "0.0", "-1"]),
        ({"type": "number", "minimum": -2.5, "exclusiveMaximum": -1}, ["-2.5", "-1.01"], ["-2.51", "-1", "-1.0"]),
        ({"type": ["integer", "null"], "minimum": 0, "maximum": 9}, ["null", "9"], ["10", "-1"]),
        ({"type": "object", "properties": {"n": {"type": "integer", "maximum": -100000}}}, ['{"n": -100000}'], ['{"n": -99999}']),
    ]
    for schema, good, bad in cases:
        grammar = schema_to_gbnf(schema)
        assert all(checker.accepts(grammar, text) for text in good), schema
        assert not any(checker.accepts(grammar, text) for text in bad), schema


def test_a_range_no_number_fits_is_refused() -> None:
    with pytest.raises(UnsatisfiableSchema, match="no integer satisfies"):
        schema_to_gbnf({"type": "integer", "minimum": 3, "maximum": 2.5})
    with pytest.raises(UnsatisfiableSchema):
        schema_to_gbnf({"type": "number", "exclusiveMinimum": 1, "maximum": 1})


def test_an_empty_union_or_type_list_fits_nothing(checker: GrammarChecker) -> None:
    """``anyOf: []`` wrote an empty GBNF rule, which llama.cpp refused inside the engine: a
    request with such a tool failed even with tool_choice auto, blaming a missing root rule."""
    for empty in ({"anyOf": []}, {"oneOf": []}, {"type": []}):
        with pytest.raises(UnsatisfiableSchema, match="no value fits|fits any value"):
            schema_to_gbnf(empty)
        optional = schema_to_gbnf({"type": "object", "properties": {"a": empty, "b": {"type": "integer"}}})
        assert checker.accepts(optional, '{"b": 1}') and not checker.accepts(optional, '{"a": 1, "b": 1}')
        with pytest.raises(UnsatisfiableSchema, match='the required property "a" at the top has a schema no value fits'):
            schema_to_gbnf({"type": "object", "properties": {"a": empty}, "required": ["a"]})
    assert checker.accepts(schema_to_gbnf({"anyOf": [{"type": []}, {"type": "integer"}]}), "7")


def test_json_strings_never_hold_raw_control_characters(checker: GrammarChecker) -> None:
    for schema in ({"type": "object"}, {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}}):
        grammar = schema_to_gbnf(schema)
        assert checker.accepts(grammar, json.dumps({"s": "two\nlines\t"}))
        assert not checker.accepts(grammar, '{"s": "two\nlines"}')
        assert not checker.accepts(grammar, '{"s": "tab\there"}')


def test_bounds_past_what_an_open_end_writes_need_no_digits_and_absurd_precision_is_refused(checker: GrammarChecker) -> None:
    """``maximum: 1.7e308`` (any double) holds for every number of at most 16 digits anyway."""
    grammar = schema_to_gbnf({"type": "integer", "minimum": -1.7e308, "maximum": 1.7e308})
    assert len(grammar) < 1000 and checker.accepts(grammar, "-1234") and checker.accepts(grammar, "9" * 16)
    with pytest.raises(ValueError, match="more than 100 digits"):
        schema_to_gbnf({"type": "number", "exclusiveMinimum": 5e-324})


def test_a_forced_xml_call_writes_string_parameters_raw_and_within_their_length(checker: GrammarChecker) -> None:
    """Qwen3.5 writes ``<parameter>`` values as plain text: a string enum without JSON quotes, a
    ``maxLength`` counted in characters."""
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 5}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    }
    grammar = forced_call_grammar(syntax_for("<tool_call><function=x><parameter=y>"), [{"name": "f", "parameters": parameters}], parallel=False)
    call = "<tool_call>\n<function=f>\n<parameter=city>\n{city}\n</parameter>\n<parameter=unit>\n{unit}\n</parameter>\n</function>\n</tool_call>"
    assert checker.accepts(grammar, call.format(city="Paris", unit="c"))
    assert not checker.accepts(grammar, call.format(city="Parisx", unit="c"))
    assert not checker.accepts(grammar, call.format(city="Paris", unit='"c"'))


def test_an_open_thought_ends_at_its_first_end_marker(checker: GrammarChecker) -> None:
    """The grammar's thought ends where the output parser's does: a model cannot go on "thinking"
    past ``</think>`` (llama-cpp-python's ``not_literal`` unit, repeated, matched the marker too)."""
    grammar = after_thought(schema_grammar({"type": "integer"}), ReasoningMarkers("<think>", "</think>"))

    assert checker.accepts(grammar, "hmm, <b> or </thin? </think>\n7")
    assert checker.accepts(grammar, "<</think>7")
    assert checker.accepts(grammar, "</think>7")
    assert not checker.accepts(grammar, "a</think>b</think>7")
    assert not checker.accepts(grammar, "7")
    forced = forced_call_grammar(syntax_for("<tool_call>"), [{"name": "f"}], parallel=False, open_reasoning=ReasoningMarkers("<think>", "</think>"))
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert checker.accepts(forced, "so</think>\n" + call)
    assert not checker.accepts(forced, "so</think>\nmore</think>\n" + call)


def test_exclusive_bounds_still_hold_once_a_number_is_read_as_a_double(checker: GrammarChecker) -> None:
    """``0.50000000000000005`` is read as ``0.5``: no grammar for ``exclusiveMinimum: 0.5`` may write it."""
    grammar = schema_to_gbnf({"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 1})
    assert not checker.accepts(grammar, "0.50000000000000005") and not checker.accepts(grammar, "0.99999999999999999")
    assert checker.accepts(grammar, "0.5000000000000001") and checker.accepts(grammar, "0.9999999999999999")
    rng = random.Random(5)
    for _ in range(60):
        bound = rng.choice([0.1, 0.5, 1, 3, -2.5, 1e-5, 123.456, -0.3, 2.0**53, 0.30000000000000004, rng.uniform(-100, 100)])
        side = rng.choice(["exclusiveMinimum", "exclusiveMaximum", "minimum", "maximum"])
        grammar = schema_to_gbnf({"type": "number", side: bound})
        for text in near(bound, rng):
            value = float(text)
            fits = {"exclusiveMinimum": value > bound, "exclusiveMaximum": value < bound, "minimum": value >= bound, "maximum": value <= bound}[side]
            assert fits or not checker.accepts(grammar, text), (side, bound, text)


def near(bound: float, rng: random.Random) -> list[str]:
    """Decimal texts within a few units of the 17th digit of ``bound``, as the grammar writes numbers."""
    exact = Decimal(repr(bound))
    step = Decimal(10) ** (exact.adjusted() - 17)
    texts = [f"{exact + step * rng.randint(-60, 60):f}" for _ in range(25)] + [f"{exact:f}"]
    return [t.rstrip("0").rstrip(".") if "." in t else t for t in texts if not t.startswith("-0")]


def test_format_email_and_friends_are_enforced(checker: GrammarChecker) -> None:
    cases = {
        "email": (["ann@example.com", "a.b+c@mail.example.org"], ["ann", "ann@", "@x.org", "a@b", "a..b@x.org"]),
        "ipv4": (["10.0.0.1", "255.255.255.255"], ["256.1.1.1", "1.2.3", "01.2.3.4"]),
        "hostname": (["example.com", "a-b.c"], ["-a.com", "a_b.com", "a..b"]),
        "uuid": (["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000"]),
        # pydantic's timedelta (a strict schema with one was a 400, as OpenAI's strict mode takes it)
        "duration": (["P1DT2H", "PT30M", "P3W", "P1Y2M3DT4H5M6S", "PT0.5S", "P2D", "P1M", "P1Y35DT1H1M1.25S", "PT1H1.25S"], ["P", "PT", "1D", "P1H", "PT1D", "P1.5D", "P1W2D"]),
    }
    for name, (good, bad) in cases.items():
        grammar = schema_to_gbnf({"type": "string", "format": name})
        assert all(checker.accepts(grammar, json.dumps(t)) for t in good), name
        assert not any(checker.accepts(grammar, json.dumps(t)) for t in bad), name


def test_a_date_is_a_calendar_date(checker: GrammarChecker) -> None:
    grammar = schema_to_gbnf({"type": "string", "format": "date"})
    for year in ("0000", "0001", "0004", "0100", "0400", "1900", "2000", "2023", "2024", "9999"):
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year}-{month:02d}-{day:02d}"
                try:
                    valid = bool(datetime.date.fromisoformat(text))
                except ValueError:
                    valid = False
                assert checker.accepts(grammar, json.dumps(text)) == valid, text


def test_times_and_date_times_stay_in_their_ranges(checker: GrammarChecker) -> None:
    grammar = schema_to_gbnf({"type": "string", "format": "date-time"})
    good = ["2024-02-29T23:59:59Z", "0001-01-01T00:00:00.000+23:59", "2023-12-31T12:30:00-05:00"]
    bad = ["0000-01-01T00:00:00Z", "2024-01-01T24:00:00Z", "2024-01-01T12:60:00Z", "2024-01-01T12:00:60Z", "2024-01-01T12:00:00+24:00", "2024-13-01T00:00:00Z"]
    assert all(checker.accepts(grammar, json.dumps(t)) for t in good)
    for text in good:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert not any(checker.accepts(grammar, json.dumps(t)) for t in bad)
    time = schema_to_gbnf({"type": "string", "format": "time"})
    assert checker.accepts(time, '"00:00:00Z"') and not checker.accepts(time, '"23:59:59"') and not checker.accepts(time, '"25:00:00Z"')


def test_a_root_ref_whose_definition_refers_to_another_one_is_a_grammar(checker: GrammarChecker) -> None:
    """pydantic's shape for recursive models: the root is a `$ref`, and a definition refers to
    another. llama-cpp-python's walk stopped at the root's `$ref` and never met the `$defs` beside
    it: a 400 "cannot turn this JSON schema into a grammar" for a valid schema."""
    schema = {
        "$defs": {
            "Folder": {"type": "object", "properties": {"name": {"type": "string"}, "files": {"type": "array", "items": {"$ref": "#/$defs/File"}}},
                       "required": ["name", "files"], "additionalProperties": False},
            "File": {"type": "object", "properties": {"name": {"type": "string"}, "parent": {"anyOf": [{"$ref": "#/$defs/Folder"}, {"type": "null"}]}},
                     "required": ["name", "parent"], "additionalProperties": False},
        },
        "$ref": "#/$defs/Folder",
    }
    grammar = schema_to_gbnf(schema)

    assert checker.accepts(grammar, '{"name": "a", "files": [{"name": "b", "parent": {"name": "c", "files": []}}]}')
    assert checker.accepts(grammar, '{"name": "a", "files": [{"name": "b", "parent": null}]}')
    assert not checker.accepts(grammar, '{"name": "a", "files": [{"name": "b"}]}')


def test_a_schema_past_the_limits_is_held_to_json_schemas_rules_up_to_the_size_checked() -> None:
    """A tool's schema too large for a grammar is still checked against the meta-schema (its
    invalid keyword is an ``InvalidSchema``), but only up to ``MAX_CHECKED_BYTES``: past it the
    check's CPU (seconds for a megabyte) would be taken from every stream, so it is not checked."""
    def schema(padding: int) -> dict:
        return {"type": "object", "description": "x" * padding, "properties": {"n": {"type": "integer", "minimum": "0"}}}

    with pytest.raises(InvalidSchema):
        check_valid_at_any_size(schema(MAX_SCHEMA_BYTES * 2))
    with pytest.raises(SchemaTooComplex, match="at most 131,072 are checked in one request"):
        check_valid_at_any_size(schema(MAX_CHECKED_BYTES))


def test_schemas_past_the_limits_are_checked_up_to_a_budget_for_the_whole_request() -> None:
    """The size checked is bounded per request, not per schema: 32 tools of 127 KB each took 3.3 s of
    CPU a request, from every stream. Within the budget the first ones are checked, the rest not."""
    big = {"type": "object", "description": "x" * (MAX_CHECKED_BYTES // 3), "properties": {"n": {"type": "integer", "minimum": "0"}}}
    budget = CheckBudget()
    for _ in range(2):
        with pytest.raises(InvalidSchema):
            check_valid_at_any_size(big, budget)
    with pytest.raises(SchemaTooComplex, match="in one request"):
        check_valid_at_any_size(big, budget)
    with pytest.raises(InvalidSchema):
        check_valid_at_any_size({**big, "description": ""}, budget)  # within the limits: always checked
