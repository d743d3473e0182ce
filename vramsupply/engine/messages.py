"""OpenAI chat messages checked and normalised once, into the dicts chat templates read.

The server only checks that ``messages`` is a list of objects; everything about their content is
decided here, so the HTTP route and any other caller get the same rules and the same errors.
Every field a message may carry is either passed to the template or refused: nothing is silently
dropped. Tool-call arguments arrive as JSON strings (OpenAI's wire format) but templates expect
objects (they write them with ``tojson``), so they are decoded here. Arguments that are no JSON
object (a call ``max_tokens`` cut, as this server itself returns one, which agents send back)
stay the text they are: OpenAI takes any string there, and templates write a string too (for a
template that can only show an object, ``arguments_as_objects`` keeps a cut object's whole members).

``check_tool_results`` holds a history's tool results to OpenAI's rules (each names, with
``tool_call_id``, a call an earlier assistant message made); ``with_short_call_ids`` gives the
calls of a history the nine-character ids Mistral's templates insist on; ``one_call_a_message``
lays parallel calls out one after another, with their results, for gpt-oss's template, which
shows one call a message.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
# OpenAI's newer name for the system role; templates only know "system".
ROLE_ALIASES = {"developer": "system"}
# Fields passed on to the template, by role; any other field with a value is refused.
_FIELDS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "reasoning_content", "reasoning", "refusal"},
    "tool": {"role", "content", "name", "tool_call_id"},
}
# Fields taken and dropped, by role: ``annotations`` (url citations) is in every message OpenAI
# returns, ``[]`` mostly, and agents append those messages to the history as they came; so is
# OpenRouter's ``reasoning_details`` (its thought in parts, beside ``reasoning``, which is kept).
_DROPPED = {"assistant": {"annotations", "reasoning_details"}}


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
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role  # a list or object is no key
    if not isinstance(role, str) or role not in ROLES:
        allowed = ", ".join(sorted(ROLES | set(ROLE_ALIASES)))
        raise MessageError(f"{where}.role", f"{where}.role must be one of {allowed}, got {role!r}")
    dropped = _DROPPED.get(role, set())
    for key, value in message.items():
        if key in dropped and not isinstance(value, (list, type(None))):
            raise MessageError(f"{where}.{key}", f"{where}.{key} must be a list")
        if key not in _FIELDS[role] | dropped and value is not None:
            article = "an" if role == "assistant" else "a"
            raise MessageError(f"{where}.{key}", f"{where}.{key} is not supported in {article} {role} message by this server")
    normalized: dict[str, Any] = {k: v for k, v in message.items() if v is not None and k not in dropped}
    normalized["role"] = role
    tool_calls = message.get("tool_calls")
    if role == "assistant" and tool_calls:
        normalized["tool_calls"] = [_tool_call(f"{where}.tool_calls[{i}]", c) for i, c in enumerate(_list(where, tool_calls))]
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    normalized["content"] = _content_text(where, content)
    for key in ("name", "tool_call_id", "reasoning_content", "reasoning"):
        if key in normalized and not isinstance(normalized[key], str):
            raise MessageError(f"{where}.{key}", f"{where}.{key} must be a string")
    if "reasoning" in normalized:  # the thought under the name newer vLLM and OpenRouter return it by
        reasoning = normalized.pop("reasoning")
        normalized.setdefault("reasoning_content", reasoning)
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
    normalized = {"type": "function", "function": {"name": function["name"], "arguments": _arguments(where, function)}}
    if isinstance(call.get("id"), str):
        normalized["id"] = call["id"]
    return normalized


def _arguments(where: str, function: Mapping[str, Any]) -> dict[str, Any] | str:
    """A call's arguments for the template: the object a JSON-object string holds, else the string
    itself (cut or invalid JSON, which OpenAI accepts too); an object sent as is stays one."""
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise MessageError(f"{where}.function.arguments", f"{where}.function.arguments must be a string (the call's arguments as JSON)")
    if not arguments.strip():
        return {}
    try:
        decoded = json.loads(arguments)
    except ValueError:
        return arguments
    return dict(decoded) if isinstance(decoded, Mapping) else arguments


def arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for a template that can only show a call's arguments as an object: text that
    begins one (a call cut by ``max_tokens``, as this server returns it) shows its complete
    members; other text is refused, naming the call."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        if any(isinstance(c["function"]["arguments"], str) for c in calls):
            message = {**message, "tool_calls": [_object_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(calls)]}
        out.append(message)
    return out


def _object_call(where: str, call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    if not isinstance(arguments, str):
        return call
    members = _complete_members(arguments)
    if members is None:
        param = f"{where}.function.arguments"
        raise MessageError(param, f"{param} is not a JSON object, and this model's chat template can only show a call's arguments as one")
    return {**call, "function": {**call["function"], "arguments": members}}


def _complete_members(text: str) -> dict[str, Any] | None:
    """The members written whole in text that opens a JSON object, or None if it opens none."""
    decoder, members = json.JSONDecoder(), {}
    at = len(text) - len(text.lstrip())
    if not text.startswith("{", at):
        return None
    at += 1
    try:
        while True:
            key, at = decoder.raw_decode(text, _skip(text, at))
            if not isinstance(key, str) or not text.startswith(":", at := _skip(text, at)):
                return members
            value, at = decoder.raw_decode(text, _skip(text, at + 1))
            members[key] = value
            at = _skip(text, at)
            if not text.startswith(",", at):
                return members
            at += 1
    except ValueError:
        return members


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\n\r":
        at += 1
    return at


def with_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for gpt-oss's template, which reads an assistant's thought as ``thinking``
    (OpenAI-compatible servers return it as ``reasoning_content``) and takes a ``tool_calls`` key
    for calls, even an empty list. Beside calls it shows a thought or a preamble, never both:
    the thought is kept, the preamble (``content``) left out."""
    out = []
    for message in messages:
        if message.get("role") == "assistant":
            message = {k: v for k, v in message.items() if k != "tool_calls" or v}
            if message.get("reasoning_content"):
                message["thinking"] = message["reasoning_content"]
                if message.get("tool_calls"):
                    message["content"] = ""
        out.append(message)
    return out


