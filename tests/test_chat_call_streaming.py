"""Tool-call arguments stream as the model writes them, and add up to the whole answer's arguments.

Pure string tests, written the way each JSON family's models write calls, fed one character at a
time as tokens would arrive: the call is announced (name, id) before its arguments are complete,
the fragments never carry the call's own wrapper, and a whole response (the same text read at
once) has exactly the concatenated arguments. At the end, the reasoning-token count: which tokens
brought the thought's text.
"""

from __future__ import annotations

import json

import pytest

from vramsupply.chat import SYNTAXES, OutputParser, ParsedOutput, Piece, ReasoningMarkers
from vramsupply.engine import ChatPrompt
from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.chat_shape import ChatShape
from vramsupply.server.responses import PromptTokensDetails, UsageOut

BY_NAME = {s.name: s for s in SYNTAXES}
ARGUMENTS = '{"city": "Paris", "days": [1, 2], "note": "a \\"quoted\\" } ]"}'
STREAMED = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGUMENTS}}}\n</tool_call>'),
    ("hermes", f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {ARGUMENTS}}}\n</tool_call>'),
    ("llama3", f'{{"name": "get_weather", "parameters": {ARGUMENTS}}}'),
    ("llama3", f'<|python_tag|>{{"name": "get_weather", "parameters": {ARGUMENTS}}}'),
    ("mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {ARGUMENTS}, "id": "a1B2c3D4e"}}]'),
    ("mistral-args", f"[TOOL_CALLS]get_weather[ARGS]{ARGUMENTS}"),
    ("qwen3-xml", f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGUMENTS}}}\n</tool_call>'),  # JSON in its blocks too
    ("granite", f'<|tool_call|>[{{"name": "get_weather", "arguments": {ARGUMENTS}}}]'),
    ("firefunction", f' functools[{{"name": "get_weather", "arguments": {ARGUMENTS}}}]'),
]


def read(text: str, family: str, *, step: int, parallel: bool = True) -> tuple[list[Piece], ParsedOutput]:
    parser = OutputParser(syntax=BY_NAME[family], parallel=parallel)
    pieces: list[Piece] = []
    for i in range(0, len(text), step):
        pieces += parser.push(text[i : i + step])
    pieces += parser.finish()
    return pieces, ParsedOutput().add(pieces)


@pytest.mark.parametrize(("family", "text"), STREAMED)
def test_arguments_stream_in_fragments_that_add_up_to_the_whole_answer(family: str, text: str) -> None:
    pieces, streamed = read(text, family, step=1)
    _, whole = read(text, family, step=len(text))
    [call] = whole.tool_calls
    assert call.name == "get_weather" and call.arguments == ARGUMENTS  # the model's own text
    kinds = [p.kind for p in pieces if p.kind in ("tool_call", "arguments")]
    assert kinds[0] == "tool_call" and kinds.count("arguments") == len(ARGUMENTS) - 1  # a character each, but the opening {"
    assert "".join(p.text for p in pieces if p.kind == "arguments") == call.arguments
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert streamed.content == whole.content


def test_qwen3_xml_calls_stream_one_parameter_at_a_time() -> None:
    """Qwen3.5 writes ``<parameter>`` tags, not JSON: each closed parameter goes out as the JSON
    member ``json.dumps`` would write for the whole call, typed like the whole-text parser types it."""
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    parser = OutputParser(syntax=BY_NAME["qwen3-xml"])
    assert parser.push(call[: call.index("Paris") + 3]) == []  # announced with its first parameter
    pieces = parser.push(call[call.index("Paris") + 3 :]) + parser.finish()
    assert pieces[0].kind == "tool_call" and pieces[0].call.name == "get_weather"
    assert [p.text for p in pieces[1:]] == ['{"city": "Paris"', ', "days": 2', "}"]
    _, whole = read(call, "qwen3-xml", step=len(call))
    assert whole.tool_calls[0].arguments == json.dumps({"city": "Paris", "days": 2}) == "".join(p.text for p in pieces[1:])
    _, broken = read(call.replace("2\n</parameter>", "2"), "qwen3-xml", step=1)  # the second parameter never closes
    assert broken.tool_calls[0].arguments == '{"city": "Paris"' and broken.content == "2\n</function>\n</tool_call>"


