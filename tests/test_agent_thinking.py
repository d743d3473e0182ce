"""A thinking model's edges, through the official openai SDK: ``reasoning_effort`` sent among
``chat_template_kwargs``, a ``</think>`` where no thought is open, and stop strings in a thought
that comes before a grammar-held answer.

The servers run the tiny model with a Qwen3-style template (its ``</think>`` a control token that
the output shows, ``chat_models.py``), whose generation prompt opens the thought unless
``enable_thinking`` is false, and with a gpt-oss-style one, whose template reads
``reasoning_effort``. The tiny model writes nonsense; a logit bias on ``</think>`` makes it write
the marker, and stop strings cut what it writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from live_server import MODEL_ID, LiveServer, chat_server
from test_agent_api import ASK, TOOLS, WEATHER, check_weather_call, sdk
from vramsupply.engine import ChatRequest

ANSWER_SCHEMA = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["days"]}
ANSWER = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": ANSWER_SCHEMA}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
EFFORTS = "'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'"


@pytest.fixture(scope="module")
def qwen(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "qwen3")


@pytest.fixture(scope="module")
def gpt_oss(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "gpt-oss")


def end_token(server: LiveServer) -> str:
    assert server.engine is not None
    [end] = server.engine.tokenize("</think>", add_special=False)
    return str(end)


# ---- reasoning_effort in chat_template_kwargs -----------------------------------------------------


def refusal(client: openai.OpenAI, **fields: object) -> dict:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=1, **fields)  # type: ignore[arg-type]
    return refused.value.body


def test_a_reasoning_effort_in_chat_template_kwargs_is_held_to_openai_s_values(gpt_oss: LiveServer) -> None:
    """The template reads the same variable either way ("Reasoning: banana" in gpt-oss's system
    message): the top-level field was a 400, the kwargs' one reached the template as sent."""
    with sdk(gpt_oss) as client:
        for unknown in ("banana", "HIGH", "", 5, True, ["high"]):
            assert refusal(client, extra_body={"chat_template_kwargs": {"reasoning_effort": unknown}}) == {
                "message": f"Invalid value for 'chat_template_kwargs.reasoning_effort': Input should be {EFFORTS}",
                "type": "invalid_request_error", "param": "chat_template_kwargs.reasoning_effort", "code": "invalid_value",
            }, unknown
        assert refusal(client, extra_body={"chat_template_kwargs": ["high"]})["param"] == "chat_template_kwargs"


def test_reasoning_effort_given_twice_must_agree(gpt_oss: LiveServer) -> None:
    """Both set the template's ``reasoning_effort``: the same value is taken, two are a 400 (before,
    the kwargs' one won silently); a null in the kwargs is not given, as at the top level."""
    assert gpt_oss.engine is not None

    def prompt_tokens(**fields: object) -> int:
        response = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=1, seed=1, **fields)  # type: ignore[arg-type]
        assert response.usage is not None
        return response.usage.prompt_tokens

    def rendered(variables: dict) -> int:
        return len(gpt_oss.engine.prepare_chat(ChatRequest(ASK, template_variables=variables)).tokens)  # type: ignore[union-attr]

    with sdk(gpt_oss) as client:
        assert prompt_tokens(reasoning_effort="high", extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}}) == rendered({"reasoning_effort": "high"})
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}}) == rendered({"reasoning_effort": "low"})
        assert prompt_tokens(reasoning_effort="low", extra_body={"chat_template_kwargs": {"reasoning_effort": None}}) == rendered({"reasoning_effort": "low"})
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"reasoning_effort": None}}) == rendered({})
        assert refusal(client, reasoning_effort="low", extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}}) == {
            "message": "'reasoning_effort' ('low') and 'chat_template_kwargs.reasoning_effort' ('high') are the same setting and were given different values: send one.",
            "type": "invalid_request_error", "param": "chat_template_kwargs.reasoning_effort", "code": "invalid_value",
        }


# ---- a </think> where no thought is open -----------------------------------------------------------


def whole_and_streamed(client: openai.OpenAI, **request: object) -> tuple[object, str, str]:
    """The unstreamed choice, and the streamed content and reasoning joined."""
    choice = client.chat.completions.create(**request).choices[0]  # type: ignore[call-overload]
    chunks = [chunk for chunk in client.chat.completions.create(stream=True, **request) if chunk.choices]  # type: ignore[call-overload]
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    reasoning = "".join(getattr(chunk.choices[0].delta, "reasoning_content", None) or "" for chunk in chunks)
    return choice, content, reasoning


