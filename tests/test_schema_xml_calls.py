"""Qwen3.5's XML tool calls, whose parameters are written raw rather than as JSON: a tool's
``$defs`` reached from each parameter's own rule, string enums and text holding ``<``, NUL in names
and values, and ``pattern`` and ``format`` on string parameters.

Grammars are checked on llama.cpp's own grammar engine (``gbnf_check.py``), calls read back whole
and streamed a character at a time, and the requests an agent sends (OpenAI's ``pydantic_function_tool``
with nested models) through the openai SDK against a server running the tiny model with a Qwen3.5
chat template. The helpers and that server are shared with ``test_schema_keywords.py``.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from gbnf_check import GrammarChecker
from live_server import MODEL_ID, LiveServer, sdk
from test_schema_keywords import ASK, FAMILIES, NO_THINKING, XML, Address, qwen35, read_xml, tool, xml_call  # noqa: F401  (qwen35: the fixture)
from vramsupply.chat.forced import forced_call_grammar
from vramsupply.chat.schema import UnsatisfiableSchema
from vramsupply.engine import ChatRequest


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    home: Address


PERSON_TOOL = openai.pydantic_function_tool(Person, name="save_person")  # $defs + $ref, strict: true
PERSON = PERSON_TOOL["function"]["parameters"]


def test_a_tool_whose_parameters_use_defs_is_forced_in_xml_calls(checker: GrammarChecker) -> None:
    """Each XML parameter has its own rule, yet its ``$ref`` points into the whole tool's ``$defs``
    (the rule was built from the parameter alone: 'Error resolving ref … $defs not in …')."""
    grammar = forced_call_grammar(XML, [PERSON_TOOL["function"]], parallel=False)
    call = xml_call("save_person", name="Ann", home='{"street": "Elm", "zip": 12345}')
    assert checker.accepts(grammar, call)
    assert not checker.accepts(grammar, xml_call("save_person", name="Ann", home='{"street": "Elm"}'))
    assert not checker.accepts(grammar, xml_call("save_person", name="Ann", home='{"street": "Elm", "zip": 12}'))
    whole, streamed = read_xml(call, {"save_person": PERSON})
    assert whole == streamed == {"name": "Ann", "home": {"street": "Elm", "zip": 12345}}
    jsonschema.validate(whole, PERSON)


def test_two_tools_with_a_def_of_one_name_keep_their_own(checker: GrammarChecker) -> None:
    def with_item(item: dict) -> dict:
        return {"type": "object", "$defs": {"Item": item}, "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"]}

    numbers = {"name": "numbers", "parameters": with_item({"type": "integer", "minimum": 0, "maximum": 9})}
    flags = {"name": "flags", "parameters": with_item({"type": "boolean"})}
    for syntax in (XML, FAMILIES["hermes"]):
        grammar = forced_call_grammar(syntax, [numbers, flags], parallel=False)
        if syntax is XML:
            good, bad = [xml_call("numbers", item="7"), xml_call("flags", item="true")], [xml_call("numbers", item="true")]
        else:
            call = '<tool_call>\n{{"name": "{}", "arguments": {{"item": {}}}}}\n</tool_call>'
            good, bad = [call.format("numbers", 7), call.format("flags", "true")], [call.format("numbers", "true"), call.format("flags", 7)]
        assert all(checker.accepts(grammar, text) for text in good), syntax.name
        assert not any(checker.accepts(grammar, text) for text in bad), syntax.name


def test_a_string_enum_holding_lt_is_written_raw_and_read_back_as_itself(checker: GrammarChecker) -> None:
    """``["<", "<=", "=="]`` fell back to JSON (quotes and all), which the XML parser then kept."""
    schema = {"type": "object", "properties": {"op": {"type": "string", "enum": ["<", "<=", "=="]}}, "required": ["op"]}
    grammar = forced_call_grammar(XML, [{"name": "filter", "parameters": schema}], parallel=False)
    for op in ("<", "<=", "=="):
        assert checker.accepts(grammar, xml_call("filter", op=op))
        assert read_xml(xml_call("filter", op=op), {"filter": schema}) == ({"op": op}, {"op": op})
    assert not checker.accepts(grammar, xml_call("filter", op='"<"'))
    untyped = {"type": "object", "properties": {"v": {"enum": ["1", "null"]}}, "required": ["v"]}
    assert read_xml(xml_call("f", v="1"), {"f": untyped}) == ({"v": "1"}, {"v": "1"})  # text, as the grammar writes it


def test_nul_in_an_xml_enum_value_or_parameter_name_never_reaches_the_grammar(checker: GrammarChecker) -> None:
    """llama.cpp's grammar never matches NUL: a grammar that had to write one aborted the whole
    serving process (``Unexpected empty grammar stack``) once sampling reached it."""
    some = {"type": "object", "properties": {"op": {"type": "string", "enum": ["\x00", "a\x00", "ok"]}, "c\x00": {"type": "string"}}, "required": ["op"]}
    grammar = forced_call_grammar(XML, [{"name": "f", "parameters": some}], parallel=False)
    assert "x00" not in grammar and checker.accepts(grammar, xml_call("f", op="ok"))
    for schema, why in [
        ({"type": "object", "properties": {"op": {"type": "string", "enum": ["\x00"]}}, "required": ["op"]}, "no value of a string enum"),
        ({"type": "object", "properties": {"c\x00": {"type": "string"}}, "required": ["c\x00"]}, "cannot be written in this model's XML calls"),
    ]:
        with pytest.raises(UnsatisfiableSchema, match=why):
            forced_call_grammar(XML, [{"name": "f", "parameters": schema}], parallel=False)


def test_xml_text_parameters_may_hold_lt_but_never_a_closing_tag(checker: GrammarChecker) -> None:
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string"}, "short": {"type": "string", "maxLength": 11}, "op": {"enum": ["a</tool_call>", "<"]}},
        "required": ["code", "short", "op"],
    }
    grammar = forced_call_grammar(XML, [{"name": "run", "parameters": schema}], parallel=False)
    code = "if a < b and c <= d:\n    html = '<b>x</b></p'\n<"
    call = xml_call("run", code=code, short="</paramete", op="<")
    assert checker.accepts(grammar, call)
    assert read_xml(call, {"run": schema}) == ({"code": code, "short": "</paramete", "op": "<"},) * 2
    for broken in ("x</parameter>y", "x</tool_call>", "<</parameter>"):
        assert not checker.accepts(grammar, xml_call("run", code=broken, short="s", op="<")), broken
    assert not checker.accepts(grammar, xml_call("run", code="c", short="s", op="a</tool_call>"))


def test_xml_string_parameters_keep_their_pattern_and_format(checker: GrammarChecker) -> None:
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, "day": {"type": "string", "format": "date"}},
        "required": ["code", "day"],
    }
    grammar = forced_call_grammar(XML, [{"name": "book", "parameters": schema}], parallel=False)
    assert checker.accepts(grammar, xml_call("book", code="AB-123", day="2024-02-29"))
    assert not checker.accepts(grammar, xml_call("book", code="AB-12x", day="2024-02-29"))
    assert not checker.accepts(grammar, xml_call("book", code="AB-123", day="2023-02-29"))


def test_qwen35_forces_a_pydantic_tool_and_holds_an_auto_call_to_it(qwen35: LiveServer) -> None:
    assert qwen35.engine is not None
    with sdk(qwen35) as client:
        for choice in ("required", {"type": "function", "function": {"name": "save_person"}}):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=[PERSON_TOOL], tool_choice=choice, parallel_tool_calls=False, max_tokens=200, seed=3, extra_body=NO_THINKING
            )
            assert response.choices[0].finish_reason == "tool_calls", response.choices[0]
            [call] = response.choices[0].message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), PERSON)
    prompt = qwen35.engine.prepare_chat(ChatRequest(messages=ASK, tools=[PERSON_TOOL], tool_choice="auto", template_variables={"enable_thinking": False}))
    assert prompt.grammar is not None and prompt.grammar_triggers


def test_qwen35_writes_an_enum_holding_lt_as_the_enum_says(qwen35: LiveServer) -> None:
    schema = {"type": "object", "properties": {"op": {"type": "string", "enum": ["<", "<=", "=="]}}, "required": ["op"], "additionalProperties": False}
    with sdk(qwen35) as client:
        for seed in (1, 2, 3):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=[tool("filter", schema)], tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=seed, extra_body=NO_THINKING
            )
            assert response.choices[0].finish_reason == "tool_calls", response.choices[0]
            [call] = response.choices[0].message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), schema)
