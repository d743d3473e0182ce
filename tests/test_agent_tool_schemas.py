"""Tool definitions agent clients send, through the official openai SDK: what is refused with a 400
naming the field, and what is accepted though a grammar cannot hold all of it.

A tool schema becomes a grammar when a call is forced, so it is held to the same limits as a
``response_format`` schema; a name or a parameter list that some family's call syntax cannot write
is refused whatever ``tool_choice`` says. Split from ``test_agent_api.py``, whose ``qwen`` server (the
tiny model with a Qwen3-style template) these tests share.
"""

from __future__ import annotations

import json

import pytest
from openai import BadRequestError

from live_server import MODEL_ID, LiveServer, sdk
from test_agent_api import ASK, NO_THINKING, qwen  # noqa: F401  (qwen: the fixture)


def test_a_schema_that_cannot_force_a_call_is_a_400_and_auto_still_answers(qwen: LiveServer) -> None:
    """A valid schema the grammar cannot be built from (a ``$ref`` to another document); one that
    breaks JSON Schema's rules is a 400 whatever tool_choice says (``test_tool_schema_validity.py``)."""
    elsewhere = {"type": "object", "properties": {"x": {"$ref": "https://example.com/schemas/x.json"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": elsewhere}}]
    with sdk(qwen) as client:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, tool_choice="required", max_tokens=5)
        answered = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, max_tokens=5, extra_body=NO_THINKING)
    assert refused.value.body["param"] == "tools"
    assert answered.choices[0].finish_reason in ("stop", "length")


def test_tools_are_held_to_the_same_schema_limits_as_response_format(qwen: LiveServer) -> None:
    """A tool schema too complex to force cheaply: a 400 naming tools, as response_format gets one."""
    huge = {"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "string"}, "maxItems": 50000}}, "required": ["lines"]}
    tools = [{"type": "function", "function": {"name": "write", "parameters": huge}}]
    with sdk(qwen) as client:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, tool_choice="required", max_tokens=5)
        answered = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, max_tokens=5, extra_body=NO_THINKING)
    assert refused.value.body["param"] == "tools"
    assert "'maxItems' is 50000; at most 1000 is accepted" in refused.value.body["message"]
    assert answered.choices[0].finish_reason in ("stop", "length")


def test_a_string_longer_than_a_grammar_spells_out_is_not_bounded_but_accepted(qwen: LiveServer) -> None:
    """pydantic writes ``HttpUrl`` as a string of at most 2083 characters: every structured output
    with a URL in it was a 400 (langchain, pydantic-ai, instructor), though OpenAI takes it. Not
    strict, the bound is left unenforced; strict, it is refused as any keyword not held."""
    url = {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}
    link = {"type": "object", "properties": {"href": url}, "required": ["href"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "save", "parameters": link}}]
    with sdk(qwen) as client:
        saved = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, tool_choice="required", max_tokens=60, extra_body=NO_THINKING)
        answer = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=60, extra_body=NO_THINKING,
            response_format={"type": "json_schema", "json_schema": {"name": "link", "schema": link}},
        )  # fmt: skip
        long_text = {**link, "properties": {"href": {"type": "string", "maxLength": 2083}}}
        with pytest.raises(BadRequestError) as strict:
            client.chat.completions.create(
                model=MODEL_ID, messages=ASK, max_tokens=5, response_format={"type": "json_schema", "json_schema": {"name": "link", "strict": True, "schema": long_text}}
            )
    assert saved.choices[0].message.tool_calls, saved.choices[0]
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert "'maxLength' at response_format.json_schema.schema.properties.href cannot be enforced" in strict.value.body["message"]


def test_tool_names_and_parameters_are_held_to_what_every_call_syntax_can_write(qwen: LiveServer) -> None:
    def tool(name: str, parameters: object) -> list[dict]:
        return [{"type": "function", "function": {"name": name, "parameters": parameters}}]

    with sdk(qwen) as client:
        with pytest.raises(BadRequestError) as unicode_name:  # OpenAI allows ASCII names only; Mistral's syntax can write no other
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tool("wetter_für", {"type": "object"}), max_tokens=5)
        with pytest.raises(BadRequestError) as listed:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tool("f", {"type": "object", "properties": []}), max_tokens=5)
        # Some clients send null for a function without parameters: taken as none, and the call is forced.
        forced = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=tool("f", {"type": "object", "properties": None}), tool_choice="required", max_tokens=40, extra_body=NO_THINKING
        )
    assert unicode_name.value.body["param"] == "tools[0].function.name"
    assert listed.value.body["param"] == "tools[0].function.parameters.properties"
    assert [c.function.name for c in forced.choices[0].message.tool_calls] == ["f"]


def test_tool_fields_of_the_wrong_type_and_a_schema_no_value_fits_are_said_clearly(qwen: LiveServer) -> None:
    """A string ``strict`` was read as not strict, a numeric description failed inside some
    templates (blamed on ``messages``), ``tool_choice: 5`` named the param ``tool_choice.str``,
    and ``anyOf: []`` failed even an ``auto`` request with "it needs a 'root' rule" (now it breaks
    JSON Schema's rules, a 400 as at OpenAI; a ``false`` property is what fits no value)."""
    def refused(**fields: object) -> dict:
        with sdk(qwen) as client, pytest.raises(BadRequestError) as info:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=5, **fields)
        return info.value.body

    def tool(**function: object) -> list[dict]:
        return [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, **function}}]

    assert refused(tools=tool(strict="yes"))["param"] == "tools[0].function.strict"
    assert refused(tools=tool(description=5))["message"] == "tools[0].function.description must be a string"
    for choice in (5, ["auto"]):
        body = refused(tools=tool(), tool_choice=choice)
        assert (body["param"], body["message"]) == ("tool_choice", "tool_choice must be one of none, auto, required or a named function")
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}}
    body = refused(tools=tool(), tool_choice=allowed)  # it read as a malformed named choice
    assert body["message"] == "tool_choice of type 'allowed_tools' is not supported by this server: send auto, none, required or a named function"
    assert refused(tools=tool(parameters={"type": "object", "properties": {"a": {"anyOf": []}}}))["message"] == (
        "Invalid schema for function 'f': [] should be non-empty, at properties.a.anyOf"
    )
    empty = {"type": "object", "properties": {"a": False, "b": {"type": "integer"}}}
    with sdk(qwen) as client:
        answered = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tool(parameters=empty), max_tokens=5, extra_body=NO_THINKING)
        forced = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=tool(parameters=empty), tool_choice="required", parallel_tool_calls=False, max_tokens=150, seed=1, extra_body=NO_THINKING
        )
    assert answered.choices[0].finish_reason in ("stop", "length")
    arguments = forced.choices[0].message.tool_calls[0].function.arguments
    assert forced.choices[0].finish_reason == "tool_calls", (forced.choices[0].finish_reason, arguments)
    assert set(json.loads(arguments)) <= {"b"}
    required = {**empty, "required": ["a"]}
    body = refused(tools=tool(parameters=required), tool_choice="required")
    assert body["param"] == "tools" and 'the required property "a" at the top has the schema false' in body["message"]
