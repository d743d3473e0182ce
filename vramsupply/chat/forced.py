"""Grammars that force a tool call (``tool_choice`` ``required`` or a named function).

The call is written in the template family's own syntax, and its arguments must match the tool's
JSON schema, so a forced call always parses and validates. The arguments' rules come from the
JSON-schema converter ``response_format`` uses too (``schema.py``); one converter instance is
shared by all the tools, so their rules live in one grammar without clashing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .call_shapes import parameter_schemas
from .formats import ReasoningMarkers
from .schema import JsonSchemaConverter
from .syntaxes import ToolSyntax
from .thought import thought_rules

_EMPTY_OBJECT = {"type": "object", "properties": {}}
MAX_XML_LENGTH = 1000
"""The longest ``maxLength`` an XML string parameter's rule spells out (llama.cpp expands each
repetition); a longer one is not enforced."""


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Builder:
    def __init__(self) -> None:
        self.converter = JsonSchemaConverter()

    def rule(self, name: str, body: str) -> str:
        return self.converter._add_rule(name, body)

    def schema(self, schema: Any, name: str) -> str:
        return self.converter.add_schema(schema if isinstance(schema, dict) and schema else _EMPTY_OBJECT, name)

    def grammar(self) -> str:
        return self.converter.format_grammar()


def _json_call(name: str, args: str, name_key: str = "name", args_key: str = "arguments", extra: str = "") -> str:
    """``{"name": "NAME", "arguments": ARGS}``; ``extra`` is literal JSON members written first."""
    head = "{" + extra + json.dumps(name_key) + ": " + json.dumps(name) + ", " + json.dumps(args_key) + ": "
    return f'{_literal(head)} {args} "}}"'


def _xml_call(builder: _Builder, index: int, name: str, schema: Any) -> str:
    """Qwen3's ``<function=NAME><parameter=K>value</parameter>…`` with one rule per parameter."""
    properties = parameter_schemas(schema)
    required = set(schema.get("required", [])) if isinstance(schema, dict) else set()
    parts = []
    for key, prop in sorted(properties.items(), key=lambda kv: kv[0] not in required):
        value = _xml_value(builder, prop) or builder.schema(prop, f"tool-{index}-{key}")
        part = f'{_literal(f"<parameter={key}>" + chr(10))} {value} {_literal(chr(10) + "</parameter>" + chr(10))}'
        parts.append(part if key in required else f"( {part} )?")
    head = _literal(f"<tool_call>\n<function={name}>\n")
    return " ".join([head, *parts, _literal("</function>\n</tool_call>")])


def _xml_value(builder: _Builder, prop: Any) -> str | None:
    """A string parameter's rule: its raw text (not JSON), an enum's strings as they are, a
    length as ``minLength``/``maxLength`` say (up to ``MAX_XML_LENGTH``). None: any other value,
    written as JSON."""
    if not isinstance(prop, dict) or prop.get("type", "string") != "string":
        return None
    choices = prop.get("enum", [prop["const"]] if "const" in prop else None)
    if choices is not None:
        if not choices or not all(isinstance(c, str) and "<" not in c for c in choices):
            return None
        return "( " + " | ".join(_literal(c) for c in choices) + " )"
    if "type" not in prop:
        return None
    low, high = prop.get("minLength", 0), prop.get("maxLength")
    if isinstance(low, int) and isinstance(high, int) and 0 <= low <= high <= MAX_XML_LENGTH:
        return builder.rule(f"xml-text-{low}-{high}", f"[^<]{{{low},{high}}}")
    return builder.rule("xml-text", r"[^<]*")


def _call(builder: _Builder, syntax: ToolSyntax, index: int, name: str, schema: Any) -> str:
    if syntax.name == "qwen3-xml":
        return _xml_call(builder, index, name, schema)
    args = builder.schema(schema, f"tool-{index}-args")
    if syntax.name == "hermes":
        return f'"<tool_call>\\n" {_json_call(name, args)} "\\n</tool_call>"'
    if syntax.name == "llama3":
        return _json_call(name, args, args_key="parameters")
    if syntax.name == "command-r7b":
        return _json_call(name, args, "tool_name", "parameters", extra=f'"tool_call_id": "{index}", ')
    if syntax.name == "deepseek":
        return f'{_literal("<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + name + chr(10) + "```json" + chr(10))} {args} {_literal(chr(10) + "```<｜tool▁call▁end｜>")}'
    if syntax.name == "functionary":
        return f'{_literal(f"<function={name}>")} {args} "</function>"'
    if syntax.name == "mistral-args":
        return f'{_literal(f"[TOOL_CALLS]{name}[ARGS]")} {args}'
    return _json_call(name, args)


