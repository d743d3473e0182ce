"""When this agent itself was paused, as the marketplace side needs to know it.

A frozen agent (``kill -STOP``, ``docker pause``, a debugger, a host too busy to run it) answers no
health check, so the platform lists it offline; the next heartbeat's ``offline`` would then send the
provider to their router and firewall, which are fine. The engine's pause clock only counts seconds
frozen (``engine/liveness.py``, which logs "the agent was paused for at least N s"), and an agent
before an upstream server has none; what the offline diagnosis needs is *when*. So the lifecycle
keeps its own watch on its event loop, the loop that answers ``/health``: a task that wakes every
``CHECK_SECONDS`` and finds its wake-up late by the time nothing ran. A loop blocked (not frozen)
for as long fails a health check just the same, and is recorded the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

CHECK_SECONDS = 1.0
THRESHOLD_SECONDS = 2.0
"""How late a wake-up must be to count as a pause (as the engine's pause clock: well past any GIL
hold or garbage collection, and well under any health check's timeout)."""
KEPT = 16


@dataclass(frozen=True)
class Pause:
    """From ``start`` to ``end`` on the watch's clock; ``at``: when it ended, wall clock."""

    start: float
    end: float
    at: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class PauseWatch:
    """``clock``: monotonic seconds (a test passes one it moves); ``sleep``: how the watch waits."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        every: float = CHECK_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.clock = clock
        self._every = every
        self._sleep = sleep
        self._pauses: deque[Pause] = deque(maxlen=KEPT)
        self._woke: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._woke = self.clock()
            self._task = asyncio.create_task(self._run(), name="pause-watch")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._sleep(self._every)
            self.woke()

    def woke(self) -> Pause | None:
        """The watch woke up: the pause it noticed, if its wake-up came that late."""
        pause = self._pending()
        self._woke = pause.end if pause is not None else self.clock()
        if pause is not None:
            self._pauses.append(pause)
        return pause

    def _pending(self) -> Pause | None:
        now, last = self.clock(), self._woke
        if last is None or now - last - self._every <= THRESHOLD_SECONDS:
            return None
        return Pause(last + self._every, now, time.time())

    def overlapping(self, since: float, until: float) -> Pause | None:
        """The longest pause that ended after ``since`` and began by ``until`` (the watch's clock)."""
        # A pause the watch's task has not woken up from yet (a resume's first moments) is over, since
        # this runs: recorded now, so that it is the same pause (same end, same wall time) when asked again.
        self.woke()
        found = [p for p in self._pauses if p.start <= until and p.end > since]
        return max(found, key=lambda p: p.seconds, default=None)
