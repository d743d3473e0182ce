"""How each model family writes tool calls, and how to read them back.

Every family is a ``ToolSyntax``: how to recognise it in the chat template's text, where a call
starts in the output, how to parse the call section, and which marker texts are single special
tokens the engine must render (llama.cpp calls these "preserved tokens"; normally a control token
renders as nothing). The families are those common in current GGUFs, as llama.cpp's
``common/chat`` recognises them:

=============  ==================================================================================
hermes         ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` (Hermes 2/3, Qwen 2.5/3)
qwen3-xml      ``<tool_call><function=NAME><parameter=K>V</parameter></function></tool_call>``
               (Qwen3-Coder, Qwen3.5)
llama3         ``{"name": …, "parameters": {…}}`` and ``<|python_tag|>tool.call(k=v)`` (Llama 3.x)
mistral        ``[TOOL_CALLS][{"name": …, "arguments": {…}}]`` (Mistral Nemo, Small 3)
mistral-args   ``[TOOL_CALLS]NAME[ARGS]{…}`` (Magistral, Devstral; either form is read)
deepseek       ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` + JSON
command-r7b    ``<|START_ACTION|>[{"tool_name": …, "parameters": {…}}]<|END_ACTION|>``
granite        ``<|tool_call|>[{"name": …, "arguments": {…}}]`` (Granite, Phi-4-mini)
firefunction   `` functools[{"name": …, "arguments": {…}}]``
functionary    ``<function=NAME>{…}</function>`` (Functionary v3.1 on Llama 3.1)
generic        a bare JSON call object, for a template that describes tools in no known syntax
=============  ==================================================================================

A parser returns the calls plus any text after them, or ``None`` when the section is not a
well-formed call: the caller then keeps it as plain content (a malformed call is text, not a 500).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import jsontext
from .types import ToolCall

Schemas = Mapping[str, Any]  # tool name -> its parameters JSON schema
Parsed = tuple[list[ToolCall], str]



@dataclass(frozen=True)
class ToolSyntax:
    """One family's tool-call syntax."""

    name: str
    detect: Callable[[str], bool]
    parse: Callable[[str, Schemas], Parsed | None]
    # Text that opens a call section anywhere in the output ...
    starts: tuple[str, ...] = ()
    # ... or only at the very start of the answer (after whitespace), like Llama 3's bare JSON.
    leading: tuple[str, ...] = ()
    # Marker texts that may be single special tokens the engine must render as text.
    preserved: tuple[str, ...] = ()
    id_style: str = "openai"
    parallel: bool = True


# ---- small helpers ------------------------------------------------------------------------------


def _json_at(text: str, start: int = 0) -> tuple[Any, int] | None:
    """The JSON value at ``text[start:]`` (after whitespace) and the index after it."""
    index = start
    while index < len(text) and text[index].isspace():
        index += 1
    try:
        return jsontext.DECODER.raw_decode(text, index)
    except ValueError:
        return None


def call_from_object(value: Any, schemas: Schemas, id_style: str = "openai") -> ToolCall | None:
    """A call from one of the JSON shapes models use: name + arguments/parameters, maybe wrapped."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        return call_from_object(value["function"], schemas, id_style)
    name = value.get("name", value.get("tool_name"))
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall.of(name, arguments, value.get("id"), id_style)


def _calls_from_list(values: Any, schemas: Schemas, id_style: str = "openai") -> list[ToolCall] | None:
    if isinstance(values, dict):
        values = [values]
    if not isinstance(values, list) or not values:
        return None
    calls = [call_from_object(v, schemas, id_style) for v in values]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def _has(*needles: str) -> Callable[[str], bool]:
    return lambda source: all(n in source for n in needles)


# ---- hermes and qwen3-xml: <tool_call>…</tool_call> blocks -------------------------------------

_FUNCTION_XML = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
_PARAMETER_XML = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def xml_value(raw: str, schema: Any) -> Any:
    """A ``<parameter>`` value: the text itself for a string parameter, else JSON when it parses."""
    declared = schema.get("type") if isinstance(schema, dict) else None
    if declared == "string":
        return raw
    try:
        return jsontext.loads(raw)
    except (ValueError, RecursionError):
        return raw


def parameter_schemas(schema: Any) -> Mapping[str, Any]:
    """A tool's ``properties`` (parameter name -> schema); empty for what is not an object there."""
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    return properties if isinstance(properties, Mapping) else {}


def _xml_call(inner: str, schemas: Schemas) -> ToolCall | None:
    match = _FUNCTION_XML.match(inner)
    if match is None:
        return None
    name, body = match.group(1).strip(), match.group(2)
    properties = parameter_schemas(schemas.get(name))
    arguments = {}
    for key, raw in _PARAMETER_XML.findall(body):
        arguments[key.strip()] = xml_value(raw, properties.get(key.strip()))
    if _PARAMETER_XML.sub("", body).strip():
        return None  # text between parameters: not a call we understand
    return ToolCall.of(name, arguments)


