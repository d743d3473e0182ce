"""gpt-oss's harmony format through the official openai SDK: thought, answer and calls on channels.

The server runs the tiny model with a gpt-oss-style template, its harmony markers control tokens
of the vocabulary as in gpt-oss's (``chat_models.py``): llama.cpp renders ``<|channel|>``,
``<|message|>``, ``<|start|>``, ``<|constrain|>`` and ``<|end|>`` as text, and ends the generation at
``<|call|>`` and ``<|return|>``. The tiny model writes nonsense, so what it writes is held by the
grammars of a forced call or a JSON ``response_format``, which let it think on the analysis
channel first or not (each seed decides); a logit bias on ``<|end|>`` keeps its thoughts short.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from chat_models import template_text
from live_server import MODEL_ID, LiveServer, chat_server
from test_agent_api import ASK, TOOLS, WEATHER, WEATHER_SCHEMA, check_weather_call, sdk
from vramsupply.engine import ChatRequest
from vramsupply.engine.chat import ChatTemplate

MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>")
SEEDS = range(8)


@pytest.fixture(scope="module")
def gpt_oss(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "gpt-oss")


def short_thoughts(server: LiveServer) -> dict[str, float]:
    assert server.engine is not None
    [end] = server.engine.tokenize("<|end|>", add_special=False)
    return {str(end): 20}


def no_markup(text: str | None) -> None:
    assert not any(marker in (text or "") for marker in MARKERS), text


@pytest.mark.parametrize("choice", ["required", WEATHER])
def test_a_forced_call_may_follow_a_thought_on_the_analysis_channel(gpt_oss: LiveServer, choice: object) -> None:
    """The thought ends at ``<|end|>`` (no end of generation here) and the call follows in the
    same answer; the thought is ``reasoning_content``, the call ``tool_calls``, no markup leaks."""
    thought = 0
    with sdk(gpt_oss) as client:
        for seed in SEEDS:
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, tools=TOOLS[:1], tool_choice=choice, seed=seed, max_tokens=300,
                logit_bias=short_thoughts(gpt_oss),
            )
            choice_out = response.choices[0]
            assert choice_out.finish_reason == "tool_calls", choice_out
            assert choice_out.message.content is None
            [call] = choice_out.message.tool_calls
            check_weather_call(call)
            reasoning = getattr(choice_out.message, "reasoning_content", None)
            no_markup(reasoning)
            thought += bool(reasoning)
            details = response.usage.completion_tokens_details
            reasoning_tokens = details.reasoning_tokens if details is not None else None
            assert (reasoning_tokens or 0) > 0 if reasoning else reasoning_tokens == 0, (reasoning, response.usage)
            assert reasoning_tokens is None or reasoning_tokens < response.usage.completion_tokens
    assert 0 < thought < len(SEEDS), "some seeds think first, some call at once"


def test_a_streamed_harmony_answer_is_the_whole_answer_in_deltas(gpt_oss: LiveServer) -> None:
    request = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS[:1], "tool_choice": "required", "max_tokens": 300}
    thought = 0
    with sdk(gpt_oss) as client:
        for seed in SEEDS:
            whole = client.chat.completions.create(seed=seed, logit_bias=short_thoughts(gpt_oss), **request)
            chunks = list(client.chat.completions.create(seed=seed, logit_bias=short_thoughts(gpt_oss), stream=True, **request))
            deltas = [c.delta for chunk in chunks for c in chunk.choices]
            reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
            fragments = [f for d in deltas for f in (d.tool_calls or [])]
            message = whole.choices[0].message
            assert reasons == ["tool_calls"]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            assert reasoning == (getattr(message, "reasoning_content", None) or "")
            thought += bool(reasoning)
            assert "".join(d.content or "" for d in deltas) == ""
            first, *rest = fragments
            [call] = message.tool_calls
            assert (first.index, first.function.name, first.function.arguments) == (0, "get_weather", "")
            assert "".join(f.function.arguments for f in rest) == call.function.arguments
    assert thought, "a thought streams as reasoning_content deltas before the call"


FORECAST_SCHEMA = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["days"]}
FORECAST = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST_SCHEMA}}


def test_a_json_response_format_is_the_final_message_after_the_thought(gpt_oss: LiveServer) -> None:
    schema, response_format = FORECAST_SCHEMA, FORECAST
    thought = 0
    with sdk(gpt_oss) as client:
        for seed in SEEDS:
            response = client.chat.completions.create(
                model=MODEL_ID, messages=ASK, max_tokens=300, seed=seed, response_format=response_format, logit_bias=short_thoughts(gpt_oss)
            )
            choice = response.choices[0]
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), schema)
            reasoning = getattr(choice.message, "reasoning_content", None)
            no_markup(reasoning)
            thought += bool(reasoning)
    assert 0 < thought < len(SEEDS)


# ---- stop strings in the thought before a grammar-held answer ----------------------------------------


HELD = {"json": {"response_format": FORECAST}, "forced call": {"tools": TOOLS[:1], "tool_choice": WEATHER}}


def held_answer_text(choice: object, held: str) -> str:
    """The held answer's text, checked whole: the JSON content, or the forced call's arguments."""
    message = choice.message  # type: ignore[attr-defined]
    if held == "json":
        jsonschema.validate(json.loads(message.content), FORECAST_SCHEMA)
        return message.content
    [call] = message.tool_calls
    check_weather_call(call)
    return call.function.arguments


@pytest.mark.parametrize("held", HELD, ids=HELD)
def test_a_stop_string_in_the_analysis_message_stops_before_a_held_answer_and_not_inside_it(gpt_oss: LiveServer, held: str) -> None:
    """A buyer's stop string the model writes in its thought (the analysis message a JSON
    response_format or a forced call may follow) ends the answer there, as in a thought no grammar
    holds: finish_reason stop, the thought so far in reasoning_content, nothing after it, streamed
    or not. The same text in an answer that comes at once is the answer's, whole. Before, a stop
    string was ignored in that thought, which went on to max_tokens."""
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 300, "stop": [" "], **HELD[held]}
    thought = answered = 0
    with sdk(gpt_oss) as client:
        for seed in SEEDS:
            response = client.chat.completions.create(seed=seed, **request)
            choice, reasoning = response.choices[0], getattr(response.choices[0].message, "reasoning_content", None)
            if choice.message.content or choice.message.tool_calls:
                answered += " " in held_answer_text(choice, held)
                assert reasoning is None and choice.finish_reason == ("stop" if held == "json" else "tool_calls"), choice
                continue
            thought += bool(reasoning)
            assert choice.finish_reason == "stop" and " " not in (reasoning or "") and response.usage.completion_tokens < 300, (seed, choice)
            chunks = list(client.chat.completions.create(seed=seed, stream=True, **request))
            streamed = "".join(getattr(c.delta, "reasoning_content", None) or "" for chunk in chunks for c in chunk.choices)
            reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
            assert (streamed, reasons) == (reasoning or "", ["stop"]), seed
    assert thought and answered, "some seeds think first (and stop there), some answer at once with a space in the answer"


@pytest.mark.parametrize("held", HELD, ids=HELD)
def test_no_stop_string_applies_in_the_held_answer_after_the_analysis_message(gpt_oss: LiveServer, held: str) -> None:
    """Once the thought's ``<|end|>`` is written (a logit bias writes it soon) the grammar holds the
    answer, and stop strings it surely holds do not cut it."""
    assert gpt_oss.engine is not None
    [end] = gpt_oss.engine.tokenize("<|end|>", add_special=False)
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 300, "stop": ['"', " ", ":"], "logit_bias": {str(end): 100}, **HELD[held]}
    thought = 0
    with sdk(gpt_oss) as client:
        for seed in SEEDS:
            response = client.chat.completions.create(seed=seed, **request)
            choice, details = response.choices[0], response.usage.completion_tokens_details
            assert '"' in held_answer_text(choice, held), seed
            assert choice.finish_reason == ("stop" if held == "json" else "tool_calls"), choice
            thought += bool(details is not None and details.reasoning_tokens)
    assert thought, "some seeds answer after a thought"


def test_an_agent_loop_sends_the_thought_the_call_and_its_result_back_as_gpt_oss_reads_them(gpt_oss: LiveServer) -> None:
    """``reasoning_content`` sent back reaches the template as ``thinking`` (gpt-oss's name for
    it), the call as a ``to=functions.NAME`` message with its arguments as JSON (not a quoted
    string), the result as the function's message to the assistant."""
    assert gpt_oss.engine is not None
    with sdk(gpt_oss) as client:
        first = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=WEATHER, seed=1, max_tokens=300, logit_bias=short_thoughts(gpt_oss)
        )
        message = first.choices[0].message.model_dump(exclude_none=True)
        message["reasoning_content"] = "They want the weather: I call get_weather."
        [call] = first.choices[0].message.tool_calls
        messages = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
        final = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=20, seed=1)
    assert final.choices[0].finish_reason in ("stop", "length")
    # The prompt as the engine renders it (its tokens' text puts a space after each marker: the
    # tiny model's tokenizer is SentencePiece's), then as the template wrote it.
    prompt = gpt_oss.engine.detokenize(gpt_oss.engine.prepare_chat(ChatRequest(messages, tools=TOOLS)).tokens)
    assert "analysis<|message|> They want the weather: I call get_weather.<|end|>" in prompt
    prompt = ChatTemplate(template_text("gpt-oss"), "<s>", "</s>").render(messages, TOOLS)
    head = (
        "<|start|>assistant<|channel|>analysis<|message|>They want the weather: I call get_weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
    )
    tail = '<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"Sunny"<|end|><|start|>assistant'
    assert head in prompt and prompt.endswith(tail)
    assert json.loads(prompt.split(head)[1].removesuffix(tail)) == json.loads(call.function.arguments)


