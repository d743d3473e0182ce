"""A tool call cut off by ``max_tokens`` leaves no template markup in ``content``.

At OpenAI, a call is never text: cut short it comes back as a call with its arguments as far as
they were written, and ``finish_reason`` says ``length``. Here the parser held back ``<tool_`` (it
may still become ``<tool_call>``) and, at the cut, let it out as content, with no call; a call
section cut before its arguments, or a ``</tool_c`` after complete calls, became content too.
With a forced call (``required`` or a named function) the whole answer is the call; with
``auto`` a tail that can only be a marker's start is dropped at a cut, and kept when the model
ended of its own accord (then it wrote it as text). A stream and a whole answer agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from live_server import MODEL_ID, LiveServer, chat_server
from vramsupply.chat import SYNTAXES, OutputParser, ParsedOutput
from vramsupply.chat.syntaxes import GENERIC

BY_NAME = {s.name: s for s in (*SYNTAXES, GENERIC)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
COUNT = {
    "type": "function",
    "function": {"name": "count", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module", params=["qwen3", "qwen35"])
def agent(request: pytest.FixtureRequest, chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    """Qwen3 writes ``<tool_call>`` JSON calls; Qwen3.5 writes XML ``<function=…><parameter=…>``."""
    yield from chat_server(chat_models, request.param)


def answer(client: OpenAI, **options: Any) -> list[tuple[str | None, str, list[tuple[str, str]]]]:
    """Each choice as (finish_reason, content, [(name, arguments)]), from a whole answer."""
    response = client.chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, extra_body=NO_THINKING, **options)
    return [
        (c.finish_reason, c.message.content or "", [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []])
        for c in response.choices
    ]


def streamed(client: OpenAI, **options: Any) -> list[tuple[str | None, str, list[tuple[str, str]]]]:
    """The same, added up from a stream's deltas."""
    choices: dict[int, list[Any]] = {}
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, extra_body=NO_THINKING, stream=True, **options)
    for chunk in stream:
        for c in chunk.choices:
            finish, content, calls = choices.setdefault(c.index, [None, "", {}])
            for t in c.delta.tool_calls or []:
                name, arguments = calls.get(t.index, ("", ""))
                calls[t.index] = (name + (t.function.name or ""), arguments + (t.function.arguments or ""))
            choices[c.index] = [c.finish_reason or finish, content + (c.delta.content or ""), calls]
    return [(finish, content, [calls[i] for i in sorted(calls)]) for finish, content, calls in (choices[i] for i in sorted(choices))]


def test_a_forced_call_cut_at_any_length_is_a_call_and_never_content(agent: LiveServer) -> None:
    """Its arguments are the text written so far, as OpenAI returns them with ``length``: ``""``
    when the cut comes right after the name, before any argument character (not ``{}``, which would
    read as a whole call with no arguments), and a prefix of the uncut call's after that."""
    with OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0) as client:
        [(_, _, [(_, full)])] = answer(client, tools=[WEATHER, COUNT], tool_choice=NAMED, max_tokens=200)
        cut = []
        for limit in (1, 3, 5, 6, 9, 12, 20, 28, 34, 40, 50, 60):
            options = {"tools": [WEATHER, COUNT], "tool_choice": NAMED, "max_tokens": limit}
            whole = answer(client, **options)
            assert streamed(client, **options) == whole, limit
            [(finish, content, calls)] = whole
            assert (finish, content) == ("length", ""), limit
            [(name, arguments)] = calls
            assert name == "get_weather", limit
            assert full.startswith(arguments), (limit, arguments, full)
            cut.append(arguments)
    assert cut[0] == "" and any(0 < len(arguments) < len(full) for arguments in cut), cut


def test_json_arguments_cut_short_are_returned_as_written(chat_models: dict[str, Path]) -> None:
    """Qwen3's JSON calls: the arguments cut by max_tokens are a prefix of the whole call's."""
    with LiveServer(model_path=chat_models["qwen3"], n_ctx=2048, threads=1) as agent:
        with OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0) as client:
            [(_, _, [(_, full)])] = answer(client, tools=[WEATHER], tool_choice=NAMED, max_tokens=120)
            cut = [answer(client, tools=[WEATHER], tool_choice=NAMED, max_tokens=limit)[0][2][0][1] for limit in range(20, 60, 4)]
    assert all(full.startswith(arguments) for arguments in cut)
    assert any(0 < len(arguments) < len(full) for arguments in cut), "some arguments were cut in the middle"


def test_required_calls_cut_short_leave_no_markup_in_content(agent: LiveServer) -> None:
    """``required`` among two tools: before the name is written no call can be named, so the cut
    answer is empty; parallel calls cut after some complete ones keep those, and no ``<tool_c``."""
    with OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0) as client:
        for limit in (1, 5, 6, 14, 30, 60, 90, 150):
            options = {"tools": [WEATHER, COUNT], "tool_choice": "required", "max_tokens": limit, "n": 2}
            whole = answer(client, **options)
            assert streamed(client, **options) == whole, limit
            for finish, content, _ in whole:
                assert (finish, content) == ("length", ""), limit


