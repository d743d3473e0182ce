"""JSON Schema keywords in the grammars built for tools and ``response_format``: what they enforce,
and what ``strict: true`` refuses.

Grammars are checked on llama.cpp's own grammar engine (``gbnf_check.py``), parsed calls against
the schema with ``jsonschema``, and the requests an agent sends (strict schemas, odd property names)
through the openai SDK against servers running the tiny model with a Qwen3 (Hermes JSON calls) and
a Qwen3.5 (XML calls) chat template. The raw parameters of Qwen3.5's XML calls are tested in
``test_schema_xml_calls.py``, with the helpers and servers here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional, Union

import jsonschema
import openai
import pydantic
import pytest
from openai import BadRequestError, OpenAI

from gbnf_check import GrammarChecker
from live_server import MODEL_ID, LiveServer, sdk
from vramsupply.chat import SYNTAXES, OutputParser, ParsedOutput
from vramsupply.chat.call_parsers import parse_tool_call_blocks
from vramsupply.chat.forced import forced_call_grammar
from vramsupply.chat.limits import schema_grammar
from vramsupply.chat.schema import UnsatisfiableSchema
from vramsupply.engine import ChatRequest

XML = next(s for s in SYNTAXES if s.name == "qwen3-xml")
FAMILIES = {s.name: s for s in SYNTAXES}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
ASK = [{"role": "user", "content": "Save it."}]


@pytest.fixture(scope="module")
def qwen35(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(model_path=chat_models["qwen35"], n_ctx=2048) as live:
        yield live


@pytest.fixture(scope="module")
def qwen3(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(model_path=chat_models["qwen3"], n_ctx=2048) as live:
        yield live


def tool(name: str, parameters: dict, strict: bool | None = None) -> dict:
    function = {"name": name, "parameters": parameters, **({"strict": strict} if strict is not None else {})}
    return {"type": "function", "function": function}


def xml_call(function: str, **values: str) -> str:
    parameters = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
    return f"<tool_call>\n<function={function}>\n{parameters}</function>\n</tool_call>"


def read_xml(text: str, schemas: dict) -> tuple[dict, dict]:
    """The arguments of the one call in ``text``: read whole, and streamed a character at a time."""
    [whole], rest = parse_tool_call_blocks(text, schemas)
    parser = OutputParser(syntax=XML, schemas=schemas)
    pieces = [p for i in range(len(text)) for p in parser.push(text[i])] + parser.finish()
    [streamed] = ParsedOutput().add(pieces).tool_calls
    assert rest == ""
    return json.loads(whole.arguments), json.loads(streamed.arguments)


# ---- strict: true refuses what a grammar cannot hold; without it, what is cheap is enforced -------------

UNENFORCED = [
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("not", {"type": "integer", "not": {"enum": [1]}}),
    ("multipleOf", {"type": "integer", "multipleOf": 7}),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}),
    ("minProperties", {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2}),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^x"}}),
    ("contains", {"type": "array", "contains": {"const": 42}}),
    ("format", {"type": "string", "format": "uri"}),
    ("maxLength", {"type": "string", "pattern": "^a+$", "maxLength": 3}),
    ("if", {"type": "object", "properties": {"k": {"type": "string"}}, "if": {"required": ["k"]}, "then": {"required": ["n"]}}),
    ("dependentRequired", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}}),
    ("minimum", {"$ref": "#/$defs/n", "minimum": 3, "$defs": {"n": {"type": "integer"}}}),
]


@pytest.mark.parametrize(("keyword", "inner"), UNENFORCED, ids=[k for k, _ in UNENFORCED])
def test_strict_refuses_a_keyword_the_grammar_cannot_hold_and_says_where(keyword: str, inner: dict) -> None:
    defs = inner.pop("$defs", None)
    schema = {"type": "object", "properties": {"a": inner}, "required": ["a"], **({"$defs": defs} if defs else {})}
    schema_grammar(schema)  # without strict: accepted, not enforced (the README lists these)
    with pytest.raises(ValueError, match=f"'{keyword}' at response_format.json_schema.schema.properties.a "):
        schema_grammar(schema, strict=True, root="response_format.json_schema.schema")
    with pytest.raises(ValueError, match=f"'{keyword}' at properties.a in the parameters of tool 'f'"):
        forced_call_grammar(FAMILIES["hermes"], [{"name": "f", "strict": True, "parameters": schema}], parallel=False)
    forced_call_grammar(FAMILIES["hermes"], [{"name": "f", "parameters": schema}], parallel=False)


class Address(pydantic.BaseModel):
    street: str = pydantic.Field(max_length=8)
    zip: int = pydantic.Field(ge=1000, le=99999)


class Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(pydantic.BaseModel):
    kind: Literal["dog"]
    good: bool


class Owner(pydantic.BaseModel):
    name: str
    home: Address
    away: Optional[Address]
    pet: Union[Cat, Dog] = pydantic.Field(discriminator="kind")
    tags: list[str]
    mood: Literal["calm", "busy"]


def test_strict_accepts_the_schemas_openai_and_pydantic_write() -> None:
    strict = [
        openai.pydantic_function_tool(Owner)["function"]["parameters"],
        Owner.model_json_schema(),
        {"type": "object", "properties": {"n": {"type": ["integer", "null"], "minimum": 0}, "d": {"type": "string", "format": "date-time"}}, "required": ["n", "d"]},
        {"type": "object", "properties": {"v": {"oneOf": [{"type": "string"}, {"type": "integer"}]}, "e": {"type": "string", "format": "email"}}},
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False, "minItems": 2},
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"], "maxProperties": 2, "minProperties": 2},
    ]
    for schema in strict:
        schema_grammar(schema, strict=True, root="response_format.json_schema.schema")
        forced_call_grammar(XML, [{"name": "f", "strict": True, "parameters": schema}], parallel=False) if schema.get("type") == "object" else None


def test_a_required_name_properties_does_not_list_is_still_written(checker: GrammarChecker) -> None:
    """``required: ["a", "b"]`` with only ``a`` in ``properties``: ``b`` is written, with any value
    (or what ``additionalProperties`` allows); every family's call grammar and response_format."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a", "b"]}
    grammar = schema_grammar(schema)
    assert checker.accepts(grammar, '{"a": "x", "b": [1, "y"]}') and checker.accepts(grammar, '{"a": "x", "b": null}')
    assert not checker.accepts(grammar, '{"a": "x"}')
    typed = schema_grammar({**schema, "additionalProperties": {"type": "integer"}})
    assert checker.accepts(typed, '{"a": "x", "b": 7}') and not checker.accepts(typed, '{"a": "x", "b": "7"}')
    with pytest.raises(UnsatisfiableSchema, match='"b" is required'):
        schema_grammar({**schema, "additionalProperties": False})
    calls = {
        "hermes": '<tool_call>\n{{"name": "f", "arguments": {}}}\n</tool_call>',
        "llama3": '{{"name": "f", "parameters": {}}}',
        "mistral": '[TOOL_CALLS][{{"name": "f", "arguments": {}}}]',
    }
    for family, call in calls.items():
        forced = forced_call_grammar(FAMILIES[family], [{"name": "f", "parameters": schema}], parallel=False)
        assert checker.accepts(forced, call.format('{"a": "x", "b": 1}')) and not checker.accepts(forced, call.format('{"a": "x"}')), family
    forced = forced_call_grammar(XML, [{"name": "f", "parameters": schema}], parallel=False)
    assert checker.accepts(forced, xml_call("f", a="x", b="[1]")) and not checker.accepts(forced, xml_call("f", a="x"))
    assert read_xml(xml_call("f", a="x", b="[1]"), {"f": schema}) == ({"a": "x", "b": [1]},) * 2


