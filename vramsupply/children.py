"""Child processes the agent starts (a launched engine, a tunnel tool) must not outlive it, and
their output is read line by line whatever it holds.

``die_with_parent`` runs in the child between fork and exec: the kernel sends the child SIGTERM
when the agent dies without stopping it (SIGKILL, the OOM killer), so a restarted agent never
finds an orphan still holding the GPU or a tunnel to a dead port. Linux only
(``prctl(PR_SET_PDEATHSIG)``); elsewhere an orphan outlives the agent. ``killed_with_parent``
sends SIGKILL instead, for a child that may ignore SIGTERM.

``prctl`` is looked up here, in the agent, once: the child of a process with threads (llama.cpp's)
may only make the call. Looking it up there (``dlopen``) could wait forever on a loader lock that
another thread held at the fork, and ``Popen`` with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def killed_with_parent() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def output_lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Every line a child prints. One longer than asyncio's reader limit (64 KiB) makes
    ``readline`` raise ValueError, which ended the reader while the child ran on, its output
    unread until the pipe filled and blocked it (a tunnel tool, an engine logging a long config);
    asyncio has dropped that line by then, so reading goes on with the next."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            log.debug("skipped a line of a child's output longer than asyncio's reader limit")
            continue
        if not raw:
            return
        yield raw