@pytest.mark.parametrize("thinking", [True, False], ids=["thought-opened", "thought-closed-by-template"])
def test_a_think_end_marker_with_no_thought_open_never_reaches_content(qwen: LiveServer, thinking: bool) -> None:
    """With ``enable_thinking`` false the template writes an empty thought, closed; when it opens
    one, the first ``</think>`` closes it. Any later ``</think>`` the model writes went to
    ``content`` as it was, streamed or not; now it is left out of both, the text around it kept."""
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 20, "logit_bias": {end_token(qwen): 22}, "logprobs": True}
    stray = 0
    with sdk(qwen) as client:
        for seed in range(4):
            choice, content, reasoning = whole_and_streamed(client, seed=seed, **request, **({} if thinking else {"extra_body": NO_THINKING}))
            message = choice.message
            stray += [entry.token for entry in choice.logprobs.content].count("</think>") > (1 if thinking else 0)
            assert "</think>" not in (message.content or "") and "</think>" not in content, (seed, message)
            assert content == (message.content or "") and reasoning == (getattr(message, "reasoning_content", None) or ""), seed
            assert "</think>" not in reasoning
    assert stray >= 2, "the bias made the model write </think> where no thought was open"


def test_a_think_end_marker_inside_a_held_json_answer_is_the_answer_s_text(qwen: LiveServer) -> None:
    """A grammar-held answer keeps what the grammar let the model write: a ``</think>`` inside one
    of its JSON strings is data (the answer must still parse and say what was written)."""
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 12}}, "required": ["note"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "note", "schema": schema}}
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 60, "logit_bias": {end_token(qwen): 22}, "response_format": response_format}
    kept = 0
    with sdk(qwen) as client:
        for seed in range(3):
            choice, content, _ = whole_and_streamed(client, seed=seed, **request)
            assert content == choice.message.content
            jsonschema.validate(json.loads(content), schema)
            kept += "</think>" in json.loads(content)["note"]
    assert kept >= 1, "the bias made the model write </think> inside the JSON"


# ---- stop strings in a thought before a grammar-held answer ----------------------------------------


HELD = {"json": {"response_format": ANSWER}, "forced call": {"tools": TOOLS[:1], "tool_choice": WEATHER}}
FREE = {"json": {}, "forced call": {"tools": TOOLS[:1], "tool_choice": "none"}}
"""The same prompts, with no grammar after the thought."""


@pytest.mark.parametrize("held", HELD, ids=HELD)
def test_a_stop_string_in_the_thought_stops_with_a_grammar_as_without(qwen: LiveServer, held: str) -> None:
    """The template opens the thought; a stop string the model writes there ends the answer, as
    it does when no grammar holds what follows the thought (finish_reason stop, the thought so
    far in reasoning_content). With a JSON response_format or a forced call it was ignored: the
    thought went on to max_tokens."""
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 30, "seed": 3, "stop": [" "]}
    with sdk(qwen) as client:
        plain = client.chat.completions.create(**request, **FREE[held])
        for stream in (False, True):
            if stream:
                chunks = [c for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request, **HELD[held])]
                reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
                finish, usage = [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage
            else:
                response = client.chat.completions.create(**request, **HELD[held])
                reasoning, finish, usage = response.choices[0].message.reasoning_content, response.choices[0].finish_reason, response.usage
            assert (finish, reasoning) == (plain.choices[0].finish_reason, plain.choices[0].message.reasoning_content), stream
            assert finish == "stop" and reasoning and " " not in reasoning and usage.completion_tokens < 30, (stream, reasoning)


def test_no_stop_string_applies_in_the_answer_after_the_thought(qwen: LiveServer) -> None:
    """Once the thought has ended the grammar holds the answer, and no stop string cuts it."""
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 200, "seed": 3, "stop": ['"', " ", ":"], "logit_bias": {end_token(qwen): 100}}
    with sdk(qwen) as client:
        answered = client.chat.completions.create(**request, **HELD["json"])
        called = client.chat.completions.create(**request, **HELD["forced call"])
    assert answered.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answered.choices[0].message.content), ANSWER_SCHEMA)
    assert called.choices[0].finish_reason == "tool_calls"
    [call] = called.choices[0].message.tool_calls
    check_weather_call(call)