def test_strict_and_required_names_over_http(qwen3: LiveServer) -> None:
    loose = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a", "b"]}
    unique = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "required": ["a"]}
    with sdk(qwen3) as client:
        with pytest.raises(BadRequestError) as refused_format:
            client.chat.completions.create(
                model=MODEL_ID, messages=ASK, max_tokens=5, response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": unique}}
            )
        with pytest.raises(BadRequestError) as refused_tool:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, tools=[tool("f", unique, strict=True)], tool_choice="required")
        with pytest.raises(BadRequestError) as refused_auto:  # auto promises the schema too, once a call starts
            client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, tools=[tool("f", unique, strict=True)])
        answer = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=120, seed=2, extra_body=NO_THINKING,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": loose}},
        )  # fmt: skip
        called = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=120, seed=2, tools=[tool("f", loose)], tool_choice="required", parallel_tool_calls=False, extra_body=NO_THINKING
        )
    assert refused_format.value.body["param"] == "response_format.json_schema.schema"
    assert "'uniqueItems' at response_format.json_schema.schema.properties.a" in refused_format.value.body["message"]
    assert refused_tool.value.body["param"] == "tools" and "'uniqueItems'" in refused_tool.value.body["message"]
    assert refused_auto.value.body["param"] == "tools" and "'uniqueItems' at tools[0].function.parameters" in refused_auto.value.body["message"]
    assert answer.choices[0].finish_reason == "stop", answer.choices[0]
    jsonschema.validate(json.loads(answer.choices[0].message.content), loose)
    jsonschema.validate(json.loads(called.choices[0].message.tool_calls[0].function.arguments), loose)