def test_the_call_is_announced_as_soon_as_its_arguments_open() -> None:
    parser = OutputParser(syntax=BY_NAME["hermes"])
    assert parser.push('<tool_call>\n{"name": "get_weather", "arguments": {') == []  # "{city" would be no call
    [announced, opened] = parser.push('"ci')
    assert announced.kind == "tool_call" and announced.call.name == "get_weather" and announced.call.arguments == ""
    assert (opened.kind, opened.text) == ("arguments", '{"ci')
    assert parser.push('ty": "Oslo"}') == [Piece("arguments", 'ty": "Oslo"}')]
    assert parser.push("}\n</tool_call>") == [] and parser.finish() == []


def test_several_streamed_calls_and_parallel_tool_calls_false() -> None:
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>'
    _, out = read(text, "hermes", step=3)
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("a", "{}"), ("b", '{"x": 1}')]
    pieces, first_only = read(text, "hermes", step=3, parallel=False)
    assert [(c.name, c.arguments) for c in first_only.tool_calls] == [("a", "{}")]
    assert first_only.content == "" and sum(p.kind == "tool_call" for p in pieces) == 1
    mistral = '[TOOL_CALLS]a[ARGS]{}b[ARGS]{"x": 1}'
    assert [(c.name, c.arguments) for c in read(mistral, "mistral-args", step=2)[1].tool_calls] == [("a", "{}"), ("b", '{"x": 1}')]


@pytest.mark.parametrize(
    ("family", "text"),
    [
        ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'),  # name last
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>'),  # a string
        ("llama3", '{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Paris"}}}'),
        ("mistral", '[TOOL_CALLS][{"name": "x", "arguments": {}}, {"arguments": {"city": "Paris"}, "name": "get_weather"}]'),
    ],
)
def test_other_call_shapes_are_read_whole(family: str, text: str) -> None:
    for step in (1, len(text)):
        _, out = read(text, family, step=step)
        assert out.tool_calls[-1].name == "get_weather" and json.loads(out.tool_calls[-1].arguments) == {"city": "Paris"}
        assert out.content == ""


def test_a_call_cut_off_by_max_tokens_keeps_the_arguments_it_had_streamed() -> None:
    """A stream cannot take back what it sent: the whole response reports the same truncated call."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    for step in (1, len(text)):
        _, out = read(text, "hermes", step=step)
        assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "Par')]
        assert out.content == ""


def test_a_call_that_leaves_json_midway_ends_there_and_the_rest_is_content() -> None:
    text = '{"name": "get_weather", "parameters": {"city": Paris}}'
    for step in (1, len(text)):
        _, out = read(text, "llama3", step=step)
        assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": ')]
        assert out.content == "Paris}}"


def test_text_after_the_calls_is_content() -> None:
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\nDone, I called it.'
    for step in (1, 5, len(text)):
        _, out = read(text, "hermes", step=step)
        assert [c.name for c in out.tool_calls] == ["a"] and out.content == "Done, I called it."


# ---- where the thought lies, for counting its tokens ---------------------------------------------


def test_the_thought_span_covers_its_markers_in_the_text_as_pushed() -> None:
    think = ReasoningMarkers("<think>", "</think>")
    parser = OutputParser(reasoning=think)
    for piece in ["\n", "<th", "ink>", "Hmm", "</think>", "\n\nHi"]:
        parser.push(piece)
    assert parser.reasoning_span == (1, 1 + len("<think>Hmm</think>"))
    opened = OutputParser(reasoning=think, in_reasoning=True)
    opened.push("still thinking")
    assert opened.reasoning_span == (0, len("still thinking"))  # not ended: to the end so far
    assert OutputParser(reasoning=think).reasoning_span is None


class DeliveredTokens:
    """What a ``Generation`` says of its tokens: the text delivered up to and with each one."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.token_text_ends = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]

    def token_text_ends_from(self, first: int, count: int) -> list[int]:
        return self.token_text_ends[first : first + count]


