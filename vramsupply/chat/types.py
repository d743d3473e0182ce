"""What parsed output is made of: text pieces, and tool calls in the shape of OpenAI's ``message.tool_calls``."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from . import jsontext

_ALPHANUMERIC = string.ascii_letters + string.digits


def new_call_id(style: str = "openai") -> str:
    """``call_…`` like OpenAI's; Mistral templates insist on exactly nine letters and digits."""
    if style == "mistral":
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; ``arguments`` is a JSON object encoded as a string."""

    name: str
    arguments: str
    id: str

    @classmethod
    def of(cls, name: Any, arguments: Any, call_id: Any = None, id_style: str = "openai") -> ToolCall | None:
        """A call from parsed pieces, or None when they do not make one (a malformed call stays text).

        ``arguments`` may be a dict or a JSON string holding an object, as models write both; they
        must be JSON every parser reads (``jsontext``).
        """
        name = jsontext.usable_name(name)
        if name is None:
            return None
        try:
            if isinstance(arguments, str):
                arguments = jsontext.loads(arguments) if arguments.strip() else {}
            if arguments is None:
                arguments = {}
            if not isinstance(arguments, dict):
                return None
            text = jsontext.dumps(arguments)  # ValueError: a NaN or an infinity, as Python's literals read them
        except (ValueError, RecursionError):
            return None
        if not isinstance(call_id, str) or not call_id or jsontext.usable_name(call_id) is None:
            call_id = new_call_id(id_style)
        return cls(name, text, call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Piece:
    """One unit of parsed output: a text delta of reasoning or content, a tool call announced (its
    ``arguments`` still empty), or a fragment of the arguments of the call announced last.

    ``upto``: how far into the text pushed, in characters, the parser had read once it gave the
    piece (the markers and spaces it dropped on the way included): the tokens whose text ends
    there or before brought it, which is where a stream puts their logprobs."""

    kind: Literal["reasoning", "content", "tool_call", "arguments"]
    text: str = ""
    call: ToolCall | None = None
    upto: int | None = field(default=None, compare=False)