@pytest.mark.parametrize(
    ("parameters", "where"),
    [
        ({"type": "object", "properties": {"a": {"type": "strng"}}, "required": ["a"], "additionalProperties": False}, ".properties.a.type"),
        ({"type": "object", "properties": {"a": {"type": "string", "maxLength": "3"}}, "required": ["a"], "additionalProperties": False}, ".properties.a.maxLength"),
        ({"type": "object", "properties": {"a": {"type": "object", "properties": ["x"]}}, "required": ["a"], "additionalProperties": False}, ".properties.a.properties"),
    ],
    ids=["unknown-type", "length-a-string", "properties-a-list"],
)
def test_a_strict_tool_schema_the_converter_cannot_read_is_a_400_naming_it(qwen3: LiveServer, parameters: dict, where: str) -> None:
    """It was a 500 (the converter's AssertionError, TypeError or AttributeError), whatever tool_choice
    was; each breaks JSON Schema's own rules, which every tool is held to now, strict or not."""
    with sdk(qwen3) as client, pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, tools=[tool("f", parameters, strict=True)], tool_choice="none")
    assert refused.value.body["param"] == "tools[0].function.parameters" + where
    assert refused.value.body["message"].startswith("Invalid schema for function 'f': ")


def test_parameters_named_like_keywords_are_parameters(qwen3: LiveServer) -> None:
    """A tool parameter may be called "required" or "enum": only a schema's own keywords must be lists."""
    properties = {"required": {"type": "boolean"}, "enum": {"type": "string", "enum": ["a", "b"]}}
    with sdk(qwen3) as client:
        called = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=400, seed=1, extra_body=NO_THINKING, parallel_tool_calls=False,
            tools=[tool("f", {"type": "object", "properties": properties, "required": ["required", "enum"]})], tool_choice="required",
        )  # fmt: skip
    arguments = json.loads(called.choices[0].message.tool_calls[0].function.arguments)
    assert set(arguments) == {"required", "enum"} and arguments["enum"] in ("a", "b")


@pytest.mark.parametrize(
    ("properties", "param"),
    [
        ({"unit": {"enum": "celsius"}}, "tools[0].function.parameters.properties.unit.enum"),
        ({"where": {"type": "object", "properties": {"x": {"type": "string"}}, "required": "x"}}, "tools[0].function.parameters.properties.where.required"),
        ({"where": {"anyOf": [{"type": "object", "required": [1]}]}}, "tools[0].function.parameters.properties.where.anyOf[0].required[0]"),
    ],
    ids=["enum-a-string", "required-a-string", "required-not-names"],
)
def test_a_keyword_that_must_be_a_list_is_refused_when_it_is_not(qwen3: LiveServer, properties: dict, param: str) -> None:
    """"enum": "celsius" was read as the list of its characters: a forced call gave {"unit": "e"}."""
    with sdk(qwen3) as client, pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, tools=[tool("f", {"type": "object", "properties": properties})], tool_choice="required")
    assert refused.value.body["param"] == param


# ---- names and values with any character -------------------------------------------------------------

ODD_NAMES = ['a"b', "x\\y", "tab\there", "bell\x07", "ü ñ", "日本", "del\x7f", "\\u0041", "end\\"]


def test_property_names_and_enum_values_holding_any_character(checker: GrammarChecker) -> None:
    """A quote ended the grammar's literal ('grammar is not valid GBNF'), a backslash was written
    unescaped (no JSON at all): every name and value is now written as the JSON it is."""
    schema = {
        "type": "object",
        "properties": {**{name: {"type": "integer", "maximum": 9} for name in ODD_NAMES}, "e": {"enum": ODD_NAMES}},
        "required": [*ODD_NAMES, "e"],
        "additionalProperties": False,
    }
    grammar = schema_grammar(schema)
    for value in ODD_NAMES:
        answer = {**{name: 1 for name in ODD_NAMES}, "e": value}
        assert checker.accepts(grammar, json.dumps(answer, ensure_ascii=False).replace("\x7f", "\\u007f")), value
    assert not checker.accepts(grammar, json.dumps({**{name: 1 for name in ODD_NAMES}, "e": "a"}))
    forced = forced_call_grammar(XML, [{"name": "f", "parameters": {"type": "object", "properties": {'a"b': {"enum": ['x"\\y']}}, "required": ['a"b']}}], parallel=False)
    assert checker.accepts(forced, xml_call("f", **{'a"b': 'x"\\y'}))