def test_reasoning_tokens_count_the_tokens_that_brought_the_thought() -> None:
    """``é`` split over two byte tokens: the first brings no text (held back), and still counts."""
    think = ReasoningMarkers("<think>", "</think>")
    prompt = ChatPrompt([], (), frozenset(), None, (), think, False, None, {}, True)
    shape = ChatShape(id="c", created=0, model="m", include_usage=True, prompt=prompt, token_bytes=lambda t: b"")
    pieces = ["<think>", "Caf", "", "é", "</think>", "\n\n", "Bonjour", "!"]
    shape.track([DeliveredTokens(pieces)])  # type: ignore[list-item]
    shape.text_chunks(0, "".join(pieces), None)
    shape.finish_chunks(0, "stop", None)
    usage = UsageOut(prompt_tokens=3, completion_tokens=8, total_tokens=11, prompt_tokens_details=PromptTokensDetails(cached_tokens=0))
    assert json.loads(shape.usage_chunk(usage).removeprefix(b"data: "))["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5


def test_one_push_holding_a_thoughts_end_and_an_answer_gives_each_delta_its_own_tokens_logprobs() -> None:
    """A stream step can bring several tokens; the thought's last words, ``</think>`` and the
    answer's first came in one push, and every logprob went on the reasoning delta."""
    think = ReasoningMarkers("<think>", "</think>")
    prompt = ChatPrompt([], (), frozenset(), None, (), think, True, None, {}, True)  # the template opened the thought
    shape = ChatShape(id="c", created=0, model="m", include_usage=False, prompt=prompt, token_bytes=lambda t: str(t).encode())
    tokens = ["Let", " me", " see", "</th", "ink>", "\n\n", "It", " is"]
    shape.track([DeliveredTokens(tokens)])  # type: ignore[list-item]
    logprobs = [TokenLogprob(token, -0.5, ()) for token in range(len(tokens))]

    def deltas(chunks: list[bytes]) -> list[tuple[str, list[str]]]:
        """Each chunk's text field and the tokens of its logprobs (shown by id here)."""
        out = []
        for chunk in chunks:
            [choice] = json.loads(chunk.removeprefix(b"data: "))["choices"]
            text = "".join(f"{k}={v}" for k, v in choice["delta"].items() if k in ("reasoning_content", "content") and v)
            out.append((text, [entry["token"] for entry in (choice["logprobs"] or {"content": []})["content"]]))
        return out

    assert deltas(shape.text_chunks(0, "".join(tokens[:7]), logprobs[:7])) == [
        ("reasoning_content=Let me see", ["0", "1", "2", "3", "4"]),  # the marker's tokens with the thought they end
        ("content=It", ["5", "6"]),
    ]
    assert deltas(shape.text_chunks(0, tokens[7], logprobs[7:])) == [("content= is", ["7"])]
    assert deltas(shape.finish_chunks(0, "stop", [])) == [("", [])]

    again = ChatShape(id="c", created=0, model="m", include_usage=False, prompt=prompt, token_bytes=lambda t: str(t).encode())
    again.track([DeliveredTokens(tokens)])  # type: ignore[list-item]
    assert deltas(again.text_chunks(0, "".join(tokens[:4]), logprobs[:4])) == [("reasoning_content=Let me see", ["0", "1", "2"])]  # "</th" waits
    assert deltas(again.text_chunks(0, "".join(tokens[4:]), logprobs[4:])) == [("content=It is", ["3", "4", "5", "6", "7"])]
