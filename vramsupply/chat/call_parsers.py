"""Each family's whole-text tool-call parser: a finished call section to calls plus the text after.

The streaming reader (``calls.py``) hands these what it did not stream: the families it has no
layout for (DeepSeek, Command R7B, Functionary, generic), call shapes it does not read as they
come (Llama's ``<|python_tag|>`` code, arguments before the name), and a call that broke before it
was announced. Each keeps the contract ``ToolSyntax.parse`` declares (``syntaxes.py``): ``None``
for a section that is no well-formed call, which the caller keeps as content, so a malformed call
is text, never a 500.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

from .call_shapes import Parsed, Schemas, call_from_object, calls_from_list, json_at, offered, parameter_schemas, xml_value
from .types import ToolCall


# ---- hermes and qwen3-xml: <tool_call>…</tool_call> blocks -------------------------------------

_FUNCTION_XML = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
_PARAMETER_XML = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


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
            found = json_at(inner)
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
        found = json_at(text, index)
        if found is None:
            break
        value, index = found
        more = calls_from_list(value, schemas, id_style)
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
    parsed = _json_calls(stripped, schemas)
    calls = offered(parsed[0], schemas) if parsed is not None else None  # bare JSON: a call names a tool
    return (calls, parsed[1]) if parsed is not None and calls is not None else None


# ---- mistral ----------------------------------------------------------------------------------

_MISTRAL_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]")


def parse_mistral(section: str, schemas: Schemas) -> Parsed | None:
    calls: list[ToolCall] = []
    rest = section
    while rest.lstrip().startswith("[TOOL_CALLS]"):
        rest = rest.lstrip()[len("[TOOL_CALLS]") :]
        if rest.lstrip().startswith(("[", "{")):
            found = json_at(rest)
            more = None if found is None else calls_from_list(found[0], schemas, "mistral")
            if more is None:
                return None
            calls.extend(more)
            rest = rest[found[1] :]
            continue
        while (match := _MISTRAL_NAMED.match(rest)) is not None:  # [TOOL_CALLS]a[ARGS]{…}b[ARGS]{…}
            found = json_at(rest, match.end())
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


def json_list_syntax(start: str, end: str | None) -> Callable[[str, Schemas], Parsed | None]:
    """Families writing ``START [call, …] END`` with JSON call objects."""

    def parse(section: str, schemas: Schemas) -> Parsed | None:
        inside = _between(section, start, end)
        if inside is None:
            return None
        body, after = inside
        found = json_at(body)
        if found is None or body[found[1] :].strip():
            return None
        calls = calls_from_list(found[0], schemas)
        return (calls, after) if calls else None

    return parse


_FUNCTIONARY = re.compile(r"\s*<function=([^>]+)>")


def parse_functionary(section: str, schemas: Schemas) -> Parsed | None:
    calls: list[ToolCall] = []
    rest = section
    while (match := _FUNCTIONARY.match(rest)) is not None:
        found = json_at(rest, match.end())
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
    found = json_at(section)
    if found is None or section[found[1] :].strip():
        return None
    value = found[0]
    if isinstance(value, dict) and ("tool_calls" in value or "tool_call" in value):
        value = value.get("tool_calls", value.get("tool_call"))
    calls = offered(calls_from_list(value, schemas) or [], schemas)
    return (calls, "") if calls else None
