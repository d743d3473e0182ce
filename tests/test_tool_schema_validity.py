"""A tool's or an answer format's JSON schema that breaks JSON Schema's own rules is a 400 naming it.

OpenAI answers such a schema with a 400, "Invalid schema for function 'NAME': …", whatever
``tool_choice`` says. Here ``{"type": "strng"}`` in a property, or ``"minimum": "5"``, was
accepted with ``auto`` or ``none`` (the schema was only converted for the lazy grammar, and a
failure there was silent) and its call grammar wrote whatever the converter made of it; at the top,
or as a ``properties`` list or a ``required`` string, it was a 400 that did not say the schema
was invalid. The check is the ``jsonschema`` library's, against the draft the schema's ``$schema``
names, else Draft 2020-12 (or, failing that, Draft 7 or Draft 4, whose forms the converter reads).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import BadRequestError, OpenAI

from live_server import MODEL_ID, LiveServer, chat_server, sdk

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
# (parameters, what the message says is wrong, where: the path in the message and after the param)
INVALID = [
    ({"type": "strng"}, '"strng" is not a JSON Schema type', "type"),
    ({"type": "object", "properties": []}, "[] is not of type 'object'", "properties"),
    ({"type": "object", "properties": {"city": {"type": "string"}}, "required": "city"}, "'city' is not of type 'array'", "required"),
    ({"type": "object", "properties": {"days": {"type": "integer", "minimum": "5"}}}, "'5' is not of type 'number'", "properties.days.minimum"),
    ({"type": "object", "properties": {"city": {"type": "strng"}}}, '"strng" is not a JSON Schema type', "properties.city.type"),
    ({"type": "object", "properties": {"city": {"type": "wizard"}}}, '"wizard" is not a JSON Schema type', "properties.city.type"),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": [{"type": "string"}], "maxItems": -1}}}, "'maxItems' must be a whole number of at least 0, not -1", "properties.tags.maxItems"),
]
CHOICES = ["auto", "none", "required", {"type": "function", "function": {"name": "broken"}}]


@pytest.fixture(scope="module")
def qwen(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "qwen3")


def tools(parameters: Any) -> list[dict[str, Any]]:
    """A valid tool, then the one under test (so the 400 must name the second)."""
    return [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
        {"type": "function", "function": {"name": "broken", "description": "Under test.", "parameters": parameters}},
    ]


def refused(server: LiveServer, extra_body: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    with sdk(server) as client, pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, extra_body={**NO_THINKING, **(extra_body or {})}, **fields)
    assert info.value.status_code == 400
    return info.value.body


@pytest.mark.parametrize(
    ("parameters", "reason", "where"),
    INVALID,
    ids=["type-strng", "properties-a-list", "required-a-string", "minimum-a-string", "property-type-strng", "property-type-wizard", "maxItems-negative"],
)
def test_an_invalid_tool_schema_is_a_400_naming_the_function_whatever_tool_choice_says(qwen: LiveServer, parameters: dict, reason: str, where: str) -> None:
    for choice in CHOICES:
        body = refused(qwen, tools=tools(parameters), tool_choice=choice)
        assert body["message"].startswith(f"Invalid schema for function 'broken': {reason}"), (choice, body)
        assert body["message"].endswith(f", at {where}"), (choice, body)
        assert body["param"] == f"tools[1].function.parameters.{where}", (choice, body)
        assert (body["type"], body["code"]) == ("invalid_request_error", "invalid_function_parameters"), (choice, body)


def test_an_invalid_answer_schema_is_a_400_naming_the_format(qwen: LiveServer) -> None:
    """``response_format``'s schema (on both endpoints) and vLLM's ``guided_json`` go through the same check."""
    schema = {"type": "object", "properties": {"days": {"type": "integer", "minimum": "5"}}, "required": ["days"]}
    body = refused(qwen, response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}})
    assert body["message"] == "Invalid schema for response_format 'forecast': '5' is not of type 'number', at properties.days.minimum"
    assert body["param"] == "response_format.json_schema.schema.properties.days.minimum"
    body = refused(qwen, extra_body={"guided_json": {"type": "strng"}})
    assert body["message"].startswith("Invalid schema for 'guided_json': \"strng\" is not a JSON Schema type") and body["param"] == "guided_json.type"
    with sdk(qwen) as client, pytest.raises(BadRequestError) as text:
        client.completions.create(
            model=MODEL_ID, prompt="Once", max_tokens=5,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "required": "days"}}}},
        )  # fmt: skip
    assert text.value.body["message"] == "Invalid schema for response_format 'n': 'days' is not of type 'array', at required"


def test_the_draft_is_the_one_dollar_schema_names_and_older_forms_are_still_read(qwen: LiveServer) -> None:
    """Draft 4's boolean ``exclusiveMinimum`` and Draft 7's tuple ``items`` list are read without a
    ``$schema`` (buyers' older tools write them); a schema that names 2020-12 is held to it."""
    older = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9, "exclusiveMinimum": True}, "pair": {"type": "array", "items": [{"type": "boolean"}, {"type": "boolean"}]}},
        "required": ["n"],
        "additionalProperties": False,
    }
    with sdk(qwen) as client:
        for parameters in (older, {"$schema": "http://json-schema.org/draft-04/schema#", **older}):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=tools(parameters), tool_choice={"type": "function", "function": {"name": "broken"}},
                max_tokens=150, seed=3, extra_body=NO_THINKING,
            )  # fmt: skip
            [call] = response.choices[0].message.tool_calls
            assert response.choices[0].finish_reason == "tool_calls", response.choices[0]
            assert 1 <= json.loads(call.function.arguments)["n"] <= 9, call.function.arguments
    latest = {"$schema": "https://json-schema.org/draft/2020-12/schema", **older, "properties": {"n": older["properties"]["n"]}}
    body = refused(qwen, tools=tools(latest))
    assert body["message"] == "Invalid schema for function 'broken': True is not of type 'number', at properties.n.exclusiveMinimum"
    body = refused(qwen, tools=tools({"$schema": "http://json-schema.org/draft-07/schema#", **older, "required": "n"}))
    assert body["message"] == "Invalid schema for function 'broken': 'n' is not of type 'array', at required"


