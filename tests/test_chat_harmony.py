"""Reading gpt-oss's harmony output back, and the grammars that hold it: strings, no server.

Each text is read whole and one character at a time, which must agree. The grammars are asked of
llama.cpp's own grammar sampler (``gbnf_check.py``).
"""

from __future__ import annotations

import json
import re

import pytest

from chat_models import template_text
from gbnf_check import GrammarChecker
from vramsupply.chat import ParsedOutput
from vramsupply.chat.forced import forced_call_grammar, trigger_patterns
from vramsupply.chat.harmony import HarmonyParser
from vramsupply.chat.harmony_grammar import in_final
from vramsupply.chat.schema import schema_to_gbnf
from vramsupply.chat.syntaxes import syntax_for

HARMONY = syntax_for(template_text("gpt-oss"))
CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
WEATHER = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def read(
    text: str, step: int = 0, calls: bool = True, cut: bool = False, forced: str | None = None, held: bool = False, parallel: bool = True
) -> ParsedOutput:
    parser = HarmonyParser(calls, held_answer=held, parallel=parallel)
    if forced is not None:
        parser.expect_call(forced)
    out = ParsedOutput()
    size = step or max(len(text), 1)
    for i in range(0, len(text), size):
        out.add(parser.push(text[i : i + size]))
    return out.add(parser.finish(cut))


def both_ways(text: str, **options: object) -> tuple[str, str, list[tuple[str, object]]]:
    results = []
    for step in (0, 1):
        out = read(text, step, **options)
        results.append((out.reasoning, out.content, [(c.name, json.loads(c.arguments)) for c in out.tool_calls]))
    assert results[0] == results[1]
    return results[0]


def test_the_family_is_read_from_the_template_text() -> None:
    assert HARMONY.name == "harmony"
    assert set(HARMONY.preserved) == {"<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "<|channel|>analysis<|message|>User asks. Answer.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.",
            ("User asks. Answer.", "It is sunny.", []),
        ),
        ("<|channel|>final<|message|>Hi!<|return|>", ("", "Hi!", [])),
        ("<|channel|>analysis<|message|>Hmm<|end|>\n<|start|>assistant" + CALL, ("Hmm", "", [("get_weather", {"city": "Paris"})])),
        # the recipient before the channel, and " json" for <|constrain|>json, as gpt-oss's template writes history
        ('<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Rome"}', ("", "", [("get_weather", {"city": "Rome"})])),
        ('<|channel|>commentary to=functions.get_weather<|message|>{"city": "Oslo"}<|call|>', ("", "", [("get_weather", {"city": "Oslo"})])),
        # a preamble to the user, then a call
        ("<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant" + CALL, ("", "Let me look.", [("get_weather", {"city": "Paris"})])),
        # the model goes on after <|call|> (a build where it is no end of generation): two calls
        (CALL + "<|call|><|start|>assistant" + CALL.replace("Paris", "Nice"), ("", "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Nice"})])),
        # two thoughts are two paragraphs
        ("<|channel|>analysis<|message|>A<|end|><|start|>assistant<|channel|>analysis<|message|>B<|end|>", ("A\n\nB", "", [])),
        # <|end|> inside a call's JSON string is text (a grammar allows it there)
        ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"x": "<|end|>"}', ("", "", [("f", {"x": "<|end|>"})])),
        # a model that ignores the format writes content
        ("Just text, <|channel|> and all.", ("", "Just text, <|channel|> and all.", [])),
    ],
)
def test_harmony_messages_are_read_into_reasoning_content_and_calls(text: str, expected: tuple) -> None:
    assert both_ways(text) == expected


def test_without_parallel_calls_a_second_call_message_is_dropped_and_what_follows_it_is_kept() -> None:
    """A copy of gpt-oss whose generation goes on after ``<|call|>`` may write a second call: a
    buyer who sent ``parallel_tool_calls: false`` gets the first only, as with the other families."""
    second = CALL + "<|call|><|start|>assistant" + CALL.replace("Paris", "Nice") + "<|call|>"
    assert both_ways(second, parallel=False) == ("", "", [("get_weather", {"city": "Paris"})])
    answer = second + "<|start|>assistant<|channel|>final<|message|>Done."
    assert both_ways(answer, parallel=False) == ("", "Done.", [("get_weather", {"city": "Paris"})])
    assert len(both_ways(second)[2]) == 2, "parallel calls allowed: both are kept"


def test_without_tools_a_message_to_a_function_is_dropped_not_the_answer() -> None:
    """Its arguments were the answer's text; llama.cpp drops such a message too."""
    preamble = "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
    assert both_ways(preamble + CALL, calls=False) == ("", "Let me check.", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # gpt-oss-20b's stray header before its thought: the thought was a call named "assistant"
        (
            "<|channel|>commentary to=assistant<|channel|>analysis<|message|>User asks weather.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.",
            ("User asks weather.", "It is sunny.", []),
        ),
        ("<|channel|>commentary<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>Yes.", ("Hmm.", "Yes.", [])),
        # a built-in tool nobody offered (browser, python): dropped, never a call or the answer
        ("<|channel|>analysis to=python code<|message|>print(1)<|call|>", ("", "", [])),
        ('<|channel|>commentary to=browser.search <|constrain|>json<|message|>{"query": "x"}<|call|>', ("", "", [])),
        # the answer ends at <|end|>, as every message does: what follows is another message
        ("<|channel|>final<|message|>Answer.<|end|>", ("", "Answer.", [])),
        ("<|channel|>final<|message|>It is sunny.<|end|><|start|>assistant<|channel|>final<|message|>Really.", ("", "It is sunny.\n\nReally.", [])),
        # a generation that stops inside a header (a stop string, EOS): no markup in content
        ("<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>fin", ("t", "", [])),
    ],
)
def test_gpt_oss_s_own_quirks_are_read_as_llama_cpp_reads_them(text: str, expected: tuple) -> None:
    assert both_ways(text) == expected


