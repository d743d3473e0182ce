"""What agent clients send, through the official openai SDK: tools, tool results, reasoning, logprobs.

The servers run copies of the tiny model carrying a Qwen3- (Hermes JSON calls), a Qwen3.5- (XML
calls), a Llama-3- and a Mistral-style chat template (``chat_models.py``). The tiny model writes
nonsense, so every tool call here is a forced one (``tool_choice`` required or named): the grammar
built from the tool's schema makes even this model write a valid call, in its family's own syntax.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

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


# ---- reasoning ------------------------------------------------------------------------------------


def test_reasoning_content_when_the_template_opens_a_think_block(qwen: LiveServer) -> None:
    """The Qwen-style template ends its generation prompt with ``<think>``: what the model writes
    first is its thought, and must never leak into ``content``."""
    with sdk(qwen) as client:
        whole = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=30, seed=7)
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=30, seed=7, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    message = whole.choices[0].message
    assert message.reasoning_content  # an extra field: the SDK keeps it
    assert message.content == ""
    streamed = "".join(getattr(c.delta, "reasoning_content", None) or "" for chunk in chunks for c in chunk.choices)
    assert streamed == message.reasoning_content
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == ""
    for usage in (whole.usage, chunks[-1].usage):  # the thought never ended: every token is reasoning
        assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens == 30


def test_reasoning_tokens_are_the_generated_tokens_of_the_thought(qwen: LiveServer) -> None:
    """Counted from the engine's own tokens: every token up to the one that closes the thought.

    The test model's ``</think>`` is a control token; a logit bias makes the tiny model close its
    thought now and then. The expected count comes from the logprobs' token list."""
    assert qwen.engine is not None
    [end] = qwen.engine.tokenize("</think>", add_special=False)
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 30, "logit_bias": {str(end): 19}, "logprobs": True}
    ended = 0
    with sdk(qwen) as client:
        for seed in range(12):
            whole = client.chat.completions.create(seed=seed, **request)
            stream = list(client.chat.completions.create(seed=seed, stream=True, stream_options={"include_usage": True}, **request))
            tokens = [entry.token for entry in whole.choices[0].logprobs.content]
            # The template opened the thought, so it starts at the first token.
            thought = tokens.index("</think>") + 1 if "</think>" in tokens else len(tokens)
            ended += thought < len(tokens) and bool(whole.choices[0].message.content)
            assert whole.usage.completion_tokens_details.reasoning_tokens == thought
            assert stream[-1].usage.completion_tokens_details.reasoning_tokens == thought
    assert ended >= 2


def test_a_continued_message_that_opened_a_thought_goes_on_thinking(qwen: LiveServer) -> None:
    """A prefilled "<think>\nLet me think", continued: the model's words are the rest of that
    thought. They went to ``content``, with the raw ``</think>`` that closed it."""
    assert qwen.engine is not None
    [end] = qwen.engine.tokenize("</think>", add_special=False)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nLet me think"}]
    request = {"model": MODEL_ID, "messages": messages, "max_tokens": 30, "temperature": 1, "logit_bias": {str(end): 20}}
    closed = 0
    with sdk(qwen) as client:
        for seed in range(6):
            message = client.chat.completions.create(seed=seed, extra_body={"continue_final_message": True, "add_generation_prompt": False}, **request).choices[0].message
            assert "</think>" not in (message.content or "") and message.reasoning_content, (seed, message)
            closed += bool(message.content)
    assert closed >= 1, "the thought closed, and the answer after it is content"


def test_a_json_answer_follows_the_thought_the_template_opened(qwen: LiveServer) -> None:
    """With a JSON response_format, the grammar lets a thinking model end its thought first: the
    JSON is the answer (``content``), never the thought (``reasoning_content``)."""
    assert qwen.engine is not None
    [end] = qwen.engine.tokenize("</think>", add_special=False)
    schema = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["days"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}
    with sdk(qwen) as client:  # the bias makes the tiny model end its thought at once
        response = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=60, seed=3, response_format=response_format, logit_bias={str(end): 100}
        )
    message = response.choices[0].message
    jsonschema.validate(json.loads(message.content), schema)
    assert not getattr(message, "reasoning_content", None)  # the thought was empty


def test_enable_thinking_false_reaches_the_template(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        response = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=20, seed=7, extra_body=NO_THINKING)
    message = response.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content


# ---- logprobs -------------------------------------------------------------------------------------


def assert_distribution(entries: list, top: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == top
        values = [t.logprob for t in entry.top_logprobs]
        assert all(v <= 0 for v in values)
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert entry.logprob <= values[0] + 1e-9 if values else True


def test_chat_logprobs_are_the_models_distribution(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        greedy = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
        sampled = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=12, seed=1, logprobs=True, top_logprobs=20)
        none = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=12, seed=1)
    content = greedy.choices[0].logprobs.content
    assert len(content) == greedy.usage.completion_tokens
    assert_distribution(content, 5)
    # Greedy decoding picks the most likely token: it is the first alternative, with its logprob.
    for entry in content:
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert_distribution(sampled.choices[0].logprobs.content, 20)
    assert none.choices[0].logprobs is None


def test_streamed_chat_logprobs_cover_every_token(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=15, seed=2, logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    entries = [e for chunk in chunks for c in chunk.choices if c.logprobs and c.logprobs.content for e in c.logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert_distribution(entries, 3)


def test_completions_logprobs_n(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        response = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
        stream = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3, stream=True)
        streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and value == pytest.approx(max(top.values())) and value <= 0
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    assert [t for s in streamed for t in s.tokens] == logprobs.tokens
    assert [o for s in streamed for o in s.text_offset] == logprobs.text_offset


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
