"""The event loop ``serve`` runs on: uvloop where it is installed, else asyncio's own.

Every streamed token passes through the event loop twice (the scheduler thread's
``call_soon_threadsafe`` wake-up, then the socket write), so the loop's own cost per callback and
per write is part of the per-token overhead. uvloop (libuv, Cython) does both with less Python on
the path; the behaviour our code relies on (signal handlers, ``call_soon_threadsafe``, cancelling
the main task on Ctrl-C) is the same, so it is a drop-in. It is a dependency on Linux and macOS;
where it is missing (Windows) the standard loop runs.

uvloop holds the GIL through a socket write, where asyncio's own loop releases it around the
``send``, and a profile at four streams found the event loop holding the GIL 24 % of the time, two
thirds of it writing. The standard loop was still slower: 0.967x at four streams, 20 alternating
rounds side by side on the 2-core bench VM (``bench/results/2026-12-04-ab-c4-asyncio-loop.json``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