def test_a_draft_4_stamp_with_later_forms_and_null_descriptions_are_accepted(qwen: LiveServer) -> None:
    """Generators that stamp Draft 4 write an empty ``required`` (which Draft 4's meta-schema
    refused), and clients send a null ``description`` for an empty one: both were accepted before
    the meta-schema check, and are still; a property's schema that is null is still refused."""
    stamped = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object", "properties": {"city": {"type": "string"}}, "required": []}
    noted = {"type": "object", "title": None, "properties": {"city": {"type": "string", "description": None}, "description": {"type": "string"}}}
    with sdk(qwen) as client:
        for parameters in (stamped, noted):
            response = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools(parameters), tool_choice="auto", max_tokens=5, extra_body=NO_THINKING)
            assert response.choices[0].finish_reason in ("stop", "length", "tool_calls"), response.choices[0]
    body = refused(qwen, tools=tools({"type": "object", "properties": {"description": None}}))
    assert body["message"].startswith("Invalid schema for function 'broken': None is not of type"), body


def test_the_valid_schemas_agents_send_are_accepted_with_every_tool_choice(qwen: LiveServer) -> None:
    """What pydantic and MCP servers write: ``$defs`` and ``$ref``, ``anyOf`` with null, enums,
    ``additionalProperties``, titles and descriptions, a ``format``, a ``pattern``, and a
    ``$schema`` that jsonschema does not know (the schema is then read as any other)."""
    pydantic = {
        "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"], "title": "Unit", "type": "string"}},
        "properties": {
            "city": {"title": "City", "type": "string", "pattern": "^[A-Za-z -]+$", "description": "A city."},
            "unit": {"$ref": "#/$defs/Unit", "default": "celsius"},
            "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}], "default": None},
        },
        "required": ["city"],
        "title": "Forecast",
        "type": "object",
        "additionalProperties": False,
    }
    mcp = {"$schema": "http://json-schema.org/schema#", "type": "object", "properties": {}, "additionalProperties": False}
    with sdk(qwen) as client:
        for parameters in (pydantic, mcp):
            for choice in CHOICES:
                response = client.chat.completions.create(
                    model=MODEL_ID, messages=ASK, tools=tools(parameters), tool_choice=choice, max_tokens=5, extra_body=NO_THINKING
                )
                assert response.choices[0].finish_reason in ("stop", "length", "tool_calls"), (choice, response.choices[0])