def test_an_answer_s_thought_and_an_empty_tool_calls_list_in_history_render() -> None:
    """Clients send ``tool_calls: []`` on plain answers; gpt-oss's template takes any ``tool_calls``
    key for a call. The last answer's thought shows when no turn is opened after it."""
    template = ChatTemplate(template_text("gpt-oss"), "<s>", "</s>")
    history = [*ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Easy.", "tool_calls": []}]
    prompt = template.render_turn(history, TOOLS, {}, open_turn=False)
    assert prompt.endswith("<|start|>assistant<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|end|>")
    assert "type get_weather = (_: {\ncity: string,\nunit: \"celsius\" | \"fahrenheit\",\ndays?: number,\n}) => any;" in prompt
    assert WEATHER_SCHEMA["required"] == ["city", "unit"]


def test_a_tool_without_a_description_is_shown_with_an_empty_one(gpt_oss: LiveServer) -> None:
    """OpenAI lets a tool leave its description out (MCP tools often do); gpt-oss's template adds it
    to text, and every such request was a 400 blamed on ``messages``."""
    bare = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
    with sdk(gpt_oss) as client:
        for function in (bare, {**bare, "description": None}):
            response = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[{"type": "function", "function": function}], max_tokens=4, seed=1)
            assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_reasoning_effort_takes_openai_s_values_and_refuses_any_other_with_a_400_naming_it(gpt_oss: LiveServer) -> None:
    """gpt-oss's template writes the effort into its system message ("Reasoning: high"); one OpenAI
    does not know ("extreme", "HIGH", a number) reached it as sent, where OpenAI answers 400."""
    assert gpt_oss.engine is not None
    with sdk(gpt_oss) as client:
        for effort in ("none", "minimal", "low", "medium", "high", "xhigh", "max", None):
            response = client.chat.completions.create(model=MODEL_ID, messages=ASK, reasoning_effort=effort, max_tokens=1, seed=1)
            variables = {} if effort is None else {"reasoning_effort": effort}
            rendered = gpt_oss.engine.prepare_chat(ChatRequest(ASK, template_variables=variables)).tokens
            assert response.usage is not None and response.usage.prompt_tokens == len(rendered), effort
        for unknown in ("extreme", "HIGH", "", 5):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model=MODEL_ID, messages=ASK, reasoning_effort=unknown, max_tokens=1)  # type: ignore[arg-type]
            assert refused.value.body == {
                "message": "Invalid value for 'reasoning_effort': Input should be 'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'",
                "type": "invalid_request_error", "param": "reasoning_effort", "code": "invalid_value",
            }, unknown