def test_auto_drops_a_cut_marker_start_but_keeps_what_the_model_ended_with() -> None:
    """The same text, cut by max_tokens or ended by the model: only the cut one was markup."""
    for text in ("The weather <tool_", "The weather <"):
        assert _read("hermes", text, cut=True).content == "The weather "
        assert _read("hermes", text, cut=False).content == text


def test_a_cut_after_complete_calls_drops_the_next_marker_start() -> None:
    call = '<tool_call>\n{"name": "count", "arguments": {"n": 1}}\n</tool_call>'
    for tail in ("\n<tool_c", "</tool_c", "\n<tool_call>\n{\"name\": \"cou"):
        output = _read("hermes", call + tail, cut=True)
        assert output.content == "" and [(c.name, c.arguments) for c in output.tool_calls] == [("count", '{"n": 1}')], tail
    for tail, arguments in (('\n<tool_call>\n{"name": "count", "argu', ""), ('\n<tool_call>\n{"name": "count", "arguments": {"n"', '{"n"')):
        output = _read("hermes", call + tail, cut=True)  # a second call, named before the cut
        assert output.content == "" and [(c.name, c.arguments) for c in output.tool_calls] == [("count", '{"n": 1}'), ("count", arguments)]


def test_an_xml_call_cut_inside_its_first_parameter_is_still_the_call() -> None:
    output = _read("qwen3-xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", cut=True)
    assert output.content == "" and [(c.name, c.arguments) for c in output.tool_calls] == [("get_weather", '{"city": "Par')]
    output = _read("qwen3-xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", cut=False)
    assert output.tool_calls == [] and "<function=get_weather>" in output.content  # a malformed call is text


def _read(family: str, text: str, *, cut: bool, schemas: dict[str, Any] | None = None) -> ParsedOutput:
    for step in (1, len(text)):
        parser = OutputParser(syntax=BY_NAME[family], schemas=schemas)
        pieces = [p for i in range(0, len(text), step) for p in parser.push(text[i : i + step])]
        output = ParsedOutput().add(pieces + parser.finish(cut=cut))
        if step == 1:
            first = output
        else:
            assert (first.content, [(c.name, c.arguments) for c in first.tool_calls]) == (
                output.content, [(c.name, c.arguments) for c in output.tool_calls]
            )
    return output


def test_an_answer_opening_with_a_bracket_or_brace_that_is_no_call_is_content_streamed_and_kept_when_cut() -> None:
    """Llama 3 and the generic family may open a call with bare JSON, and any answer opening with
    ``[`` or ``{`` was taken for one: a citation, a link or a JSON answer of the model's own came
    back empty when max_tokens cut it, and streamed nothing until its end otherwise."""
    prose = ["[1] Paris: sunny. [2] Rome: rain", "[Paris](https://example.com) is sunny and", '{"answer": "sunny", "temp', "{{{{", "[ Ty are cleans"]
    for family in ("llama3", "generic"):
        for text in prose:
            for cut in (True, False):
                assert _read(family, text, cut=cut).content == text, (family, text, cut)
            parser = OutputParser(syntax=BY_NAME[family])
            streamed = [p.text for i in range(0, len(text), 7) for p in parser.push(text[i : i + 7])]
            assert "".join(streamed).startswith(text[:14]), (family, text, streamed)  # as it is written, not at the end
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    for family in ("llama3", "generic"):
        for text in (call, "[" + call + "]"):
            output = _read(family, text, cut=False)
            assert output.content == "" and [(c.name, c.arguments) for c in output.tool_calls] == [("get_weather", '{"city": "Paris"}')], (family, text)
        for opening in ("{", "[", '{"na', '[ {"name": "get_w'):
            assert _read(family, opening, cut=True).content == "", (family, opening)  # the start of a call, cut: markup


def test_a_bare_json_object_naming_no_offered_tool_is_content_not_a_call() -> None:
    """A JSON answer of the buyer's own schema may open with ``{"name": …``: it was a call to a
    tool named after its value, and its other fields were lost."""
    schemas = {"get_weather": {"type": "object"}}
    for family in ("llama3", "generic"):
        for text in ('{"name": "Ada", "age": 36}', '{"name": "get_weatherman", "age": 1}', '[{"name": "Ada"}]'):
            for cut in (True, False):
                assert _read(family, text, cut=cut, schemas=schemas).content == text, (family, text, cut)
        call = _read(family, '{"name": "get_weather", "parameters": {"city": "Paris"}}', cut=False, schemas=schemas)
        assert [(c.name, c.arguments) for c in call.tool_calls] == [("get_weather", '{"city": "Paris"}')], family
        wrapped = _read(family, '{"type": "function", "function": {"name": "nope", "parameters": {}}}', cut=False, schemas=schemas)
        assert wrapped.tool_calls == [] and wrapped.content, family
        both = _read(family, '[{"name": "get_weather", "parameters": {"city": "A"}}, {"name": "nope", "parameters": {}}]', cut=False, schemas=schemas)
        assert ([(c.name, c.arguments) for c in both.tool_calls], both.content) == ([("get_weather", '{"city": "A"}')], ""), family
