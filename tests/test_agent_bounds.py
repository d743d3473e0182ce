"""A buyer's schema holds, numbers and strings included, for forced tool calls and ``response_format``.

Through the official openai SDK against the Qwen-style test model (and the Llama 3 and Mistral ones
for forced calls in their syntax), over many seeds: the tiny model writes nonsense, so whatever
the grammar allows it eventually writes. Every number must respect its ``minimum``/``maximum``
(wide, negative, exclusive and fractional bounds), and every JSON answer must parse strictly (no
raw control characters inside strings).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

from live_server import MODEL_ID, LiveServer, chat_server

BOUNDED = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": -40, "maximum": 2500},
        "offset": {"type": "integer", "exclusiveMinimum": -1000000, "maximum": -3},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "score": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 7.25},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["count", "offset", "ratio", "score", "note"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {"name": "adjust", "description": "Adjust a setting.", "parameters": BOUNDED}}
NAMED = {"type": "function", "function": {"name": "adjust"}}
ASK = [{"role": "user", "content": "Adjust the thermostat."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
SEEDS = range(40)


@pytest.fixture(scope="module")
def qwen(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "qwen3")


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def other_family(request: pytest.FixtureRequest, chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, request.param)


async def ask_each_seed(server: LiveServer, seeds: range = SEEDS, **request: object) -> list:
    async with AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        return await asyncio.gather(
            *(client.chat.completions.create(model=MODEL_ID, messages=ASK, seed=s, extra_body=NO_THINKING, **request) for s in seeds)
        )


def forced_arguments(responses: list) -> list[dict]:
    """Each response's one call, its arguments checked against the schema."""
    seen = []
    for response in responses:
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        arguments = json.loads(call.function.arguments, strict=True)
        jsonschema.validate(arguments, BOUNDED)
        seen.append(arguments)
    return seen


@pytest.mark.slow
async def test_forced_call_arguments_respect_numeric_bounds(qwen: LiveServer) -> None:
    seen = forced_arguments(await ask_each_seed(qwen, tools=[TOOL], tool_choice=NAMED, max_tokens=150))
    assert len({a["count"] for a in seen}) > 5 and len({a["score"] for a in seen}) > 5, seen  # really different numbers


async def test_forced_call_bounds_hold_in_llama3_and_mistral_syntax(other_family: LiveServer) -> None:
    forced_arguments(await ask_each_seed(other_family, seeds=range(12), tools=[TOOL], tool_choice=NAMED, max_tokens=150))


@pytest.mark.slow
async def test_json_schema_answers_always_parse_and_validate(qwen: LiveServer) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "adjust", "schema": BOUNDED}}
    responses = await ask_each_seed(qwen, response_format=response_format, max_tokens=150)
    for response in responses:
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content, strict=True), BOUNDED)


async def test_json_object_answers_hold_no_raw_control_characters(qwen: LiveServer) -> None:
    """The tiny model never closes a free-form object within the budget, so the answers are cut
    off; what they hold is still JSON text: no raw control character, in strings or between values."""
    responses = await ask_each_seed(qwen, response_format={"type": "json_object"}, max_tokens=60)
    for response in responses:
        content = response.choices[0].message.content
        assert content.startswith("{") and not any(ord(c) < 0x20 for c in content), content


def test_a_range_no_number_fits_is_a_400(qwen: LiveServer) -> None:
    impossible = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 4}}, "required": ["n"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": impossible}}
    with OpenAI(base_url=qwen.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(BadRequestError) as forced:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[tool], tool_choice="required", max_tokens=5)
        with pytest.raises(BadRequestError) as formatted:
            client.chat.completions.create(
                model=MODEL_ID, messages=ASK, max_tokens=5, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": impossible}}
            )
    assert forced.value.body["param"] == "tools" and "no integer satisfies" in forced.value.body["message"]
    assert formatted.value.body["param"].startswith("response_format") and "no integer satisfies" in formatted.value.body["message"]