# ---- parallel calls: gpt-oss makes one call a generation; others' parallel calls in its history -------


def test_gpt_oss_makes_one_call_an_answer_whatever_parallel_tool_calls_says(gpt_oss: LiveServer) -> None:
    """``<|call|>`` ends the generation (in llama.cpp as in OpenAI's harmony spec: the caller runs
    the tool), so an answer holds one call, with ``parallel_tool_calls`` true (the default) or
    false: ``finish_reason`` tool_calls, streamed at index 0 as OpenAI streams a call (id, type and
    name first, then the arguments)."""
    with sdk(gpt_oss) as client:
        for parallel in (True, False):
            for seed in range(4):
                request = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": parallel, "max_tokens": 300}
                whole = client.chat.completions.create(seed=seed, logit_bias=short_thoughts(gpt_oss), **request)
                chunks = list(client.chat.completions.create(seed=seed, logit_bias=short_thoughts(gpt_oss), stream=True, **request))
                [call] = whole.choices[0].message.tool_calls
                assert whole.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "get_time"), whole
                first, *rest = [f for chunk in chunks for c in chunk.choices for f in (c.delta.tool_calls or [])]
                assert (first.index, first.id is not None, first.type, first.function.name) == (0, True, "function", call.function.name)
                assert {f.index for f in rest} <= {0} and all(f.id is None for f in rest), (parallel, seed)
                assert "".join(f.function.arguments for f in rest) == call.function.arguments


