"""Stream chunks of plain text, serialized once per request and filled per token.

At one stream, every token is one chunk, and all of a request's text chunks differ only in their
text: the id, model, creation time, choice index and nulls are the same each time. Building a
pydantic model and serializing it per token was a quarter of the time the event loop holds the
GIL per token (py-spy ``--gil``, one stream of the bench model), time the scheduler thread can
spend waiting for the GIL after each decode before it can start the next.

A ``ChunkTemplate`` serializes the shape's own chunk once, with a marker where the text goes, and
keeps the bytes before and after it. A chunk is then those bytes around the text encoded as a JSON
string by orjson, already framed as an SSE event. The template comes from the same model, so the
bytes equal that model's own serialization (tested against it, escapes included).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import orjson

_MARKER = "vramsupply-chunk-text-4f1c9b"


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying ``data`` (a JSON document, so it has no newline)."""
    return b"data: " + data + b"\n\n"


class ChunkTemplate:
    """The SSE event of one chunk shape with its text left open."""

    def __init__(self, render: Callable[[str], str]) -> None:
        """``render(text)`` serializes the chunk carrying ``text``: it is called once, with a marker."""
        document = render(_MARKER)
        quoted = json.dumps(_MARKER)
        if document.count(quoted) != 1:
            raise ValueError("a chunk template needs exactly one text field")
        before, after = document.split(quoted)
        self._before = b"data: " + before.encode()
        self._after = after.encode() + b"\n\n"

    def event(self, text: str) -> bytes:
        return self._before + orjson.dumps(text) + self._after
