"""Histories agents send back, through the official openai SDK: what OpenAI takes is taken, what it
refuses is refused naming the field, and whatever is taken reaches the model's template.

Agent frameworks replay every assistant message they got, the server's own cut tool calls
included, move histories between providers (OpenAI's ``call_…`` ids to a Mistral model), and
declare tools without ``parameters``. The servers run the tiny model with a Qwen3- (Hermes JSON
calls), a Qwen3.5- (XML calls), a Llama-3- and a Mistral-style template (``chat_models.py``), and
the bare tiny model, which has no template (ChatML).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI

from live_server import MODEL_ID, LiveServer, sdk
from vramsupply.engine import ChatRequest

FAMILIES = ("qwen3", "qwen35", "llama3", "mistral")
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now: it takes no parameters."}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def servers(chat_models: dict[str, Path]) -> Iterator[dict[str | None, LiveServer]]:
    """One server per template family, and (key None) the bare tiny model."""
    with ExitStack() as stack:
        started = {family: stack.enter_context(LiveServer(model_path=chat_models[family], threads=1)) for family in FAMILIES}
        started[None] = stack.enter_context(LiveServer(threads=1))
        yield started


def call(call_id: str, name: str = "get_weather", arguments: str = '{"city": "Paris", "unit": "celsius"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def history(*calls: dict, results: list[dict] | None = None) -> list[dict]:
    """ASK, an assistant message making ``calls``, and a result for each (or ``results``)."""
    answers = [{"role": "tool", "tool_call_id": c["id"], "content": "Sunny"} for c in calls] if results is None else results
    return [*ASK, {"role": "assistant", "content": None, "tool_calls": list(calls)}, *answers]


def prompt_of(server: LiveServer, messages: list[dict], tools: list[dict] | None = TOOLS) -> str:
    assert server.engine is not None
    return server.engine.detokenize(server.engine.prepare_chat(ChatRequest(messages, tools=tools)).tokens)


def refused(client: OpenAI, messages: list[dict], tools: list[dict] | None = TOOLS) -> dict:
    """The 400's error object."""
    offered = {"tools": tools} if tools else {}
    with pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=3, extra_body=NO_THINKING, **offered)
    return error.value.body


def cut_call(client: OpenAI) -> object:
    """The server's own forced call, cut by ``max_tokens`` inside its arguments: the longest cut
    whose arguments are not yet JSON (the same seed writes the same tokens)."""
    request = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "tool_choice": WEATHER, "seed": 3, "extra_body": NO_THINKING}
    whole = client.chat.completions.create(max_tokens=200, **request)
    assert whole.choices[0].finish_reason == "tool_calls"
    for max_tokens in range(whole.usage.completion_tokens - 1, 0, -1):
        response = client.chat.completions.create(max_tokens=max_tokens, **request)
        calls = response.choices[0].message.tool_calls or []
        if calls and not _is_json(calls[0].function.arguments):
            assert response.choices[0].finish_reason == "length"
            return response.choices[0].message
    raise AssertionError("no cut left a call with unfinished arguments")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# ---- tool-call arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_servers_own_cut_call_goes_back_as_history(servers: dict, family: str) -> None:
    """What LangChain does with an invalid tool call: send it back with an error as its result."""
    with sdk(servers[family]) as client:
        message = cut_call(client)
        [cut] = message.tool_calls
        messages = [*ASK, message, {"role": "tool", "tool_call_id": cut.id, "content": "error: the arguments were cut"}]
        answer = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=5, extra_body=NO_THINKING)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    replayed = [*ASK, message.model_dump(exclude_none=True), messages[-1]]
    assert "get_weather" in prompt_of(servers[family], replayed).split("What is the weather in Paris?")[-1]


def test_arguments_that_are_no_json_object_reach_a_template_that_writes_text(servers: dict) -> None:
    with sdk(servers["qwen3"]) as client:
        for arguments in ('{"city": "Par', "[1, 2]", "not json"):
            messages = history(call("call_1", arguments=arguments))
            client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=3, extra_body=NO_THINKING)
            assert f'"arguments": {arguments}' in prompt_of(servers["qwen3"], messages)


def test_a_template_that_shows_only_objects_gets_a_cut_calls_whole_members(servers: dict) -> None:
    """Qwen3.5's template walks the arguments' items: a cut object shows what was written whole;
    text that is no object at all is a 400 naming the call, not the template's own failure."""
    cut = history(call("call_1", arguments='{"city": "Paris", "unit": "cel'))
    with sdk(servers["qwen35"]) as client:
        client.chat.completions.create(model=MODEL_ID, messages=cut, tools=TOOLS, max_tokens=3, extra_body=NO_THINKING)
        body = refused(client, history(call("call_1", arguments="[1, 2]")))
    assert "<parameter=city>\nParis\n</parameter>" in prompt_of(servers["qwen35"], cut)
    assert body["param"] == "messages[1].tool_calls[0].function.arguments"
    assert "JSON object" in body["message"]