def parse_tool_call_blocks(section: str, schemas: Schemas) -> Parsed | None:
    """``<tool_call>`` blocks holding either a JSON call or Qwen3's XML ``<function=…>`` call."""
    calls: list[ToolCall] = []
    rest = section
    while rest.lstrip().startswith("<tool_call>"):
        body = rest.lstrip()[len("<tool_call>") :]
        end = body.find("</tool_call>")
        inner, rest = (body, "") if end < 0 else (body[:end], body[end + len("</tool_call>") :])
        if inner.lstrip().startswith("<function="):
            call = _xml_call(inner, schemas)
        else:
            found = _json_at(inner)
            call = None if found is None or inner[found[1] :].strip() else call_from_object(found[0], schemas)
        if call is None:
            return None
        calls.append(call)
    return (calls, rest) if calls else None


# ---- llama3: bare JSON, or <|python_tag|> with JSON or a builtin tool's python call --------------


def _python_call(code: str) -> ToolCall | None:
    """``brave_search.call(query="…")`` → a call of ``brave_search``; anything else is code for ``python``."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return ToolCall.of("python", {"code": code.strip()})
    call = tree.body
    if (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "call"
        and isinstance(call.func.value, ast.Name)
        and not call.args
    ):
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
        return ToolCall.of(call.func.value.id, arguments)
    return ToolCall.of("python", {"code": code.strip()})


def _json_calls(text: str, schemas: Schemas, id_style: str = "openai") -> Parsed | None:
    """One or more JSON calls (objects, or one array), separated by ``;`` or ``,``; text may follow."""
    calls: list[ToolCall] = []
    index = 0
    while True:
        found = _json_at(text, index)
        if found is None:
            break
        value, index = found
        more = _calls_from_list(value, schemas, id_style)
        if more is None:
            return None
        calls.extend(more)
        after = text[index:].lstrip()
        if not after.startswith((";", ",")):
            break
        index = len(text) - len(after) + 1
    return (calls, text[index:]) if calls else None


def parse_llama3(section: str, schemas: Schemas) -> Parsed | None:
    stripped = section.lstrip()
    if stripped.startswith("<|python_tag|>"):
        body = stripped[len("<|python_tag|>") :]
        if body.lstrip().startswith(("{", "[")):
            return _json_calls(body, schemas)
        if not body.strip():
            return None
        call = _python_call(body)
        return ([call], "") if call is not None else None
    return _json_calls(stripped, schemas)


# ---- mistral ----------------------------------------------------------------------------------

_MISTRAL_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]")


def parse_mistral(section: str, schemas: Schemas) -> Parsed | None:
    calls: list[ToolCall] = []
    rest = section
    while rest.lstrip().startswith("[TOOL_CALLS]"):
        rest = rest.lstrip()[len("[TOOL_CALLS]") :]
        if rest.lstrip().startswith(("[", "{")):
            found = _json_at(rest)
            more = None if found is None else _calls_from_list(found[0], schemas, "mistral")
            if more is None:
                return None
            calls.extend(more)
            rest = rest[found[1] :]
            continue
        while (match := _MISTRAL_NAMED.match(rest)) is not None:  # [TOOL_CALLS]a[ARGS]{…}b[ARGS]{…}
            found = _json_at(rest, match.end())
            call = None if found is None else ToolCall.of(match.group(1), found[0], match.group(2), "mistral")
            if call is None:
                return None
            calls.append(call)
            rest = rest[found[1] :]
        if not calls:
            return None
    return (calls, rest) if calls else None


# ---- the other families ------------------------------------------------------------------------

_DEEPSEEK_CALL = re.compile(
    r"\s*<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>([^\n]+)\n```(?:json)?\n(.*?)\n```"
    r"|([^<\n]+?)<｜tool▁sep｜>(.*?))\s*<｜tool▁call▁end｜>",
    re.DOTALL,
)


def parse_deepseek(section: str, schemas: Schemas) -> Parsed | None:
    rest = section.lstrip()[len("<｜tool▁calls▁begin｜>") :]
    calls: list[ToolCall] = []
    while (match := _DEEPSEEK_CALL.match(rest)) is not None:
        name = match.group(1) or match.group(3)
        call = ToolCall.of(name, match.group(2) if match.group(1) else match.group(4))
        if call is None:
            return None
        calls.append(call)
        rest = rest[match.end() :]
    rest = rest.lstrip()
    if not calls or (rest and not rest.startswith("<｜tool▁calls▁end｜>")):
        return None
    return calls, rest[len("<｜tool▁calls▁end｜>") :]


def _between(section: str, start: str, end: str | None) -> tuple[str, str] | None:
    body = section.lstrip()[len(start) :]
    if end is None:
        return body, ""
    stop = body.find(end)
    return (body, "") if stop < 0 else (body[:stop], body[stop + len(end) :])


def _json_list_syntax(start: str, end: str | None) -> Callable[[str, Schemas], Parsed | None]:
    """Families writing ``START [call, …] END`` with JSON call objects."""

    def parse(section: str, schemas: Schemas) -> Parsed | None:
        inside = _between(section, start, end)
        if inside is None:
            return None
        body, after = inside
        found = _json_at(body)
        if found is None or body[found[1] :].strip():
            return None
        calls = _calls_from_list(found[0], schemas)
        return (calls, after) if calls else None

    return parse


_FUNCTIONARY = re.compile(r"\s*<function=([^>]+)>")


def parse_functionary(section: str, schemas: Schemas) -> Parsed | None:
    calls: list[ToolCall] = []
    rest = section
    while (match := _FUNCTIONARY.match(rest)) is not None:
        found = _json_at(rest, match.end())
        if found is None or not rest[found[1] :].lstrip().startswith("</function>"):
            return None
        call = ToolCall.of(match.group(1), found[0])
        if call is None:
            return None
        calls.append(call)
        rest = rest[found[1] :].lstrip()[len("</function>") :]
    return (calls, rest) if calls else None


def parse_generic(section: str, schemas: Schemas) -> Parsed | None:
    """A bare call object, a list of them, or ``{"tool_calls": [...]}`` / ``{"tool_call": {...}}``."""
    found = _json_at(section)
    if found is None or section[found[1] :].strip():
        return None
    value = found[0]
    if isinstance(value, dict) and ("tool_calls" in value or "tool_call" in value):
        value = value.get("tool_calls", value.get("tool_call"))
    calls = _calls_from_list(value, schemas)
    return (calls, "") if calls else None


SYNTAXES: tuple[ToolSyntax, ...] = (
    ToolSyntax(
        "deepseek",
        _has("<｜tool▁calls▁begin｜>"),
        parse_deepseek,
        starts=("<｜tool▁calls▁begin｜>",),
        preserved=("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"),
    ),
    ToolSyntax(
        "command-r7b",
        _has("<|START_ACTION|>"),
        _json_list_syntax("<|START_ACTION|>", "<|END_ACTION|>"),
        starts=("<|START_ACTION|>",),
        preserved=("<|START_ACTION|>", "<|END_ACTION|>"),
    ),
    ToolSyntax(
        "qwen3-xml",
        _has("<tool_call>", "<function=", "<parameter="),
        parse_tool_call_blocks,
        starts=("<tool_call>",),
        preserved=("<tool_call>", "</tool_call>"),
    ),
    ToolSyntax(
        "hermes",
        _has("<tool_call>"),
        parse_tool_call_blocks,
        starts=("<tool_call>",),
        preserved=("<tool_call>", "</tool_call>"),
    ),
    ToolSyntax(
        "functionary",
        lambda s: "<|start_header_id|>" in s and "<function=" in s,
        parse_functionary,
        starts=("<function=",),
    ),
    ToolSyntax(
        "llama3",
        lambda s: "<|start_header_id|>" in s and ("ipython" in s or "<|python_tag|>" in s),
        parse_llama3,
        starts=("<|python_tag|>",),
        leading=("{", "["),
        preserved=("<|python_tag|>",),
        parallel=False,
    ),
    ToolSyntax(
        "mistral-args",
        _has("[TOOL_CALLS]", "[ARGS]"),
        parse_mistral,
        starts=("[TOOL_CALLS]",),
        preserved=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
        id_style="mistral",
    ),
    ToolSyntax(
        "mistral",
        _has("[TOOL_CALLS]"),
        parse_mistral,
        starts=("[TOOL_CALLS]",),
        preserved=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
        id_style="mistral",
    ),
    ToolSyntax(
        "granite",
        _has("<|tool_call|>"),
        _json_list_syntax("<|tool_call|>", "<|/tool_call|>"),
        starts=("<|tool_call|>",),
        preserved=("<|tool_call|>", "<|/tool_call|>"),
    ),
    ToolSyntax(
        "firefunction",
        _has(" functools["),
        _json_list_syntax("functools", None),
        starts=(" functools[", "functools["),
    ),
)

GENERIC = ToolSyntax("generic", lambda s: True, parse_generic, leading=("{", "["))


def syntax_for(template_source: str) -> ToolSyntax:
    """The first family whose markers the template writes; ``generic`` when none does."""
    return next((s for s in SYNTAXES if s.detect(template_source)), GENERIC)
