"""Bounds on what an upstream can make the front wait for, or hold in memory.

An upstream is a program we do not control. It may never send its headers, trickle a byte every
few seconds, keep a stream alive with nothing but ``: ping`` comments, answer with a gigabyte (or a
gzip bomb), or write one endless SSE line. Unbounded, each would hold a buyer, the drain and our
memory for as long as the upstream liked. Every bound here ends the request the way a failed
upstream does: 504 for time and 502 for size, or an error event once a stream has begun.

The defaults (``RelayLimits``) are generous for real engines: a whole answer gets 600 s (what
aiohttp's read timeout allowed before); a stream gets 300 s for its headers, 300 s more for its
first data event (a queued request, a long prefill), then 120 s between data events, and 1800 s
in all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from vramsupply.timeouts import within

T = TypeVar("T")


@dataclass(frozen=True)
class RelayLimits:
    answer_seconds: float = 600.0
    """A whole (non-streamed) answer, headers and body: engines send both only once it is done."""
    first_event_seconds: float = 300.0
    """A stream's headers, then again its first data event: it may wait in a queue, then prefill."""
    idle_seconds: float = 120.0
    """The longest gap between a stream's data events; comments (keep-alive pings) do not count."""
    stream_seconds: float = 1800.0
    """A whole stream, however steadily it flows."""
    max_answer_bytes: int = 64 << 20
    """A whole answer, decompressed."""
    max_error_bytes: int = 4096
    """What is read of an upstream's error body (only a short summary of it is ever used)."""
    max_event_bytes: int = 1 << 20
    """One SSE event (its lines together), or one line still waiting for its end."""


class BadAnswer(Exception):
    """The upstream's answer cannot be relayed (too large, malformed); the message says how."""

    status = 502
    code = "upstream_error"


class TooSlow(BadAnswer):
    """The upstream took longer than a bound in ``RelayLimits``."""

    status = 504
    code = "upstream_timeout"


class Deadline:
    """The time one forwarded request has left: an overall cap and a moving "next thing by" bound."""

    def __init__(self, total_seconds: float, first_seconds: float, first_what: str) -> None:
        now = time.monotonic()
        self.total_seconds = total_seconds
        self._total_at = now + total_seconds
        self.expect(first_seconds, first_what)

    def expect(self, seconds: float, what: str) -> None:
        """The next awaited thing must come within ``seconds`` (and within the overall cap)."""
        self._next_at = time.monotonic() + seconds
        self._next_seconds = seconds
        self._what = what

    async def within(self, awaitable: Awaitable[T]) -> T:
        now = time.monotonic()
        overall_first = self._total_at <= self._next_at
        try:
            return await within(awaitable, max(0.0, min(self._next_at, self._total_at) - now))
        except asyncio.TimeoutError:
            if overall_first:
                raise TooSlow(f"it did not finish within {self.total_seconds:g}s") from None
            raise TooSlow(f"it sent no {self._what} within {self._next_seconds:g}s") from None


async def read_capped(content: aiohttp.StreamReader, limit: int, deadline: Deadline) -> bytes:
    """The whole body, or BadAnswer once it grows past ``limit`` bytes (decompressed)."""
    body = bytearray()
    while chunk := await deadline.within(content.readany()):
        body += chunk
        if len(body) > limit:
            raise BadAnswer(f"its answer is larger than {limit} bytes")
    return bytes(body)


async def read_head(content: aiohttp.StreamReader, limit: int, deadline: Deadline) -> bytes:
    """At most ``limit`` bytes of a body; the rest is never read (the connection is dropped)."""
    head = bytearray()
    while len(head) < limit and (chunk := await deadline.within(content.readany())):
        head += chunk
    return bytes(head[:limit])
