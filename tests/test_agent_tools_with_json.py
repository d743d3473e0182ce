"""An agent that offers tools and asks for a JSON final answer: OpenAI takes both, and so do we.

Agent frameworks send ``tools`` and ``response_format`` together on every turn: the tools to use,
and the shape of the final answer. ``response_format`` shapes the answers given in text, and a
call is not one. Before, the JSON grammar held the whole answer, so a model that started a call
wrote its marker into a JSON string instead (an agent on this server could never call a tool), and
a forced call beside a JSON format was a 400 (``server/grammar.py``).

The tiny model writes nonsense, so a logit bias on the family's call marker decides whether it
calls; the grammar decides what it may write.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from gbnf_check import GrammarChecker
from live_server import MODEL_ID, LiveServer, chat_server, sdk
from vramsupply.chat import SYNTAXES
from vramsupply.chat.forced import either, forced_call_grammar
from vramsupply.chat.schema import schema_to_gbnf

HERMES = next(s for s in SYNTAXES if s.name == "hermes")
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast.", "parameters": WEATHER_SCHEMA}}]
ANSWER_SCHEMA = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["days"]}
ANSWER = {"type": "json_schema", "json_schema": {"name": "forecast", "strict": True, "schema": ANSWER_SCHEMA}}


@pytest.fixture(scope="module")
def mistral(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "mistral")


@pytest.fixture(scope="module")
def qwen(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    """Qwen3's template opens a thought in the generation prompt."""
    yield from chat_server(chat_models, "qwen3")


def token(server: LiveServer, text: str) -> str:
    """The token of a control marker, or of one character (after the vocabulary's word-start token)."""
    assert server.engine is not None
    return str(server.engine.tokenize(text, add_special=False)[-1])


def the_weather_call(choice: object) -> dict:
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_SCHEMA)
    return arguments


def test_a_model_that_starts_a_call_calls_the_tool_though_the_answer_format_is_json(mistral: LiveServer) -> None:
    calling = {str(token(mistral, "[TOOL_CALLS]")): 100}
    with sdk(mistral) as client:
        for seed in range(3):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS, response_format=ANSWER, parallel_tool_calls=False,
                seed=seed, max_tokens=120, logit_bias=calling,
            )
            the_weather_call(response.choices[0])


def test_streamed_the_call_arrives_in_fragments_that_add_up(mistral: LiveServer) -> None:
    calling = {str(token(mistral, "[TOOL_CALLS]")): 100}
    with sdk(mistral) as client:
        whole = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, response_format=ANSWER, parallel_tool_calls=False, seed=1, max_tokens=120, logit_bias=calling,
        )
        chunks = list(client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, response_format=ANSWER, parallel_tool_calls=False, seed=1, max_tokens=120, logit_bias=calling,
            stream=True,
        ))
    fragments = [call.function.arguments or "" for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert "".join(fragments) == whole.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_model_that_answers_answers_in_the_json_format(mistral: LiveServer) -> None:
    never_calling = {token(mistral, "[TOOL_CALLS]"): -100, token(mistral, "["): -100}
    with sdk(mistral) as client:
        response = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, response_format=ANSWER, temperature=0, max_tokens=40, logit_bias=never_calling,
        )
    message = response.choices[0].message
    assert message.tool_calls is None and response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(message.content), ANSWER_SCHEMA)


def test_a_forced_call_beside_a_json_format_is_this_turn_s_answer(mistral: LiveServer) -> None:
    """OpenAI accepts ``tool_choice`` required with a ``response_format``; this server said 400."""
    with sdk(mistral) as client:
        for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=tool_choice, response_format=ANSWER,
                parallel_tool_calls=False, seed=2, max_tokens=120,
            )
            the_weather_call(response.choices[0])


