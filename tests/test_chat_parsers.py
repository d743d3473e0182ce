"""Reading tool calls and thoughts back from text written the way real models of each family write it.

Pure string tests: no model. Every case is also fed through the streaming parser one character at a
time, which must give the same answer as the whole text at once.
"""

from __future__ import annotations

import json

import pytest

from vramsupply.chat import SYNTAXES, OutputParser, ParsedOutput, ReasoningMarkers
from vramsupply.chat.formats import detect_format, opens_reasoning
from vramsupply.chat.syntaxes import GENERIC, ToolSyntax, syntax_for

THINK = ReasoningMarkers("<think>", "</think>")
BY_NAME = {s.name: s for s in (*SYNTAXES, GENERIC)}
WEATHER = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


def parse(text: str, syntax: ToolSyntax | None, *, reasoning: ReasoningMarkers | None = None, in_reasoning: bool = False, step: int = 0, parallel: bool = True) -> ParsedOutput:
    parser = OutputParser(reasoning, in_reasoning, syntax, WEATHER, parallel)
    out = ParsedOutput()
    for i in range(0, len(text), step or len(text) or 1):
        out.add(parser.push(text[i : i + (step or len(text))]))
    return out.add(parser.finish())


def both_ways(text: str, family: str | None, **options: object) -> ParsedOutput:
    syntax = BY_NAME[family] if family else None
    whole = parse(text, syntax, **options)
    streamed = parse(text, syntax, step=1, **options)
    assert (streamed.reasoning, streamed.content, [(c.name, c.arguments) for c in streamed.tool_calls]) == (
        whole.reasoning,
        whole.content,
        [(c.name, c.arguments) for c in whole.tool_calls],
    )
    return whole


def calls(out: ParsedOutput) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


# ---- each family, as its models write calls ------------------------------------------------------

WELL_FORMED = [
    # Qwen 2.5 / Qwen3 / Hermes 3
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>', ""),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Let me check.\n"),
    # Qwen3-Coder / Qwen3.5 XML: a string parameter stays a string even when it looks like a number
    ("qwen3-xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\n1984\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", ""),
    # Llama 3.1 / 3.2 / 3.3 bare JSON ("parameters", not "arguments")
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', ""),
    ("llama3", '{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Paris"}}}', ""),
    # Mistral Nemo / Small: a JSON list with 9-character ids; Magistral / Devstral: NAME[ARGS]{…}
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1B2c3D4e"}]', ""),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', ""),
    ("deepseek", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', ""),
    ("deepseek", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', ""),
    ("command-r7b", '<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Paris"}}\n]<|END_ACTION|>', ""),
    ("granite", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]', ""),
    ("firefunction", ' functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]', ""),
    ("functionary", '<function=get_weather>{"city": "Paris"}</function>', ""),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}', ""),
]


@pytest.mark.parametrize(("family", "text", "content"), WELL_FORMED)
def test_each_family_call_is_read_into_name_and_json_arguments(family: str, text: str, content: str) -> None:
    out = both_ways(text, family)
    [(name, arguments)] = calls(out)
    assert name == "get_weather"
    assert arguments["city"] in ("Paris", "1984")
    assert out.content == content


def test_qwen3_xml_types_values_by_the_tool_schema() -> None:
    out = both_ways(WELL_FORMED[2][1], "qwen3-xml")
    assert calls(out) == [("get_weather", {"city": "1984", "days": 2})]


def test_several_calls_in_one_answer() -> None:
    hermes = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>'
    assert calls(both_ways(hermes, "hermes")) == [("a", {}), ("b", {"x": 1})]
    mistral = '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]'
    assert calls(both_ways(mistral, "mistral")) == [("a", {}), ("b", {"x": 1})]
    # With parallel_tool_calls false only the first call is kept.
    assert calls(both_ways(hermes, "hermes", parallel=False)) == [("a", {})]


def test_mistral_keeps_the_models_call_ids_and_makes_nine_character_ones() -> None:
    [given] = both_ways('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}', "mistral").tool_calls
    assert given.id == "a1B2c3D4e"
    # An id written after the arguments comes too late: the stream announced the call before it.
    for text in WELL_FORMED[5:7]:
        [made] = both_ways(text[1], "mistral").tool_calls
        assert len(made.id) == 9 and made.id.isalnum() and made.id != "a1B2c3D4e"


def test_python_tag_text_that_is_not_a_builtin_call_is_code_for_the_python_tool() -> None:
    """Llama 3 writes code-interpreter input raw after ``<|python_tag|>``, even code that does not parse."""
    code = "f.call(x=" + "[" * 1000 + "]" * 1000 + ")"
    assert calls(both_ways("<|python_tag|>" + code, "llama3")) == [("python", {"code": code})]


def test_llama3_python_tag_builtin_tool_and_code() -> None:
    out = both_ways('<|python_tag|>brave_search.call(query="weather in Paris")', "llama3")
    assert calls(out) == [("brave_search", {"query": "weather in Paris"})]
    out = both_ways("<|python_tag|>print(2 + 2)", "llama3")
    assert calls(out) == [("python", {"code": "print(2 + 2)"})]
    out = both_ways('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "llama3")
    assert calls(out) == [("get_weather", {"city": "Paris"})]


# ---- malformed calls stay text -------------------------------------------------------------------

MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "argu'),  # cut off by max_tokens before the arguments
    ("hermes", "<tool_call>\nget_weather(city='Paris')\n</tool_call>"),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),  # no name
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>'),
    ("qwen3-xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>"),
    ("llama3", '{"name": "get_weather", "parameters":'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {city: "Paris"}}\n</tool_call>'),
    ("llama3", "{not json at all}"),
    ("mistral", "[TOOL_CALLS][{'name': 'get_weather'}]"),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]{city: Paris}"),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{bad}\n```<｜tool▁call▁end｜>"),
    ("granite", "<|tool_call|>[{]"),
    ("functionary", '<function=get_weather>{"city": "Paris"}'),
]


