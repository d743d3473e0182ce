"""What other threads tell the scheduler thread: a new request, a cancel, or stop.

The scheduler thread alone owns the slots and the llama context, so every other thread only posts
a message here; the scheduler reads them between steps, and blocks on ``wait`` when it has nothing
else to do.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass

from .slots import Task


@dataclass(frozen=True)
class Submit:
    task: Task


@dataclass(frozen=True)
class Cancel:
    task_id: str


class Stop:
    pass


STOP = Stop()
Message = Submit | Cancel | Stop


class Inbox:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def post(self, message: Message) -> None:
        self._queue.put(message)

    def wait(self) -> Message:
        """Block until a message comes."""
        return self._queue.get()

    def drain(self) -> Iterator[Message]:
        """Every message already posted, without blocking."""
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return