def test_a_thinking_model_ends_its_thought_then_calls_or_answers_in_json(qwen: LiveServer) -> None:
    """The thought the prompt left open comes first, free; then the call or the JSON."""
    end, call = token(qwen, "</think>"), token(qwen, "<")  # the tiny model spells <tool_call> out
    with sdk(qwen) as client:
        calls = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, response_format=ANSWER, parallel_tool_calls=False, seed=3, max_tokens=120,
            logit_bias={end: 100, call: 50},  # the thought ends at once, then a call's first character is likeliest
        )
        answers = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, response_format=ANSWER, seed=3, max_tokens=60, logit_bias={end: 100, call: -100},
        )
    the_weather_call(calls.choices[0])
    assert not getattr(calls.choices[0].message, "reasoning_content", None)
    assert answers.choices[0].message.tool_calls is None
    jsonschema.validate(json.loads(answers.choices[0].message.content), ANSWER_SCHEMA)


def test_either_grammar_takes_each_of_its_two_languages_whole_and_nothing_else(checker: GrammarChecker) -> None:
    """Rules of one name in both (``space``, a schema's ``root``) are kept apart, references and a
    recursive schema's rules included."""
    linked = {"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["next"]}}, "$ref": "#/$defs/node"}
    grammar = either(schema_to_gbnf(linked), forced_call_grammar(HERMES, [TOOLS[0]["function"]], parallel=True))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'

    assert checker.accepts(grammar, '{"next": {"next": null}}')
    assert checker.accepts(grammar, call) and checker.accepts(grammar, f"{call}\n{call}")
    assert not checker.accepts(grammar, '{"next": 1}')
    assert not checker.accepts(grammar, call.replace("celsius", "kelvin"))
    assert not checker.accepts(grammar, '{"next": null}' + call)


def test_tools_and_a_json_format_too_large_together_are_a_400_naming_tools(mistral: LiveServer) -> None:
    """Each grammar alone is within the limit (32 KiB); the one holding both is not."""
    words = {"type": "array", "items": {"type": "integer"}, "maxItems": 1000}  # about 21 KB: each count spelled out
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {"w": words}, "required": ["w"]}}}]
    answer = {"type": "json_schema", "json_schema": {"name": "pick", "schema": {"type": "object", "properties": {"w": words}, "required": ["w"]}}}
    with sdk(mistral) as client:
        alone = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, tool_choice="required", max_tokens=8)
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=tools, response_format=answer, max_tokens=8)
    assert alone.choices[0].finish_reason == "length"
    assert refused.value.body["param"] == "tools" and "too complex" in refused.value.body["message"]


def test_a_forced_call_cut_while_thinking_has_null_content_whole_and_streamed(qwen: LiveServer) -> None:
    """``tool_choice`` required, cut by ``max_tokens`` before the thought ends: no call, no text.
    The stream's first chunk says ``content: null`` (the answer must be a call); the whole answer
    had said ``""``."""
    end = token(qwen, "</think>")
    ask = dict(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required", seed=3, max_tokens=4, logit_bias={end: -100})
    with sdk(qwen) as client:
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True))
    [choice] = whole.choices
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == ("length", None, None)
    assert choice.message.reasoning_content
    assert chunks[0].choices[0].delta.content is None
    assert all(c.delta.content is None for chunk in chunks for c in chunk.choices)
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["length"]


@pytest.fixture(scope="module")
def llama3(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    """Llama 3's calls may open the answer as bare JSON, as a JSON answer does."""
    yield from chat_server(chat_models, "llama3")


def test_a_json_answer_opening_with_a_name_is_the_answer_not_a_call_of_that_name(llama3: LiveServer) -> None:
    """An agent asking for ``{"name", "age"}`` beside its tools got a call to a tool named after the
    person (openai-agents: "Tool ... not found"), and the age was lost."""
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": person}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    request = {"model": MODEL_ID, "messages": [{"role": "user", "content": "A person"}], "tools": tools, "response_format": response_format, "max_tokens": 60}
    with sdk(llama3) as client:
        for seed in range(3):
            whole = client.chat.completions.create(seed=seed, **request)
            streamed = list(client.chat.completions.create(seed=seed, stream=True, **request))
            choice = whole.choices[0]
            assert (choice.finish_reason, choice.message.tool_calls) == ("stop", None), choice
            jsonschema.validate(json.loads(choice.message.content), person)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content