MALFORMED += [
    ("hermes", "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>"),  # deeper than json can recurse
]


@pytest.mark.parametrize(("family", "text"), MALFORMED)
def test_a_malformed_call_stays_text(family: str, text: str) -> None:
    out = both_ways(text, family)
    assert out.tool_calls == []
    assert out.content == text.strip()


def test_calls_are_not_parsed_without_tools_and_json_prose_is_content() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    assert both_ways(text, None).content == text
    # Llama 3's bare-JSON rule only applies at the start of the answer.
    prose = 'The answer is {"name": "x", "parameters": {}} as JSON.'
    assert both_ways(prose, "llama3").content == prose


# ---- arguments are JSON that any parser reads ------------------------------------------------------


def strict_json(text: str) -> object:
    """What a strict parser (JavaScript's JSON.parse, Go's encoding/json) makes of ``text``."""
    text.encode("utf-8")  # an unpaired surrogate has no UTF-8 form: the response could not be sent

    def refuse(literal: str) -> object:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=refuse, parse_float=lambda number: float(number) if abs(float(number)) < float("inf") else refuse(number))


ESCAPED_LONE_SURROGATES = [
    ("qwen3-xml", '<tool_call>\n<function=get_weather>\n<parameter=city>\n1\n</parameter>\n<parameter=days>\n["\\ud800"]\n</parameter>\n</function>\n</tool_call>', {"city": "1", "days": ["\ud800"]}),
    ("llama3", '{"name": "get_weather", "parameters": "{\\"city\\": \\"\\\\udc00\\"}"}', {"city": "\udc00"}),
    ("functionary", '<function=get_weather>{"city": "x\\ud800y"}</function>', {"city": "x\ud800y"}),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "\\udfff", "days": 1}}\n</tool_call>', {"city": "\udfff", "days": 1}),
]


@pytest.mark.parametrize(("family", "text", "arguments"), ESCAPED_LONE_SURROGATES)
def test_an_escaped_lone_surrogate_stays_escaped_in_the_arguments(family: str, text: str, arguments: dict) -> None:
    # json reads "\ud800" into a str with no UTF-8 form; written back raw, the answer could not be sent.
    out = both_ways(text, family)
    assert [(c.name, strict_json(c.arguments)) for c in out.tool_calls] == [("get_weather", arguments)]


NOT_JSON_NUMBERS = [
    ("hermes", '<tool_call>\n{"arguments": {"days": 1e999}, "name": "get_weather"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"days": NaN}, "name": "get_weather"}\n</tool_call>'),
    ("llama3", '{"name": "get_weather", "parameters": "{\\"days\\": -Infinity}"}'),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"days\": Infinity}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("llama3", "<|python_tag|>brave_search.call(query=1e999)"),
]


@pytest.mark.parametrize(("family", "text"), NOT_JSON_NUMBERS)
def test_a_call_whose_numbers_json_cannot_hold_stays_text(family: str, text: str) -> None:
    # Python reads 1e999 as inf and accepts NaN; written back they are Infinity and NaN, which no JSON
    # has. (A call whose name comes first streams its arguments as the model wrote them: 1e999 there
    # is JSON's own syntax, and NaN breaks the call where it stands.)
    out = both_ways(text, family)
    assert out.tool_calls == []
    assert out.content == text.strip()


def test_an_xml_value_json_cannot_hold_is_kept_as_its_text() -> None:
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n1e999\n</parameter>\n</function>\n</tool_call>"
    out = both_ways(text, "qwen3-xml")
    assert [strict_json(c.arguments) for c in out.tool_calls] == [{"city": "Paris", "days": "1e999"}]


def test_a_name_is_trimmed_and_one_with_no_utf8_form_is_no_call() -> None:
    spaced = '<tool_call>\n{"name": " get_weather ", "arguments": {}}\n</tool_call>'
    assert [c.name for c in both_ways(spaced, "hermes").tool_calls] == ["get_weather"]
    broken = '{"name": "get_weather\\ud800", "parameters": {}}'
    out = both_ways(broken, "llama3")
    assert out.tool_calls == [] and out.content == broken


