"""Server-sent events as an upstream writes them: whole events, bytes as they arrive.

The front forwards each event as soon as its blank line arrives; it never waits for the rest of
the stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

DONE = "[DONE]"


async def sse_events(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Whole events (lines up to a blank line); a last event without its blank line still counts."""
    lines: list[bytes] = []
    async for line in stream:
        if line.strip():
            lines.append(line)
            continue
        if lines:
            yield b"".join(lines)
            lines = []
    if lines:
        yield b"".join(lines)


def event_data(event: bytes) -> str | None:
    """The ``data:`` payload of an event (multi-line data joined), None for comments and pings."""
    parts = [line[5:].lstrip() for line in event.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
    return "\n".join(parts) if parts else None


def parse_chunk(data: str) -> dict[str, Any] | None:
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def encode_event(chunk: dict[str, Any] | str) -> bytes:
    payload = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