def test_each_drafts_own_forms_are_accepted_and_a_refusal_gives_2020_12s_reason(qwen: LiveServer) -> None:
    """A schema is taken when Draft 2020-12, 7 or 4 takes it, whichever is asked first (the fast
    ones are): a tree of 2020-12's ``$dynamicRef`` with a ``prefixItems`` tuple, named 2020-12 (the
    only draft then asked) or not (Draft 4 refuses its ``true`` schema and its number as
    ``exclusiveMinimum``), and Draft 7's own forms (a tuple's ``items`` list, which 2020-12
    refuses, and a ``true`` schema, which Draft 4 refuses). The reason for a refusal is 2020-12's
    (Draft 4 would want a boolean)."""
    tree = {
        "$defs": {"node": {"$dynamicAnchor": "node", "type": "object", "properties": {"kids": {"type": "array", "items": {"$dynamicRef": "#node"}}}}},
        "type": "object",
        "properties": {
            "root": {"$ref": "#/$defs/node"},
            "span": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}], "items": False},
            "weight": {"type": "number", "exclusiveMinimum": 0},
            "extra": True,
        },
        "required": ["root"],
    }
    draft_7 = {"type": "object", "properties": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}, "extra": True}, "required": []}
    with sdk(qwen) as client:
        for parameters in (tree, {"$schema": "https://json-schema.org/draft/2020-12/schema", **tree}, draft_7):
            response = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools(parameters), tool_choice="auto", max_tokens=5, extra_body=NO_THINKING)
            assert response.choices[0].finish_reason in ("stop", "length", "tool_calls"), (parameters, response.choices[0])
    body = refused(qwen, tools=tools({"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": "0"}}}))
    assert body["message"] == "Invalid schema for function 'broken': '0' is not of type 'number', at properties.n.exclusiveMinimum"


def test_a_tool_schema_past_the_size_limits_is_still_held_to_json_schemas_rules(qwen: LiveServer) -> None:
    """A schema too large for a grammar (``maxItems`` past what one spells out) only loses the lazy
    grammar with ``auto``, and a forced call is a 400 for its size; but an invalid one passed
    unchecked with ``auto``, while a smaller invalid one was a 400."""
    lines = {"type": "array", "items": {"type": "string"}, "maxItems": 50000}
    valid = {"type": "object", "properties": {"lines": lines, "indent": {"type": "integer", "minimum": 0}}, "required": ["lines"]}
    invalid = {**valid, "properties": {**valid["properties"], "indent": {"type": "integer", "minimum": "0"}}}
    body = refused(qwen, tools=tools(invalid), tool_choice="auto")
    assert body["message"] == "Invalid schema for function 'broken': '0' is not of type 'number', at properties.indent.minimum", body
    assert (body["param"], body["code"]) == ("tools[1].function.parameters.properties.indent.minimum", "invalid_function_parameters")
    with sdk(qwen) as client:
        response = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools(valid), tool_choice="auto", max_tokens=5, extra_body=NO_THINKING)
    assert response.choices[0].finish_reason in ("stop", "length"), response.choices[0]
    body = refused(qwen, tools=tools(valid), tool_choice="required")
    assert body["param"] == "tools" and "'maxItems' is 50000; at most 1000 is accepted" in body["message"], body