# ---- tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tool_without_parameters_can_be_offered_and_called(servers: dict, family: str) -> None:
    """``parameters`` is optional at OpenAI: the template sees the empty object schema."""
    time_tool = {"type": "function", "function": {"name": "get_time"}}
    with sdk(servers[family]) as client:
        offered = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[time_tool], max_tokens=3, extra_body=NO_THINKING)
        forced = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=[time_tool], tool_choice="required", parallel_tool_calls=False, max_tokens=100, extra_body=NO_THINKING
        )
    assert offered.choices[0].finish_reason in ("stop", "length", "tool_calls")
    [made] = forced.choices[0].message.tool_calls
    assert made.function.name == "get_time" and isinstance(json.loads(made.function.arguments), dict)
    assert "get_time" in prompt_of(servers[family], ASK, [time_tool])


def test_empty_tools_are_no_tools_and_parallel_tool_calls_alone_is_accepted(servers: dict) -> None:
    """OpenAI refuses both; frameworks send them, and neither asks for anything this server cannot do."""
    with sdk(servers["qwen3"]) as client:
        empty = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[], max_tokens=3, extra_body=NO_THINKING)
        alone = client.chat.completions.create(model=MODEL_ID, messages=ASK, parallel_tool_calls=False, max_tokens=3, extra_body=NO_THINKING)
        auto = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[], tool_choice="auto", max_tokens=3, extra_body=NO_THINKING)
        with pytest.raises(BadRequestError) as required:
            client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[], tool_choice="required", max_tokens=3, extra_body=NO_THINKING)
    assert empty.choices[0].message.content is not None and alone.choices[0].message.content is not None
    assert auto.choices[0].message.content is not None and not auto.choices[0].message.tool_calls, "'auto' among no tools calls none"
    assert required.value.body["param"] == "tool_choice" and "needs 'tools'" in required.value.body["message"]
    assert prompt_of(servers["qwen3"], ASK, []) == prompt_of(servers["qwen3"], ASK, None)


# ---- tool results --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*FAMILIES, None])
def test_a_tool_result_without_tool_call_id_is_400_naming_it(servers: dict, family: str | None) -> None:
    with sdk(servers[family]) as client:
        body = refused(client, history(call("call_1"), results=[{"role": "tool", "content": "Sunny"}]), TOOLS if family else None)
    assert body["param"] == "messages[2].tool_call_id"
    assert "required" in body["message"]


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_a_tool_result_that_answers_no_call_is_400_naming_its_id(servers: dict, family: str) -> None:
    with sdk(servers[family]) as client:
        unknown = refused(client, history(call("call_1"), results=[{"role": "tool", "tool_call_id": "call_2", "content": "Sunny"}]))
        first = refused(client, [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}])
    assert unknown["param"] == "messages[2].tool_call_id" and "'call_2'" in unknown["message"]
    assert first["param"] == "messages[1].tool_call_id"


def test_openai_call_ids_reach_a_mistral_template_as_nine_characters(servers: dict) -> None:
    """A buyer moving from OpenAI to a Mistral model keeps its history: each id becomes a stable
    nine-letter-and-digit one, the same in the call and in its result; Mistral's own ids stay."""
    messages = history(call("call_abc123XYZ"), call("call_def456UVW", "get_time", "{}"), call("abcDEF123", "get_time", ""))
    with sdk(servers["mistral"]) as client:
        answer = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=3)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = prompt_of(servers["mistral"], messages)
    called = re.findall(r'"id": "([^"]*)"', prompt)
    answered = re.findall(r'"call_id": "([^"]*)"', prompt)
    assert called == answered and len(set(called)) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in called) and called[2] == "abcDEF123"
    assert prompt_of(servers["mistral"], messages) == prompt  # the same ids on every turn


def test_a_model_without_a_template_shows_earlier_tool_calls(servers: dict) -> None:
    """ChatML has no tool syntax: the calls are written as JSON after the assistant's content."""
    messages = [*ASK, {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c1")]}]
    messages.append({"role": "tool", "tool_call_id": "c1", "content": "Sunny"})
    with sdk(servers[None]) as client:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=3)
    prompt = prompt_of(servers[None], messages, None)
    assert 'Let me look.\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}<|im_end|>' in prompt
    assert "<|im_start|>tool\nSunny<|im_end|>" in prompt


# ---- sampling fields -----------------------------------------------------------------------------


def test_logit_bias_on_a_token_outside_the_vocabulary_is_400_naming_logit_bias(servers: dict) -> None:
    with sdk(servers[None]) as client, pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=3, logit_bias={"600": 1})
    assert error.value.body["param"] == "logit_bias"
    assert "600" in error.value.body["message"]


def test_64_bit_seeds_that_differ_only_in_high_bits_sample_differently(servers: dict) -> None:
    """llama.cpp's seed has 32 bits: 2**32 and 2**63 used to be seed 0 again."""
    with sdk(servers[None]) as client:

        def sample(seed: int) -> str:
            completion = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=24, temperature=1.0, seed=seed)
            return completion.choices[0].text

        texts = {seed: sample(seed) for seed in (0, 2**32, 2**63, 2**32 - 1)}
        assert sample(2**63) == texts[2**63]  # a seed still reproduces its text
        assert sample(2**32 - 1) == texts[2**32 - 1]  # llama.cpp's "random seed" value is a seed here
    assert len(set(texts.values())) == len(texts)
