"""The shapes one tool call takes in model output, whatever family's markers surround it.

A call is a JSON object with a name and arguments under one of the keys models use (maybe wrapped
as OpenAI's ``{"type": "function", "function": …}``), a list of such objects, or Qwen3's XML
``<parameter>`` texts typed by the tool's schema (``is_text``: raw text or JSON, as the call
grammar writes them). Both readers of calls share these: each family's whole-text parser
(``call_parsers.py``) and the streaming reader (``call_reader.py``), so a call streamed and the
same call read whole end up with the same name and arguments.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import unquote

from . import jsontext
from .types import ToolCall

Schemas = Mapping[str, Any]  # tool name -> its parameters JSON schema
Parsed = tuple[list[ToolCall], str]


def json_at(text: str, start: int = 0) -> tuple[Any, int] | None:
    """The JSON value at ``text[start:]`` (after whitespace) and the index after it."""
    try:
        return jsontext.DECODER.raw_decode(text, _past_space(text, start))
    except ValueError:
        return None


CALL_KEYS = ("name", "tool_name", "arguments", "parameters", "function", "type", "id", "tool_calls", "tool_call")
"""The keys a call object (or a wrapper of calls) may open with: a JSON answer opening with another is prose."""


def json_call_opening(text: str, names: Collection[str] = ()) -> str | None:
    """Whether ``text``, an answer opening with ``{`` or ``[``, opens a JSON call: "call", "wait"
    (too little of it to tell), or None (it cannot: ``[1] Paris``, ``{{``, ``{"answer": …``).
    One opening with a name must name one of ``names`` (the offered functions, when given): a JSON
    answer of the buyer's own schema may open with ``{"name": …`` too."""
    index = _past_space(text, 0)
    found = _string_after(text, index + 1 if text.startswith("[", index) else index, "{")
    if not isinstance(found, tuple):
        return found
    key, ended, index = found
    if not ended:
        return "wait" if any(k.startswith(key) for k in CALL_KEYS) else None
    if key not in ("name", "tool_name") or not names:
        return "call" if key in CALL_KEYS else None
    found = _string_after(text, index, ":")
    if not isinstance(found, tuple):
        return found
    name, ended, _ = found
    if not ended:
        return "wait" if any(n.startswith(name) for n in names) else None
    return "call" if name in names else None


def _string_after(text: str, index: int, opening: str) -> tuple[str, bool, int] | str | None:
    """Past spaces, ``opening``, spaces and a quote: the string so far, whether it ended, and where
    its end leaves off; "wait" when the text ends before the string, None when another character stands."""
    for expected in (opening, '"'):
        index = _past_space(text, index)
        if index == len(text):
            return "wait"
        if text[index] != expected:
            return None
        index += 1
    end = text.find('"', index)
    return (text[index:], False, len(text)) if end < 0 else (text[index:end], True, end + 1)


def offered(calls: list[ToolCall], schemas: Schemas) -> list[ToolCall] | None:
    """The calls that name an offered function, or None when none does: a bare JSON object naming
    another is no call (an answer held to the buyer's own schema, ``{"name": "Ada", "age": 36}``),
    and one such among calls is left out, not the others with it."""
    kept = [call for call in calls if not schemas or call.name in schemas]
    return kept or None


def _past_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def call_from_object(value: Any, schemas: Schemas, id_style: str = "openai") -> ToolCall | None:
    """A call from one of the JSON shapes models use: name + arguments/parameters, maybe wrapped."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        return call_from_object(value["function"], schemas, id_style)
    name = value.get("name", value.get("tool_name"))
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall.of(name, arguments, value.get("id"), id_style)


def calls_from_list(values: Any, schemas: Schemas, id_style: str = "openai") -> list[ToolCall] | None:
    if isinstance(values, dict):
        values = [values]
    if not isinstance(values, list) or not values:
        return None
    calls = [call_from_object(v, schemas, id_style) for v in values]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def xml_value(raw: str, schema: Any) -> Any:
    """A ``<parameter>`` value: the text itself for a text parameter (``is_text``), else JSON when
    it parses. The call grammar (``forced.py``) writes each parameter the same way."""
    if is_text(schema):
        return raw
    try:
        return jsontext.loads(raw)
    except (ValueError, RecursionError):
        return raw


def is_text(schema: Any) -> bool:
    """Whether an XML parameter of this schema (its ``$ref`` resolved) is written as raw text: a
    ``string``, or an ``enum``/``const`` of strings only. Anything else is written as JSON."""
    if not isinstance(schema, Mapping):
        return False
    if "type" in schema:
        return schema["type"] == "string"
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    return isinstance(values, list) and bool(values) and all(isinstance(v, str) for v in values)


def parameter_members(schema: Any) -> dict[str, Any]:
    """A tool's parameters (name -> schema) as its call grammar writes them: ``properties`` but a
    ``false`` one, then each ``required`` name they do not list, with ``additionalProperties``'s
    schema (or any value)."""
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    members = {k: v for k, v in properties.items() if v is not False} if isinstance(properties, Mapping) else {}
    required = schema.get("required") if isinstance(schema, Mapping) else None
    extra = schema.get("additionalProperties") if isinstance(schema, Mapping) else None
    for name in required if isinstance(required, list) else ():
        if isinstance(name, str) and name not in members:
            members[name] = extra if isinstance(extra, Mapping) else {}
    return members


def parameter_schemas(schema: Any) -> Mapping[str, Any]:
    """A tool's parameters (``parameter_members``), each with its ``$ref`` resolved within the
    tool's schema; empty for what is not an object there."""
    return {key: resolve_ref(value, schema) for key, value in parameter_members(schema).items()}


def resolve_ref(schema: Any, root: Any) -> Any:
    """``schema``, or where its local ``$ref`` (``#/$defs/Name``, also behind a base URL) points in
    ``root``; unchanged when the ref leads nowhere."""
    for _ in range(32):
        ref = schema.get("$ref") if isinstance(schema, Mapping) else None
        if not isinstance(ref, str) or "#" not in ref:
            return schema
        target = root
        for step in ref.partition("#")[2].split("/")[1:]:
            step = unquote(step).replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and step in target:
                target = target[step]
            elif isinstance(target, list) and step.isdigit() and int(step) < len(target):
                target = target[int(step)]
            else:
                return schema
        schema = target
    return schema