def _calls(syntax: ToolSyntax, parallel: bool) -> str:
    """How the calls are laid out around ``tool-call`` (one call, or one or more)."""
    many = parallel and syntax.parallel
    if syntax.name in ("hermes", "qwen3-xml", "functionary"):
        return 'tool-call ( "\\n" tool-call )*' if many else "tool-call"
    if syntax.name == "mistral-args":
        return "tool-call+" if many else "tool-call"
    if syntax.name == "deepseek":
        return '"<｜tool▁calls▁begin｜>" ' + ("tool-call+" if many else "tool-call") + ' "<｜tool▁calls▁end｜>"'
    listed = 'tool-call ( ", " tool-call )*' if many else "tool-call"
    wrappers = {
        "mistral": ('"[TOOL_CALLS]["', '"]"'),
        "granite": ('"<|tool_call|>["', '"]"'),
        "firefunction": ('" "? "functools["', '"]"'),
        "command-r7b": ('"<|START_ACTION|>["', '"]<|END_ACTION|>"'),
    }
    if syntax.name in wrappers:
        start, end = wrappers[syntax.name]
        return f"{start} {listed} {end}"
    return "tool-call"


def forced_call_grammar(
    syntax: ToolSyntax,
    functions: Sequence[dict[str, Any]],
    parallel: bool,
    open_reasoning: ReasoningMarkers | None = None,
) -> str:
    """GBNF whose every sentence is one call (or, with ``parallel``, one or more) of ``functions``.

    ``functions`` are OpenAI function objects (``name``, ``parameters``). When the generation
    prompt left a thought open, the model may finish its thought first.
    """
    builder = _Builder()
    alternatives = [_call(builder, syntax, i, f["name"], f.get("parameters")) for i, f in enumerate(functions)]
    builder.rule("tool-call", " | ".join(f"( {a} )" for a in alternatives))
    root = _calls(syntax, parallel)
    if open_reasoning is not None:
        thought = _unused(builder.converter._rules, "thought")
        for name, body in thought_rules(open_reasoning.end, thought).items():
            builder.rule(name, body)
        root = f"{thought} {root}"
    builder.rule("root", root)
    return builder.grammar()


def after_thought(grammar: str, reasoning: ReasoningMarkers) -> str:
    """``grammar`` (GBNF with a ``root`` rule) behind the end of a thought the generation prompt
    left open: without it a thinking model's JSON answer would be its thought, and the answer empty."""
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines() if " ::= " in line)
    answer, thought = (_unused(rules, name) for name in ("answer-after-thought", "thought-before-answer"))
    rules[answer] = rules.pop("root")
    rules.update(thought_rules(reasoning.end, thought))
    rules["root"] = f"{thought} {answer}"
    return "".join(f"{name} ::= {body}\n" for name, body in sorted(rules.items()))


def _unused(rules: Mapping[str, str], name: str) -> str:
    """``name``, or a longer one no rule has (with its ``-1``, ``-2``… the thought's rules use)."""
    while any(rule == name or rule.startswith(name + "-") for rule in rules):
        name += "x"
    return name


def trigger_patterns(syntax: ToolSyntax, reasoning: ReasoningMarkers | None, in_reasoning: bool) -> tuple[str, ...]:
    """Where a lazy call grammar (``tool_choice`` ``auto``) takes over: the family's call marker,
    as regular expressions over the whole output whose first group starts the call.

    The model writes freely until it starts a call; from the marker on, the call must be valid.
    A marker inside a thought does not count: when the template has thinking markers, a thought
    that opens the answer (or the one the prompt left open) must have ended first.
    """
    import re

    if syntax.name == "llama3":
        return (r"\s*(\{)[\s\S]*",)  # bare JSON only at the start; <|python_tag|> code stays free
    if syntax.name in ("generic",):
        return ()
    markers = [m for m in syntax.starts if not m.startswith(" ")]
    if not markers:
        return ()
    marker = "|".join(re.escape(m) for m in markers)
    before = "[\\s\\S]*?"
    if reasoning is not None:
        start, end = re.escape(reasoning.start), re.escape(reasoning.end)
        before = f"[\\s\\S]*?{end}[\\s\\S]*?" if in_reasoning else f"(?:\\s*{start}[\\s\\S]*?{end}|(?!\\s*{start}))[\\s\\S]*?"
    return (f"{before}({marker})[\\s\\S]*",)
