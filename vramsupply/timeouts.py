"""Waiting for something for at most a given time, without ever losing a cancellation.

Why not ``asyncio.wait_for``: before Python 3.12 it runs what it waits for as a task of its own,
and when the caller is cancelled in the same turn of the event loop as that task finishes, it
returns the result and the cancellation is lost. The caller goes on (a watch loop sleeps again)
and whoever awaits its end waits forever: it hung the agent's shutdown, one run in four in a test.
Here what is awaited runs in the caller's own task, under a timeout context manager:
``asyncio.timeout`` on Python 3.11+, and on 3.10 aio-libs' ``async-timeout`` (the same design, the
one aiohttp itself uses there). No second task, so a cancellation always reaches the caller.

Time running out raises ``asyncio.TimeoutError`` as ``wait_for`` did (on 3.11+ it is the built-in
``TimeoutError``), so callers catch what they caught before. As with ``asyncio.timeout`` (and
``wait_for`` since 3.12), a time already up (0 s or less) ends the work at its first wait rather
than before it starts: a result that is ready without waiting is still returned.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout

__all__ = ["event_within", "timeout", "within"]

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``awaitable``'s result; ``asyncio.TimeoutError`` (its work cancelled) after ``seconds``
    (None: no limit). A future is cancelled on time out, as by ``wait_for``: wrap it in
    ``asyncio.shield`` to keep it running."""
    async with timeout(seconds):
        return await awaitable


async def event_within(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait up to ``seconds`` for ``event``; whether it is set."""
    try:
        await within(event.wait(), seconds)
    except asyncio.TimeoutError:
        return event.is_set()
    return True