def parallel_turn(results_order: tuple[int, ...]) -> list[dict]:
    """An agent's history after another model's parallel calls: one assistant message making two
    calls (with the thought sent back), and the results as the agent's runner finished them."""
    calls = [
        {"id": "call_weather", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_time", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
    ]
    results = [{"role": "tool", "tool_call_id": "call_weather", "content": "Sunny"}, {"role": "tool", "tool_call_id": "call_time", "content": "12:00"}]
    asked = [{"role": "user", "content": "Weather and time in Paris?"}]
    return [*asked, {"role": "assistant", "content": None, "reasoning_content": "I need both.", "tool_calls": calls}, *(results[i] for i in results_order)]


@pytest.mark.parametrize("results_order", [(0, 1), (1, 0)], ids=["results in order", "results out of order"])
def test_parallel_calls_in_history_reach_gpt_oss_one_call_after_another_each_with_its_result(gpt_oss: LiveServer, results_order: tuple[int, ...]) -> None:
    """gpt-oss's template shows an assistant message's first call only, and names every result
    after it by that call: the second call vanished and its result came back from the first
    function. Each call is now a message of its own, followed by its result (matched by
    ``tool_call_id``, whatever order the results came in), as gpt-oss lays out calls it makes one
    after another; the thought comes once, before the first."""
    assert gpt_oss.engine is not None
    messages = parallel_turn(results_order)
    with sdk(gpt_oss) as client:
        answer = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=8, seed=1)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = ChatTemplate(template_text("gpt-oss"), "<s>", "</s>").render(messages, TOOLS)
    turn = (
        "<|start|>assistant<|channel|>analysis<|message|>I need both.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"Sunny"<|end|>'
        '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"tz": "CET"}<|call|>'
        '<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>"12:00"<|end|>'
        "<|start|>assistant"
    )
    assert prompt.endswith("<|start|>user<|message|>Weather and time in Paris?<|end|>" + turn), prompt
    # The server rendered that prompt: its tokens' text is the same, but for a space after each
    # marker (the tiny model's tokenizer is SentencePiece's) and <|call|>, an end-of-generation token, unshown.
    served = gpt_oss.engine.prepare_chat(ChatRequest(messages, tools=TOOLS)).tokens
    assert answer.usage.prompt_tokens == len(served)
    assert gpt_oss.engine.detokenize(served).replace("|> ", "|>") == prompt.replace("<|call|>", "")
