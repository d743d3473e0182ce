"""OpenAI chat messages checked and normalised once, into the dicts chat templates read.

The server only checks that ``messages`` is a list of objects; everything about their content is
decided here, so the HTTP route and any other caller get the same rules and the same errors.
Every field a message may carry is either passed to the template or refused: nothing is silently
dropped. Tool-call arguments arrive as JSON strings (OpenAI's wire format) but templates expect
objects (they write them with ``tojson``), so they are decoded here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
# OpenAI's newer name for the system role; templates only know "system".
ROLE_ALIASES = {"developer": "system"}
# Fields passed on to the template, by role; any other field with a value is refused.
_FIELDS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "reasoning_content", "refusal"},
    "tool": {"role", "content", "name", "tool_call_id"},
}


class MessageError(ValueError):
    """A message the template cannot be given; ``param`` names it the way the client wrote it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and flatten text-part lists, so templates see plain strings."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages", "messages must be a non-empty list")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise MessageError(where, f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        allowed = ", ".join(sorted(ROLES | set(ROLE_ALIASES)))
        raise MessageError(f"{where}.role", f"{where}.role must be one of {allowed}, got {role!r}")
    for key, value in message.items():
        if key not in _FIELDS[role] and value is not None:
            raise MessageError(f"{where}.{key}", f"{where}.{key} is not supported in a {role} message by this server")
    normalized: dict[str, Any] = {k: v for k, v in message.items() if v is not None}
    normalized["role"] = role
    tool_calls = message.get("tool_calls")
    if role == "assistant" and tool_calls:
        normalized["tool_calls"] = [_tool_call(f"{where}.tool_calls[{i}]", c) for i, c in enumerate(_list(where, tool_calls))]
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    normalized["content"] = _content_text(where, content)
    for key in ("name", "tool_call_id", "reasoning_content"):
        if key in normalized and not isinstance(normalized[key], str):
            raise MessageError(f"{where}.{key}", f"{where}.{key} must be a string")
    if message.get("refusal") is not None:
        raise MessageError(f"{where}.refusal", f"{where}.refusal is not supported in history by this server; send it as content")
    return normalized


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise MessageError(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
    return value


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    """``{"id", "type": "function", "function": {"name", "arguments": "<json>"}}`` with arguments decoded."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise MessageError(where, f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    if call.get("type", "function") != "function":
        raise MessageError(f"{where}.type", f"{where}.type must be 'function'")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise MessageError(f"{where}.function.arguments", f"{where}.function.arguments must be a JSON object") from None
    if not isinstance(arguments, Mapping):
        raise MessageError(f"{where}.function.arguments", f"{where}.function.arguments must be a JSON object")
    normalized = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if isinstance(call.get("id"), str):
        normalized["id"] = call["id"]
    return normalized


def _content_text(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError(f"{where}.content", f"{where}.content must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else None
            why = f"content parts of type {kind!r} are not supported: this model reads text only" if isinstance(kind, str) and kind != "text" else "must be a text part {'type': 'text', 'text': '...'}"
            raise MessageError(f"{where}.content[{i}]", f"{where}.content[{i}] {why}")
        texts.append(part["text"])
    return "\n".join(texts)
