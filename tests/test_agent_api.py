"""What agent clients send, through the official openai SDK: tools, tool results, forced and started calls.

The servers run copies of the tiny model carrying a Qwen3- (Hermes JSON calls), a Qwen3.5- (XML
calls), a Llama-3- and a Mistral-style chat template (``chat_models.py``). The tiny model writes
nonsense, so every tool call here is a forced one (``tool_choice`` required or named): the grammar
built from the tool's schema makes even this model write a valid call, in its family's own syntax.
Reasoning and logprobs are in ``test_agent_reasoning_logprobs.py``, tool definitions refused or
accepted in ``test_agent_tool_schemas.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import AsyncOpenAI

from live_server import MODEL_ID, LiveServer, sdk
from vramsupply.engine import ChatRequest

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city.", "parameters": WEATHER_SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a timezone.",
            "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
# The tiny model gains nothing from more threads, and on a busy shared machine threads that wait
# on each other make every token many times slower.
ONE_THREAD = 1


@pytest.fixture(scope="module", params=["qwen3", "qwen35", "llama3", "mistral"])
def server(request: pytest.FixtureRequest, chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(model_path=chat_models[request.param], n_ctx=2048, threads=ONE_THREAD) as live:
        yield live


@pytest.fixture(scope="module")
def qwen(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(model_path=chat_models["qwen3"], n_ctx=2048, threads=ONE_THREAD) as live:
        yield live


def check_weather_call(call: object) -> dict:
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_SCHEMA)
    return arguments


@pytest.mark.slow
async def test_forced_named_call_matches_the_schema_for_50_seeds(qwen: LiveServer) -> None:
    async with AsyncOpenAI(base_url=qwen.base_url, api_key="unused", max_retries=0) as client:

        async def call(seed: int) -> object:
            return await client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS[:1], tool_choice=WEATHER, seed=seed, max_tokens=200, extra_body=NO_THINKING
            )

        responses = await asyncio.gather(*(call(seed) for seed in range(50)))
    arguments = []
    for response in responses:
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        arguments.append(check_weather_call(call))
    assert len({json.dumps(a) for a in arguments}) > 10  # 50 seeds, really different calls


def test_forced_named_call_in_each_familys_syntax(server: LiveServer) -> None:
    with sdk(server) as client:
        for seed in range(4):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=WEATHER, seed=seed, max_tokens=200, extra_body=NO_THINKING
            )
            choice = response.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            [call] = choice.message.tool_calls
            check_weather_call(call)


def test_a_stop_string_never_cuts_a_forced_call(server: LiveServer) -> None:
    """Agent frameworks send stop strings for their own reasons (a ReAct "Observation:"): inside a
    call the grammar holds, one cut the JSON while finish_reason still said tool_calls."""
    with sdk(server) as client:
        for stop in (['"'], [":"], ["city"]):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=WEATHER, stop=stop, seed=2, max_tokens=200, extra_body=NO_THINKING
            )
            choice = response.choices[0]
            assert choice.finish_reason == "tool_calls", (stop, choice)
            [call] = choice.message.tool_calls
            check_weather_call(call)


def test_a_stop_string_never_cuts_a_json_response_format(qwen: LiveServer) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    with sdk(qwen) as client:
        response = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, response_format=response_format, stop=['"'], seed=3, max_tokens=60, extra_body=NO_THINKING
        )
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_required_tool_choice_calls_one_of_the_tools(server: LiveServer) -> None:
    with sdk(server) as client:
        names = set()
        for seed in range(3):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed, max_tokens=200, extra_body=NO_THINKING
            )
            [call] = response.choices[0].message.tool_calls
            names.add(call.function.name)
            assert call.function.name in ("get_weather", "get_time")
            json.loads(call.function.arguments)
        assert names <= {"get_weather", "get_time"}


def test_streamed_tool_call_arguments_arrive_in_fragments_that_add_up_to_the_whole_answer(server: LiveServer) -> None:
    """OpenAI's delta shape: ``index``, ``id``, ``type`` and the name first, then the arguments in
    fragments as they are generated; joined, exactly the unstreamed answer's arguments."""
    request = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "tool_choice": WEATHER, "max_tokens": 200, "extra_body": NO_THINKING}
    with sdk(server) as client:
        for seed in range(4):
            stream = client.chat.completions.create(seed=seed, stream=True, **request)
            fragments = [d for chunk in stream for choice in chunk.choices for d in (choice.delta.tool_calls or [])]
            whole = client.chat.completions.create(seed=seed, **request)
            first, *rest = fragments
            assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
            assert first.function.arguments == ""
            assert len(rest) > 1 and all(f.index == 0 and f.id is None and f.function.name is None for f in rest)
            [call] = whole.choices[0].message.tool_calls
            assert "".join(f.function.arguments for f in rest) == call.function.arguments
            check_weather_call(call)


def test_stream_ends_with_finish_reason_tool_calls(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=WEATHER, max_tokens=200, stream=True, extra_body=NO_THINKING
        )
        reasons = [choice.finish_reason for chunk in stream for choice in chunk.choices if choice.finish_reason]
    assert reasons == ["tool_calls"]


