"""Server-sent events as an upstream writes them: whole events, bytes as they arrive.

The front forwards each event as soon as its blank line arrives; it never waits for the rest of
the stream. Lines may end in LF, CRLF or a lone CR (the SSE specification allows all three).
An event, or a line still waiting for its end, is bounded (``RelayLimits.max_event_bytes``): an
upstream that writes one endless line would otherwise grow our memory until it stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from vramsupply.upstream.limits import BadAnswer

DONE = "[DONE]"
LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(BadAnswer):
    """An SSE event (or one of its lines) past the size bound."""


class EventSplitter:
    """Bytes in, whole events out (their lines joined by LF, ending in LF)."""

    def __init__(self, max_event_bytes: int) -> None:
        self.limit = max_event_bytes
        self._pending = bytearray()
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        events: list[bytes] = []
        start = 0
        while (end := LINE_END.search(self._pending, start)) is not None:
            if end.group() == b"\r" and end.end() == len(self._pending):
                break  # perhaps the first half of a CRLF: wait for the next bytes
            event = self._line(bytes(self._pending[start : end.start()]))
            start = end.end()
            if event is not None:
                events.append(event)
        del self._pending[:start]
        self._check()
        return events

    def finish(self) -> list[bytes]:
        """What is left when the stream ends: a last event without its blank line still counts."""
        last = self._line(bytes(self._pending)) if self._pending.strip() else None
        self._pending.clear()
        rest = self._line(b"")
        return [event for event in (last, rest) if event is not None]

    def _line(self, line: bytes) -> bytes | None:
        if line.strip():
            self._lines.append(line)
            self._size += len(line) + 1
            self._check()
            return None
        if not self._lines:
            return None
        event = b"\n".join(self._lines) + b"\n"
        self._lines, self._size = [], 0
        return event

    def _check(self) -> None:
        if self._size + len(self._pending) > self.limit:
            raise EventTooLarge(f"it sent an event larger than {self.limit} bytes")


async def sse_events(stream: aiohttp.StreamReader, max_event_bytes: int) -> AsyncIterator[bytes]:
    """Whole events as they complete; EventTooLarge past the bound."""
    splitter = EventSplitter(max_event_bytes)
    while data := await stream.readany():
        for event in splitter.feed(data):
            yield event
    for event in splitter.finish():
        yield event


def event_data(event: bytes) -> str | None:
    """The ``data:`` payload of an event (multi-line data joined), None for comments and pings."""
    parts = [line[5:].lstrip() for line in event.decode("utf-8", "replace").split("\n") if line.startswith("data:")]
    return "\n".join(parts) if parts else None


def is_comment(event: bytes) -> bool:
    """A keep-alive (``: ping``): every line a comment."""
    return all(line.startswith(b":") for line in event.splitlines())


def parse_chunk(data: str) -> dict[str, Any] | None:
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def encode_event(chunk: dict[str, Any] | str) -> bytes:
    payload = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
