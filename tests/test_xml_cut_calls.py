"""An XML tool call cut by ``max_tokens`` inside a parameter keeps that parameter, as written.

Qwen3.5 writes calls as ``<function=NAME><parameter=K>\\nvalue\\n</parameter>…``. A JSON call cut
by ``max_tokens`` came back with its arguments as far as they were written (``{"city": "Par``, as
OpenAI returns them), but an XML call cut inside a value came back without that parameter: the
buyer never saw what the model had generated of it. Now the parameter being written is kept, its
value so far as a JSON string left open, whatever its type (``{"city": "Paris", "n": "4``): what a
JSON call cut at the same place returns, a prefix of the arguments the whole call would have had
(a newline, or the start of ``</parameter>``, that the cut came inside of is left out). A stream
and a whole answer agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from live_server import MODEL_ID, LiveServer
from vramsupply.chat import SYNTAXES, OutputParser, ParsedOutput

XML = next(s for s in SYNTAXES if s.name == "qwen3-xml")
ASK = [{"role": "user", "content": "Write a note"}]
NOTE = {
    "type": "function",
    "function": {
        "name": "note",
        "parameters": {
            "type": "object",
            "properties": {"title": {"type": "string", "maxLength": 6}, "body": {"type": "string", "maxLength": 30}, "count": {"type": "integer"}},
            "required": ["title", "body", "count"],
        },
    },
}
FORCED = {"tools": [NOTE], "tool_choice": {"type": "function", "function": {"name": "note"}}, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
HEAD = "<tool_call>\n<function=note>\n<parameter=title>\nHi\n</parameter>\n"


@pytest.fixture(scope="module")
def client(chat_models: dict[str, Path]) -> Iterator[OpenAI]:
    with LiveServer(model_path=chat_models["qwen35"], n_ctx=2048, threads=1) as live:
        with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as openai:
            yield openai


def call_of(client: OpenAI, max_tokens: int) -> tuple[str | None, str]:
    response = client.chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, max_tokens=max_tokens, **FORCED)
    choice = response.choices[0]
    [call] = choice.message.tool_calls or []
    assert call.function.name == "note" and not choice.message.content
    return choice.finish_reason, call.function.arguments


def streamed_call(client: OpenAI, max_tokens: int) -> str:
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, max_tokens=max_tokens, stream=True, **FORCED)
    return "".join(t.function.arguments or "" for chunk in stream for c in chunk.choices for t in c.delta.tool_calls or [])


def test_a_call_cut_inside_a_parameter_returns_its_value_so_far(client: OpenAI) -> None:
    finish, whole = call_of(client, 400)
    assert finish == "tool_calls", whole
    cut = {limit: call_of(client, limit) for limit in range(8, 80, 3)}

    inside = [arguments for finish, arguments in cut.values() if finish == "length" and arguments.count('"') % 2 == 1]
    assert inside, "some limit cut inside a value"
    for limit, (finish, arguments) in cut.items():
        if finish == "length" and arguments:
            assert whole.startswith(arguments) or _typed_prefix(whole, arguments), (limit, arguments, whole)
            assert streamed_call(client, limit) == arguments, limit
    assert any('"body": "' in arguments for arguments in inside), inside


def _typed_prefix(whole: str, arguments: str) -> bool:
    """``{"count": "4`` of a whole ``{"count": 42}``: an integer parameter's text, kept as a string."""
    head, _, value = arguments.rpartition(': "')
    return whole.startswith(head + ": " + value)


def test_the_parameter_being_written_is_kept_whatever_its_type() -> None:
    cases = {
        HEAD + "<parameter=body>\nDear Bo": '{"title": "Hi", "body": "Dear Bo',
        HEAD + "<parameter=body>\nDear Bob\n</param": '{"title": "Hi", "body": "Dear Bob',
        HEAD + "<parameter=body>\nDear Bob\n": '{"title": "Hi", "body": "Dear Bob',
        HEAD + "<parameter=body>\n": '{"title": "Hi", "body": "',
        HEAD + "<parameter=count>\n4": '{"title": "Hi", "count": "4',
        HEAD + '<parameter=body>\nsay "hi" \\': '{"title": "Hi", "body": "say \\"hi\\" \\\\',
        "<tool_call>\n<function=note>\n<parameter=title>\nH": '{"title": "H',
        HEAD + "<parameter=bo": '{"title": "Hi"',  # no parameter yet: its name was cut
    }
    for text, arguments in cases.items():
        for step in (1, len(text)):
            parser = OutputParser(syntax=XML, schemas={"note": NOTE["function"]["parameters"]})
            pieces = [p for i in range(0, len(text), step) for p in parser.push(text[i : i + step])]
            output = ParsedOutput().add(pieces + parser.finish(cut=True))
            assert output.content == "" and [(c.name, c.arguments) for c in output.tool_calls] == [("note", arguments)], (text, step)


def test_a_value_ended_by_the_model_is_not_cut_short() -> None:
    """Without a cut, a call left unfinished is no call (as before): nothing is made up."""
    text = HEAD + "<parameter=body>\nDear Bo"
    parser = OutputParser(syntax=XML)
    output = ParsedOutput().add(parser.push(text) + parser.finish(cut=False))
    assert [(c.name, c.arguments) for c in output.tool_calls] in ([], [("note", '{"title": "Hi"')])

