"""Grammars that force a tool call (``tool_choice`` ``required`` or a named function).

The call is written in the template family's own syntax, and its arguments must match the tool's
JSON schema, so a forced call always parses and validates. The arguments' rules come from the
JSON-schema converter ``response_format`` uses too (``schema.py``); one converter instance is
shared by all the tools, so their rules live in one grammar without clashing.

Qwen3.5's XML calls have a rule per parameter, its ``$ref``s resolved against the tool's whole
schema (its ``$defs``). A text parameter (``call_shapes.is_text``, which the parsers follow too)
is written raw, as the family's templates write it: any text without a closing tag, an enum's
strings as they are (``<`` included), a ``pattern`` or ``format`` without ``<``. A function with
``strict: true`` whose schema holds a keyword its rules cannot enforce is an ``UnenforcedKeyword``;
one whose parameters have no finite value (a recursion required all the way round) is a
``RecursiveSchema``, whatever its ``strict``. A harmony (gpt-oss) call is one message on the
commentary channel, after one thought or none (``harmony_grammar.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from . import harmony_grammar, keywords
from .call_shapes import is_text, parameter_members
from .formats import ReasoningMarkers
from .gbnf_text import ANY_CHAR, STRING_FORMATS, XML_CLOSING_TAGS, check_gbnf, gbnf_literal, grammar_rules, grammar_text, renamed, text_without, unused_name, xml_writable
from .pattern import PatternError, pattern_to_gbnf
from .schema import JsonSchemaConverter, UnsatisfiableSchema
from .schema_normal import rewritten
from .syntaxes import ToolSyntax
from .thought import thought_rules

_EMPTY_OBJECT = {"type": "object", "properties": {}}
MAX_XML_LENGTH = 1000
"""The longest ``maxLength`` an XML string parameter's rule spells out (llama.cpp expands each
repetition); a longer one is not enforced."""
_SHORTEST_TAG = min(len(tag) for tag in XML_CLOSING_TAGS)


class _Builder:
    def __init__(self, lazy: bool = False) -> None:
        self.converter = JsonSchemaConverter()
        self.text_rule: str | None = None
        self.lazy = lazy
        """The grammar wakes at a call the model starts (``trigger_patterns``), in whatever form."""

    def rule(self, name: str, body: str) -> str:
        return self.converter._add_rule(name, body)

    def schema(self, schema: Any, name: str) -> str:
        return self.converter.add_schema(schema if isinstance(schema, dict) and schema else _EMPTY_OBJECT, name)

    def grammar(self) -> str:
        return self.converter.format_grammar()


def _json_call(name: str, args: str, name_key: str = "name", args_key: str = "arguments", extra: str = "") -> str:
    """``{"name": "NAME", "arguments": ARGS}``; ``extra`` is literal JSON members written first."""
    head = "{" + extra + json.dumps(name_key) + ": " + json.dumps(name) + ", " + json.dumps(args_key) + ": "
    return f'{gbnf_literal(head)} {args} "}}"'


def _xml_call(builder: _Builder, index: int, name: str, schema: Any) -> str:
    """Qwen3's ``<function=NAME><parameter=K>value</parameter>…`` with one rule per parameter,
    each schema's ``$ref``s resolved against the tool's whole schema (its ``$defs``)."""
    root = builder.converter.resolved(schema if isinstance(schema, dict) else {}, f"tool-{index}")
    root = rewritten(root, "") or root  # booleans and required names without a property
    members = parameter_members(root)
    required = {k for k in root.get("required") or () if isinstance(k, str)}
    builder.converter.note(root, keywords.object_enforced(root, members, required, free=False))
    parts = []
    for key, prop in sorted(members.items(), key=lambda kv: kv[0] not in required):
        if not _xml_key(key):
            if key in required:
                raise UnsatisfiableSchema(f"the parameter name {json.dumps(key)} cannot be written in this model's XML calls")
            continue
        value = _xml_value(builder, prop, f"tool-{index}-{key}")
        part = f"{gbnf_literal(f'<parameter={key}>' + chr(10))} {value} {gbnf_literal(chr(10) + '</parameter>' + chr(10))}"
        parts.append(part if key in required else f"( {part} )?")
    head = gbnf_literal(f"<tool_call>\n<function={name}>\n")
    return " ".join([head, *parts, gbnf_literal("</function>\n</tool_call>")])


def _xml_key(key: str) -> bool:
    """Whether the parsers read ``<parameter=KEY>`` back as this key."""
    return bool(key) and key == key.strip() and ">" not in key and "\n" not in key and xml_writable(key)


def _xml_value(builder: _Builder, prop: Any, name: str) -> str:
    """A parameter's rule: raw text for a text parameter (``call_shapes.is_text``, as the parsers
    read it), else its JSON."""
    target = builder.converter.target(prop)
    if not is_text(target):
        return builder.converter.visit(prop, name)
    if target is not prop:
        builder.converter.note(prop, {"$ref"})
    return _xml_text(builder, target)


def _xml_text(builder: _Builder, schema: dict[str, Any]) -> str:
    """A text parameter's rule: an enum's strings as they are, a ``pattern`` or ``format`` written
    raw, a length as ``minLength``/``maxLength`` say; never a closing tag."""
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list):
        kept = [v for v in keywords.filter_values(schema, values) if isinstance(v, str) and xml_writable(v)]
        if not kept:
            raise UnsatisfiableSchema("no value of a string enum can be written in this model's XML calls")
        builder.converter.note(schema, {"enum", "const", *keywords.VALUE_CHECKS})
        return "( " + " | ".join(gbnf_literal(v) for v in kept) + " )"
    if "pattern" in schema:
        if not isinstance(schema["pattern"], str):
            raise PatternError("'pattern' must be a string")
        builder.converter.note(schema, {"type", "pattern"})
        return f"( {pattern_to_gbnf(schema['pattern'], 'xml')} )"
    if schema.get("format") in STRING_FORMATS:
        builder.converter.note(schema, {"type", "format"})
        return builder.rule(f"format-{schema['format']}", STRING_FORMATS[schema["format"]])
    return _xml_length(builder, schema)


def _xml_length(builder: _Builder, schema: dict[str, Any]) -> str:
    """Text within ``minLength``/``maxLength`` (up to ``MAX_XML_LENGTH``): shorter than a closing
    tag, any character; else no ``<`` (a counted rule cannot follow a tag being written)."""
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    low = low if isinstance(low, int) and 0 <= low <= MAX_XML_LENGTH else 0
    if isinstance(high, int) and high < low:
        raise UnsatisfiableSchema(f"no string fits minLength {low} and maxLength {high}")
    if isinstance(high, int) and high <= MAX_XML_LENGTH:
        builder.converter.note(schema, {"type", "minLength", "maxLength"})
        char = ANY_CHAR if high < _SHORTEST_TAG else "[^<]"
        return builder.rule(f"xml-chars-{low}-{high}", f"{char}{{{low},{high}}}")
    builder.converter.note(schema, {"type", "minLength"})
    return f"[^<]{{{low}}} {_free_text(builder)}" if low else _free_text(builder)


def _free_text(builder: _Builder) -> str:
    """Any text without a closing tag (``gbnf_text.text_without``), its rules added once."""
    if builder.text_rule is None:
        builder.text_rule = unused_name(builder.converter._rules, "xml-text")
        for name, body in text_without(XML_CLOSING_TAGS, builder.text_rule).items():
            builder.converter._rules[name] = body
    return builder.text_rule


def _call(builder: _Builder, syntax: ToolSyntax, index: int, name: str, schema: Any) -> str:
    if syntax.name == "qwen3-xml":
        return _xml_call(builder, index, name, schema)
    args = builder.schema(schema, f"tool-{index}-args")
    if syntax.name == "harmony":
        return harmony_grammar.call_rule(name, args, any_form=builder.lazy)
    if syntax.name == "hermes":
        return f'"<tool_call>\\n" {_json_call(name, args)} "\\n</tool_call>"'
    if syntax.name == "llama3":
        return _json_call(name, args, args_key="parameters")
    if syntax.name == "command-r7b":
        return _json_call(name, args, "tool_name", "parameters", extra=f'"tool_call_id": "{index}", ')
    if syntax.name == "deepseek":
        return f'{gbnf_literal("<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + name + chr(10) + "```json" + chr(10))} {args} {gbnf_literal(chr(10) + "```<｜tool▁call▁end｜>")}'
    if syntax.name == "functionary":
        return f'{gbnf_literal(f"<function={name}>")} {args} "</function>"'
    if syntax.name == "mistral-args":
        return f'{gbnf_literal(f"[TOOL_CALLS]{name}[ARGS]")} {args}'
    return _json_call(name, args)


def _strict_call(builder: _Builder, syntax: ToolSyntax, index: int, function: Mapping[str, Any]) -> str:
    """A function's call; with its ``strict: true``, ``UnenforcedKeyword`` for a keyword its
    rules cannot hold."""
    since = len(builder.converter.unenforced)
    call = _call(builder, syntax, index, function["name"], function.get("parameters"))
    builder.converter.refuse_endless(f"the parameters of tool {function['name']!r}", call)  # the tools before were finite
    if function.get("strict") is True:
        builder.converter.refuse_unenforced(f"the parameters of tool {function['name']!r}", since)
    return call


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
    lazy: bool = False,
) -> str:
    """GBNF whose every sentence is one call (or, with ``parallel``, one or more) of ``functions``.

    ``functions`` are OpenAI function objects (``name``, ``parameters``). When the generation
    prompt left a thought open, the model may finish its thought first; a harmony model may
    write one on its analysis channel first, unless the grammar is ``lazy`` (woken at a call).
    """
    builder = _Builder(lazy)
    alternatives = [_strict_call(builder, syntax, i, f) for i, f in enumerate(functions)]
    builder.rule("tool-call", " | ".join(f"( {a} )" for a in alternatives))
    root = _calls(syntax, parallel)
    if open_reasoning is not None:
        thought = unused_name(builder.converter._rules, "thought")
        for name, body in thought_rules(open_reasoning.end, thought).items():
            builder.rule(name, body)
        root = f"{thought} {root}"
    if syntax.name == "harmony" and not lazy:
        rules = harmony_grammar.with_prelude(grammar_rules(builder.grammar()), root)
        return grammar_text(rules)
    builder.rule("root", root)
    return check_gbnf(builder.grammar())


def after_thought(grammar: str, reasoning: ReasoningMarkers) -> str:
    """``grammar`` (GBNF with a ``root`` rule) behind the end of a thought the generation prompt
    left open: without it a thinking model's JSON answer would be its thought, and the answer empty."""
    rules = grammar_rules(grammar)
    answer, thought = (unused_name(rules, name) for name in ("answer-after-thought", "thought-before-answer"))
    rules[answer] = rules.pop("root")
    rules.update(thought_rules(reasoning.end, thought))
    rules["root"] = f"{thought} {answer}"
    return "".join(f"{name} ::= {body}\n" for name, body in sorted(rules.items()))