def test_an_answer_a_grammar_holds_keeps_end_markers_in_its_json() -> None:
    text = '<|channel|>final<|message|>{"x": "<|end|>"}'
    assert both_ways(text, held=True) == ("", '{"x": "<|end|>"}', [])


def test_a_cut_drops_markup_and_a_forced_call_cut_in_its_header_is_still_the_named_call() -> None:
    assert both_ways("<|channel|>final<|message|>Sun<|ret", cut=True) == ("", "Sun", [])
    assert both_ways("<|channel|>analysis<|message|>Think<|en", cut=True) == ("Think", "", [])
    out = read("<|channel|>commentary to=functions.get", cut=True, forced="get_weather")
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", "")] and out.content == ""
    thinking = read("<|channel|>analysis<|message|>Still thinking", cut=True, forced="get_weather")
    assert thinking.tool_calls == [] and thinking.reasoning == "Still thinking"


def test_the_reasoning_span_covers_the_thought_and_its_markers() -> None:
    text = "<|channel|>analysis<|message|>Hmm<|end|><|start|>assistant<|channel|>final<|message|>Yes"
    parser = HarmonyParser()
    parser.push(text)
    parser.finish()
    assert parser.reasoning_span == (0, text.index("<|start|>"))


def test_a_forced_call_grammar_allows_one_thought_first(checker: GrammarChecker) -> None:
    grammar = forced_call_grammar(HARMONY, WEATHER, parallel=True)
    assert checker.accepts(grammar, CALL)
    assert checker.accepts(grammar, "<|channel|>analysis<|message|>I think <|en <|end|><|start|>assistant" + CALL)
    assert not checker.accepts(grammar, "<|channel|>analysis<|message|>x<|end|>" + CALL)  # no <|start|>assistant
    assert not checker.accepts(grammar, "<|channel|>final<|message|>Hi")


def test_a_json_answer_is_the_final_message_or_with_tools_auto_a_call(checker: GrammarChecker) -> None:
    answer = schema_to_gbnf({"type": "object", "properties": {"d": {"type": "integer"}}, "required": ["d"]})
    alone, with_calls = in_final(answer), in_final(answer, forced_call_grammar(HARMONY, WEATHER, parallel=True, lazy=True))
    thought = "<|channel|>analysis<|message|>hm<|end|><|start|>assistant"
    for grammar in (alone, with_calls):
        assert checker.accepts(grammar, '<|channel|>final<|message|>{"d": 3}')
        assert checker.accepts(grammar, thought + '<|channel|>final<|message|>{"d": 3}')
        assert not checker.accepts(grammar, '{"d": 3}')
    assert checker.accepts(with_calls, thought + CALL) and not checker.accepts(alone, CALL)


def test_an_auto_call_s_lazy_grammar_wakes_at_a_call_header_not_inside_a_thought() -> None:
    [trigger] = trigger_patterns(HARMONY, None, False)
    pattern = re.compile(trigger)
    assert pattern.fullmatch(CALL).start(1) == 0
    after = "<|channel|>analysis<|message|>x<|end|><|start|>assistant"
    assert pattern.fullmatch(after + CALL).start(1) == len(after)
    assert pattern.fullmatch("<|channel|>analysis<|message|>I'd write <|channel|>commentary to=functions.f") is None


IN_ROLE = '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
"""The header as gpt-oss's template writes every call in history, which the model copies."""


def test_an_auto_call_in_either_header_form_or_on_the_analysis_channel_wakes_its_grammar(checker: GrammarChecker) -> None:
    """Only ``<|channel|>commentary to=`` woke it: a call in the form the template writes in history
    was parsed, its arguments held to nothing (invalid JSON, a wrong schema, an unknown name)."""
    [trigger] = trigger_patterns(HARMONY, None, False)
    grammar = forced_call_grammar(HARMONY, WEATHER, parallel=True, lazy=True)
    thought = "<|channel|>analysis<|message|>t<|end|>"
    on_analysis = '<|start|>assistant<|channel|>analysis to=functions.get_weather<|message|>{"city": "Paris"}'
    for text in (thought + IN_ROLE, thought + on_analysis, IN_ROLE.removeprefix("<|start|>assistant")):
        match = re.fullmatch(trigger, text)
        assert match is not None, text
        assert checker.accepts(grammar, text[match.start(1) :]), text
        assert not checker.accepts(grammar, text[match.start(1) :].replace("Paris", "Paris\", \"x\": 1")), "held to the schema"
    assert both_ways(thought + IN_ROLE) == ("t", "", [("get_weather", {"city": "Paris"})])
