"""The shapes one tool call takes in model output, whatever family's markers surround it.

A call is a JSON object with a name and arguments under one of the keys models use (maybe wrapped
as OpenAI's ``{"type": "function", "function": …}``), a list of such objects, or Qwen3's XML
``<parameter>`` texts typed by the tool's schema. Both readers of calls share these: each family's
whole-text parser (``call_parsers.py``) and the streaming reader (``call_reader.py``), so a call
streamed and the same call read whole end up with the same name and arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import jsontext
from .types import ToolCall

Schemas = Mapping[str, Any]  # tool name -> its parameters JSON schema
Parsed = tuple[list[ToolCall], str]


def json_at(text: str, start: int = 0) -> tuple[Any, int] | None:
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


def calls_from_list(values: Any, schemas: Schemas, id_style: str = "openai") -> list[ToolCall] | None:
    if isinstance(values, dict):
        values = [values]
    if not isinstance(values, list) or not values:
        return None
    calls = [call_from_object(v, schemas, id_style) for v in values]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


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