def either(first: str, second: str) -> str:
    """GBNF whose sentences are ``first``'s and ``second``'s (each GBNF with a ``root`` rule): a
    JSON answer or a tool call, when a request both offers tools and asks for a JSON
    ``response_format``. Each grammar's rules are renamed apart, references included (a recursive
    schema refers to its ``root``)."""
    ours, theirs = grammar_rules(first), grammar_rules(second)
    left = unused_name({**ours, **theirs}, "either-first")
    prefix = unused_name({**ours, left: ""}, "either-second")
    names_ours = {"root": left}
    names_theirs = {name: f"{prefix}-{name}" for name in theirs}
    rules = {names_ours.get(name, name): renamed(body, names_ours) for name, body in ours.items()}
    rules.update({names_theirs[name]: renamed(body, names_theirs) for name, body in theirs.items()})
    rules["root"] = f"{left} | {names_theirs['root']}"
    return grammar_text(rules)


def trigger_patterns(syntax: ToolSyntax, reasoning: ReasoningMarkers | None, in_reasoning: bool) -> tuple[str, ...]:
    """Where a lazy call grammar (``tool_choice`` ``auto``) takes over: the family's call marker,
    as regular expressions over the whole output whose first group starts the call.

    The model writes freely until it starts a call; from the marker on, the call must be valid.
    A marker inside a thought does not count: when the template has thinking markers, a thought
    that opens the answer (or the one the prompt left open) must have ended first.
    """
    import re

    if syntax.name == "harmony":
        return harmony_grammar.trigger()
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