@pytest.mark.parametrize("choice", ["required", WEATHER])
def test_a_forced_call_streamed_through_the_sdks_helper_has_null_content_as_unstreamed(qwen: LiveServer, choice: object) -> None:
    """An agent's stream handler that opens a text item for any ``content`` not null must see none
    where the answer can only be a call: the opening delta carries the role, no empty text."""
    request = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False, "max_tokens": 200}
    with sdk(qwen) as client:
        with client.chat.completions.stream(seed=1, extra_body=NO_THINKING, **request) as stream:
            opened = [event for event in stream if event.type == "content.delta"]
            streamed = stream.get_final_completion().choices[0].message
        whole = client.chat.completions.create(seed=1, extra_body=NO_THINKING, **request).choices[0].message
    assert opened == [] and streamed.content is None and whole.content is None
    assert len(whole.tool_calls) == 1 and [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]


def test_agent_loop_tools_then_result_then_answer(server: LiveServer) -> None:
    """The loop every agent framework runs: the model calls a tool, the client runs it and sends the
    result back in a ``tool`` message, and the model answers."""
    assert server.engine is not None
    with sdk(server) as client:
        messages: list[dict] = list(ASK)
        first = client.chat.completions.create(
            model=MODEL_ID, messages=messages, tools=TOOLS, tool_choice=WEATHER, max_tokens=200, extra_body=NO_THINKING
        )
        [call] = first.choices[0].message.tool_calls
        arguments = check_weather_call(call)
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": f"Sunny, 22 degrees {arguments['unit']}"})

        final = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=20, extra_body=NO_THINKING)

    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    # The template was given the call and its result, in its own syntax.
    prompt = server.engine.detokenize(server.engine.prepare_chat(ChatRequest(messages, tools=TOOLS)).tokens)
    assert "Sunny, 22 degrees" in prompt
    assert "get_weather" in prompt.split("What is the weather in Paris?")[-1]


def test_tool_choice_none_answers_in_text(server: LiveServer) -> None:
    with sdk(server) as client:
        response = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=10, extra_body=NO_THINKING)
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in ("stop", "length")


# ---- special marker tokens ------------------------------------------------------------------------


def test_control_token_markers_are_rendered_only_where_a_call_is_parsed(chat_models: dict[str, Path]) -> None:
    """``<|python_tag|>`` is a control token in Llama 3's vocabulary: normally it renders as nothing,
    which would hide a call from the parser. With tools, the engine renders it as text."""
    with LiveServer(model_path=chat_models["llama3"], n_ctx=2048, threads=ONE_THREAD) as live, sdk(live) as client:
        assert live.engine is not None
        [tag] = live.engine.tokenize("<|python_tag|>", add_special=False)
        force_tag = {"logit_bias": {str(tag): 100}, "max_tokens": 1, "temperature": 0}
        with_tools = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, **force_tag)
        without = client.chat.completions.create(model=MODEL_ID, messages=ASK, **force_tag)
        logprobs = client.chat.completions.create(model=MODEL_ID, messages=ASK, logprobs=True, **force_tag)
    # Cut by max_tokens right after it, the tag can only be the start of a call: template markup
    # never reaches content (a tag the model ends its answer with stays content: test_agent_call_cut_off).
    assert with_tools.choices[0].message.content == ""
    assert with_tools.choices[0].finish_reason == "length"
    assert with_tools.choices[0].message.tool_calls is None
    assert without.choices[0].message.content == ""
    assert logprobs.choices[0].logprobs.content[0].token == "<|python_tag|>"


def test_auto_call_the_model_starts_is_held_to_the_schema(chat_models: dict[str, Path]) -> None:
    """With ``tool_choice`` auto the model may answer in text, but once it writes its family's call
    marker a lazy grammar takes over, so the call it started is valid. Here a logit bias makes
    the tiny model start with Mistral's ``[TOOL_CALLS]`` control token."""
    with LiveServer(model_path=chat_models["mistral"], n_ctx=2048, threads=ONE_THREAD) as live, sdk(live) as client:
        assert live.engine is not None
        [marker] = live.engine.tokenize("[TOOL_CALLS]", add_special=False)
        for seed in range(5):
            response = client.chat.completions.create(
                model=MODEL_ID,
                messages=ASK,
                tools=TOOLS,
                parallel_tool_calls=False,  # else the tiny model goes on writing calls until max_tokens
                seed=seed,
                max_tokens=120,
                logit_bias={str(marker): 100},
            )
            choice = response.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            [call] = choice.message.tool_calls
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                jsonschema.validate(arguments, WEATHER_SCHEMA)
            else:
                assert call.function.name == "get_time" and arguments["tz"] in ("UTC", "CET")
        text = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, seed=1, max_tokens=12)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content


def test_a_stop_string_never_cuts_an_auto_call_once_started_but_stops_text_before_it(chat_models: dict[str, Path]) -> None:
    with LiveServer(model_path=chat_models["mistral"], n_ctx=2048, threads=ONE_THREAD) as live, sdk(live) as client:
        assert live.engine is not None
        [marker] = live.engine.tokenize("[TOOL_CALLS]", add_special=False)
        options = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "parallel_tool_calls": False, "seed": 1, "max_tokens": 120}
        called = client.chat.completions.create(**options, stop=['"', ":"], logit_bias={str(marker): 100})
        plain = client.chat.completions.create(**options, stop=[" "])
    assert called.choices[0].finish_reason == "tool_calls", called.choices[0]
    [call] = called.choices[0].message.tool_calls
    json.loads(call.function.arguments)
    assert plain.choices[0].finish_reason == "stop" and " " not in (plain.choices[0].message.content or "")
