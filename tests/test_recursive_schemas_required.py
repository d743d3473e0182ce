"""A schema whose recursion is required all the way round has no finite value: it is a 400.

``{"properties": {"child": {"$ref": "#"}}, "required": ["child"]}`` built a grammar llama.cpp took
(it is no left recursion), and every answer held to it ran to the token limit, never valid JSON:
each value must hold another. Such a schema, in ``response_format``, ``guided_json`` or a tool's
parameters (forced calls, JSON or XML), is now refused before any generation, naming the schema and
the ``$ref`` that never ends. Recursion with a way out (an optional child, an ``anyOf`` branch
without it, ``minItems: 0``, a child that may be null, pydantic's recursive models) is served as
before, and answered with JSON that validates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel

from live_server import MODEL_ID, LiveServer


class Tree(BaseModel):
    value: int
    children: list["Tree"] = []


class Chain(BaseModel):
    name: str
    next: Optional["Chain"] = None


def _nodes(min_items: int) -> dict[str, Any]:
    node = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/N"}, "minItems": min_items}}}
    return {"$ref": "#/$defs/N", "$defs": {"N": {**node, "required": ["v", "kids"]}}}


ENDLESS = {
    "a required child of the schema itself": ({"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}, "'#'"),
    "$defs that must refer to each other": (
        {
            "$ref": "#/$defs/A",
            "$defs": {
                "A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}}, "required": ["b"]},
                "B": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]},
            },
        },
        "'#/$defs/A'",
    ),
    "an array of itself with minItems 1": (_nodes(1), "'#/$defs/N'"),
    "an anyOf whose every branch recurses": (
        {
            "type": "object",
            "properties": {"t": {"$ref": "#/$defs/T"}},
            "$defs": {"T": {"anyOf": [{"type": "object", "properties": {"l": {"$ref": "#/$defs/T"}}, "required": ["l"]}, {"type": "array", "items": {"$ref": "#/$defs/T"}, "minItems": 2}]}},
        },
        "'#/$defs/T'",
    ),
}
OPTIONAL_CHILD = {"type": "object", "properties": {"v": {"type": "integer"}, "child": {"$ref": "#"}}, "required": ["v"]}
FINITE = {
    "an array of itself with minItems 0": _nodes(0),
    "an anyOf with a leaf": {"$ref": "#/$defs/T", "$defs": {"T": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/T"}, "minItems": 1, "maxItems": 2}]}}},
    "a required child that may be null": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["next"]},
    "pydantic's recursive tree": Tree.model_json_schema(),
    "pydantic's optional chain": Chain.model_json_schema(),
}
ASK = [{"role": "user", "content": "Answer"}]


@pytest.fixture(scope="module")
def client() -> Iterator[OpenAI]:
    with LiveServer() as live, OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as openai:
        yield openai


def refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(BadRequestError) as caught:
        call()
    return caught.value.body  # type: ignore[return-value]


def as_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize("shape", list(ENDLESS))
def test_a_schema_with_no_finite_value_is_refused_naming_it(client: OpenAI, shape: str) -> None:
    schema, ref = ENDLESS[shape]
    as_response_format = refusal(lambda: client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=50, response_format=as_format(schema)))
    as_guided_json = refusal(lambda: client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=50, extra_body={"guided_json": schema}))

    assert as_response_format["param"] == "response_format.json_schema.schema", as_response_format
    assert as_guided_json["param"] == "guided_json", as_guided_json
    for body in (as_response_format, as_guided_json):
        assert "no finite value" in body["message"] and ref in body["message"], body["message"]


@pytest.mark.parametrize("shape", list(FINITE))
def test_a_recursive_schema_with_a_way_out_is_answered_with_json_that_validates(client: OpenAI, shape: str) -> None:
    schema = FINITE[shape]
    answers = [
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=300, temperature=1.0, seed=seed, response_format=as_format(schema)).choices[0]
        for seed in (1, 2, 3)
    ] + [client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=300, temperature=0, extra_body={"guided_json": schema}).choices[0]]
    for choice in answers:
        text = choice.message.content if hasattr(choice, "message") else choice.text
        assert choice.finish_reason == "stop", (shape, text)
        jsonschema.validate(json.loads(text), schema)


def test_an_optional_child_is_served_not_refused(client: OpenAI) -> None:
    """The tiny model always takes the child it is offered, so its answer runs to max_tokens:
    the schema is served all the same (a model that stops would end it), never refused."""
    answer = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=40, temperature=0, response_format=as_format(OPTIONAL_CHILD))
    text = answer.choices[0].message.content or ""
    assert answer.choices[0].finish_reason == "length" and text.startswith('{ "v"') and '"child"' in text


@pytest.fixture(scope="module", params=["qwen3", "qwen35"])
def agent(request: pytest.FixtureRequest, chat_models: dict[str, Path]) -> Iterator[OpenAI]:
    """Qwen3 writes JSON calls, Qwen3.5 XML ones: both force a call's arguments by the schema."""
    with LiveServer(model_path=chat_models[request.param], n_ctx=2048, threads=1) as live:
        with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as openai:
            yield openai


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def test_a_forced_call_whose_parameters_have_no_finite_value_is_refused(agent: OpenAI) -> None:
    endless = {"type": "object", "properties": {"tree": {"$ref": "#/$defs/N"}}, "required": ["tree"], "$defs": _nodes(1)["$defs"]}
    tools = [tool("fine", {"type": "object", "properties": {"x": {"type": "integer"}}}), tool("grow", endless)]
    for choice in ("required", {"type": "function", "function": {"name": "grow"}}):
        body = refusal(lambda: agent.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=50, tools=tools, tool_choice=choice))
        assert body["param"] == "tools" and "tool 'grow'" in body["message"] and "no finite value" in body["message"], body


def test_a_forced_call_with_recursive_parameters_with_a_way_out_is_served(agent: OpenAI) -> None:
    """Served, not refused: a call of the tool comes back, and arguments that are whole validate
    (the tiny model may run to max_tokens inside them: then they are cut short, as written)."""
    parameters = {"type": "object", "properties": {"tree": {"$ref": "#/$defs/N"}}, "required": ["tree"], "$defs": _nodes(0)["$defs"]}
    answer = agent.chat.completions.create(
        model=MODEL_ID, messages=ASK, max_tokens=200, temperature=0, tools=[tool("grow", parameters)], tool_choice="required", parallel_tool_calls=False,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    ).choices[0]
    [call] = answer.message.tool_calls or []
    assert call.function.name == "grow"
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        assert answer.finish_reason == "length", answer
    else:
        jsonschema.validate(arguments, parameters)