@pytest.mark.parametrize("properties", [None, [], "city", 5])
def test_a_tool_schema_whose_properties_is_no_object_types_nothing(properties: object) -> None:
    text = "<tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    schemas = {"get_weather": {"type": "object", "properties": properties}}
    for step in (0, 1):
        parser = OutputParser(None, False, BY_NAME["qwen3-xml"], schemas, True)
        out = ParsedOutput()
        for i in range(0, len(text), step or len(text)):
            out.add(parser.push(text[i : i + (step or len(text))]))
        out.add(parser.finish())
        assert calls(out) == [("get_weather", {"days": 2})]


# ---- reasoning -----------------------------------------------------------------------------------


def test_think_block_goes_to_reasoning_not_content() -> None:
    out = both_ways("<think>\nThe user wants weather.\n</think>\n\nIt is sunny.", None, reasoning=THINK)
    assert (out.reasoning, out.content) == ("The user wants weather.", "It is sunny.")


def test_reasoning_when_the_template_opened_the_think_block() -> None:
    out = both_ways("Hmm, Paris.\n</think>\n\nIt is sunny.", None, reasoning=THINK, in_reasoning=True)
    assert (out.reasoning, out.content) == ("Hmm, Paris.", "It is sunny.")
    # A thought that never ends (max_tokens) is all reasoning.
    out = both_ways("Hmm, still thinking", None, reasoning=THINK, in_reasoning=True)
    assert (out.reasoning, out.content) == ("Hmm, still thinking", "")


def test_reasoning_then_a_tool_call() -> None:
    text = '<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    out = both_ways(text, "hermes", reasoning=THINK)
    assert out.reasoning == "I need the weather tool."
    assert out.content == ""
    assert calls(out) == [("get_weather", {"city": "Oslo"})]


def test_a_tool_call_written_inside_the_thought_is_reasoning() -> None:
    text = '<think>maybe <tool_call>{"name": "x", "arguments": {}}</tool_call></think>No call.'
    out = both_ways(text, "hermes", reasoning=THINK)
    assert out.tool_calls == [] and out.content == "No call."


def test_text_that_merely_starts_like_a_marker_is_content() -> None:
    out = both_ways("<thinking is fun> and <tool_calls are>", "hermes", reasoning=THINK)
    assert out.content == "<thinking is fun> and <tool_calls are>"


def test_a_think_end_marker_where_no_thought_is_open_is_left_out_of_content() -> None:
    """Read whole or a character at a time: a second ``</think>``, or one with no thought opened,
    is markup, not content; the text around it stays content (a stream has sent it), and a tail
    that only begins the marker is content once the answer ends."""
    out = both_ways("Hmm.</think>\n\nIt is </think>sunny.</th", None, reasoning=THINK, in_reasoning=True)
    assert (out.reasoning, out.content) == ("Hmm.", "It is sunny.</th")
    out = both_ways("</think>\n\nIt is sunny.</think>", "hermes", reasoning=THINK)
    assert (out.reasoning, out.content) == ("", "It is sunny.")
    out = both_ways('Sure.</think> <tool_call>{"name": "get_weather", "arguments": {"city": "</think>"}}</tool_call>', "hermes", reasoning=THINK)
    assert out.content == "Sure. " and calls(out) == [("get_weather", {"city": "</think>"})]


# ---- recognising the family from the template ----------------------------------------------------


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("{{ '<tool_call>' }}{{ tools | tojson }}", "hermes"),
        ("<tool_call>\n<function=x>\n<parameter=y>", "qwen3-xml"),
        ("<|start_header_id|>ipython<|end_header_id|> <|python_tag|>", "llama3"),
        ("<|start_header_id|> <function=", "functionary"),
        ("[AVAILABLE_TOOLS] [TOOL_CALLS]", "mistral"),
        ("<｜tool▁calls▁begin｜>", "deepseek"),
        ("<|START_THINKING|><|START_ACTION|>", "command-r7b"),
        ("<|tool_call|>", "granite"),
        (" functools[", "firefunction"),
        ("{% for tool in tools %}{{ tool }}{% endfor %}", "generic"),
    ],
)
def test_family_is_recognised_from_the_template_text(template: str, family: str) -> None:
    assert syntax_for(template).name == family


def test_reasoning_markers_and_an_open_think_block_come_from_the_template() -> None:
    fmt = detect_format("{% if x %}<think>{% endif %}</think>", supports_tools=False)
    assert fmt.reasoning == THINK
    assert detect_format("plain", supports_tools=False).reasoning is None
    assert opens_reasoning("<|im_start|>assistant\n<think>\n", THINK)
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)
    assert not opens_reasoning("<think>old</think> answer<|im_start|>assistant\n", THINK)