def test_odd_property_names_over_http_forced_auto_and_response_format(qwen3: LiveServer, qwen35: LiveServer) -> None:
    schema = {"type": "object", "properties": {'a"b': {"type": "integer", "minimum": 0, "maximum": 9}, "x\\y": {"type": "boolean"}}, "required": ['a"b', "x\\y"]}
    for server in (qwen3, qwen35):
        assert server.engine is not None
        with sdk(server) as client:
            forced = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=[tool("f", schema)], tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=1, extra_body=NO_THINKING
            )
            auto = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[tool("f", schema)], max_tokens=5, extra_body=NO_THINKING)
            formatted = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, max_tokens=200, seed=1, extra_body=NO_THINKING,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            )  # fmt: skip
        assert forced.choices[0].finish_reason == "tool_calls" and formatted.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(forced.choices[0].message.tool_calls[0].function.arguments), schema)
        assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
        jsonschema.validate(json.loads(formatted.choices[0].message.content), schema)
        prompt = server.engine.prepare_chat(ChatRequest(messages=ASK, tools=[tool("f", schema)], template_variables={"enable_thinking": False}))
        assert prompt.grammar is not None and prompt.grammar_triggers  # the lazy check holds an auto call too


def test_auto_goes_without_the_lazy_check_when_no_grammar_can_be_built(qwen3: LiveServer) -> None:
    """A schema no value fits (or no grammar can say): forcing the call is a 400 naming ``tools``;
    with ``auto`` the model answers, its calls still parsed, but unchecked."""
    assert qwen3.engine is not None
    impossible = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"], "additionalProperties": False}
    with sdk(qwen3) as client:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[tool("f", impossible)], tool_choice="required", max_tokens=5)
        answered = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[tool("f", impossible)], max_tokens=5, extra_body=NO_THINKING)
    assert refused.value.body["param"] == "tools" and '"b" is required' in refused.value.body["message"]
    assert answered.choices[0].finish_reason in ("stop", "length")
    prompt = qwen3.engine.prepare_chat(ChatRequest(messages=ASK, tools=[tool("f", impossible)], template_variables={"enable_thinking": False}))
    assert prompt.grammar is None and prompt.grammar_triggers == ()


# ---- boolean schemas -------------------------------------------------------------------------------------


def test_boolean_schemas_are_any_value_and_no_value(checker: GrammarChecker) -> None:
    schema = {"type": "object", "properties": {"anything": True, "never": False, "list": {"type": "array", "items": True, "maxItems": 2}}, "required": ["anything"]}
    grammar = schema_grammar(schema)
    for value in (5, "s", None, {"k": [1]}, [True]):
        assert checker.accepts(grammar, json.dumps({"anything": value})), value
    assert checker.accepts(grammar, '{"anything": 1, "list": [null, {}]}')
    assert not checker.accepts(grammar, '{"anything": 1, "never": 1}')
    assert checker.accepts(schema_grammar({"anyOf": [False, {"type": "integer"}]}), "3")
    with pytest.raises(UnsatisfiableSchema, match="schema false"):
        schema_grammar({**schema, "required": ["anything", "never"]})


def test_a_required_property_that_can_never_be_present_is_a_400_over_http(qwen3: LiveServer) -> None:
    schema = {"type": "object", "properties": {"anything": True, "never": False}, "required": ["anything", "never"]}
    with sdk(qwen3) as client:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        fine = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=60, seed=1, extra_body=NO_THINKING,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {**schema, "required": ["anything"]}}},
        )  # fmt: skip
    assert refused.value.body["param"] == "response_format.json_schema.schema"
    assert "'never'" not in refused.value.body["message"] and "attribute" not in refused.value.body["message"]
    assert '"never"' in refused.value.body["message"]
    assert fine.choices[0].finish_reason in ("stop", "length")