def one_call_a_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for gpt-oss's template, which shows only an assistant message's first call
    (``tool_calls[0]``) and names every tool result after it by the last call it showed. An
    assistant message with several calls (another model's parallel calls, which agents send back)
    becomes one message a call, each followed by its results (matched by ``tool_call_id``), as
    gpt-oss makes calls: one a generation, its result, the next. The first keeps the thought or
    the preamble; results that answer none of the calls follow the last, in their order."""
    out: list[dict[str, Any]] = []
    at = 0
    while at < len(messages):
        message = messages[at]
        calls = (message.get("tool_calls") or []) if message["role"] == "assistant" else []
        end = at + 1
        while len(calls) > 1 and end < len(messages) and messages[end]["role"] == "tool":
            end += 1
        out.extend(_call_by_call(message, calls, messages[at + 1 : end]) if len(calls) > 1 else [message])
        at = end
    return out


def _call_by_call(message: dict[str, Any], calls: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    left = list(results)
    out: list[dict[str, Any]] = []
    for n, call in enumerate(calls):
        out.append({**message, "tool_calls": [call]} if n == 0 else {"role": "assistant", "content": "", "tool_calls": [call]})
        answers = [r for r in left if "id" in call and r.get("tool_call_id") == call["id"]]
        out.extend(answers)
        left = [r for r in left if not any(r is a for a in answers)]
    return out + left


def system_in_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a template that refuses the system role (Gemma 2's raises "System role not supported"):
    each system message's text goes at the head of the next message if that is a user's, a blank
    line between, as Gemma 3's own template places it; before an assistant's message it goes at the
    end of the user message just before (an assistant's turn continued from its start, vLLM's
    ``continue_final_message``, keeps the instruction), or is a user turn of its own where there is
    none; after the last message it is a user turn of its own."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
            continue
        if pending:
            text = "\n\n".join(pending)
            pending = []
            if message["role"] == "user":
                message = {**message, "content": f"{text}\n\n{message['content']}"}
            elif out and out[-1]["role"] == "user":
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{text}"}
            else:
                out.append({"role": "user", "content": text})
        out.append(message)
    if pending:
        out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """OpenAI's rules for tool results: each has a ``tool_call_id``, naming a call an earlier
    assistant message made (templates would otherwise fail on it, or show the model a result of nothing)."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        calls.update(c["id"] for c in message.get("tool_calls") or () if "id" in c)
        if message["role"] != "tool":
            continue
        where = f"messages[{i}].tool_call_id"
        call_id = message.get("tool_call_id")
        if call_id is None:
            raise MessageError(where, f"{where} is required: the id of the tool call this message answers")
        if call_id not in calls:
            raise MessageError(where, f"{where} {call_id!r} answers no tool call of an earlier assistant message")


_NINE = re.compile(r"[A-Za-z0-9]{9}")
_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def with_short_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with every call id that is not nine letters and digits (OpenAI's ``call_…``)
    replaced by one that is, the same for a call and its result, and a call without an id given
    one. The new ids are hashes of the old, so a conversation renders the same on every turn."""
    ids = [c.get("id") for m in messages for c in m.get("tool_calls") or ()] + [m.get("tool_call_id") for m in messages]
    taken = {i for i in ids if isinstance(i, str) and _NINE.fullmatch(i)}
    mapping: dict[str, str] = {}
    for i in ids:
        if isinstance(i, str) and i not in taken and i not in mapping:
            mapping[i] = _fresh_id(i, taken)
    out = []
    for index, message in enumerate(messages):
        message = dict(message)
        if "tool_call_id" in message:
            message["tool_call_id"] = mapping.get(message["tool_call_id"], message["tool_call_id"])
        if message.get("tool_calls"):
            message["tool_calls"] = [_short_call(c, mapping, taken, f"{index}.{j}") for j, c in enumerate(message["tool_calls"])]
        out.append(message)
    return out


def _short_call(call: dict[str, Any], mapping: dict[str, str], taken: set[str], position: str) -> dict[str, Any]:
    if "id" in call:
        return {**call, "id": mapping.get(call["id"], call["id"])}
    return {**call, "id": _fresh_id(f"a call without an id, at {position}", taken)}


def _fresh_id(seed: str, taken: set[str]) -> str:
    """Nine letters and digits derived from ``seed``, none of ``taken`` (which it joins)."""
    attempt = 0
    while True:
        digest = int.from_bytes(hashlib.sha256(f"{attempt}:{seed}".encode("utf-8", "surrogatepass")).digest(), "big")
        candidate = "".join(_ALPHANUMERIC[(digest >> (6 * k)) % 62] for k in range(9))
        if candidate not in taken:
            taken.add(candidate)
            return candidate
        attempt += 1


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
