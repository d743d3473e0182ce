"""Ctrl-C, SIGTERM and SIGHUP for the long-running commands (`serve`, `devplatform`).

Why not Python's default ``KeyboardInterrupt``: it is raised wherever the main thread happens to
be, including inside a ``finally`` that is releasing a port or deregistering, and asyncio.run's own
SIGINT handler is installed without a wakeup fd, so a signal delivered to one of the process's
other threads (a download, the engine, an executor) is only noticed when the event loop next wakes
up on its own. ``StopSignals`` uses ``loop.add_signal_handler``, which wakes the loop at once from
any thread, and turns the first signal into a graceful stop request and a second one into
"stop now" (the main task is cancelled). What a graceful stop waits for depends on the phase
(nothing before the model is ready, the model load, then in-flight requests): the caller says it in
``first_stop``, so the log line tells the user what they are waiting for and that a second signal
does not wait.

``in_daemon_thread`` runs blocking work that cannot be interrupted (a model download, a Hub lookup
for the memory plan, llama.cpp loading a model) where a stop does not have to wait for it: asyncio's
default executor (``asyncio.to_thread``) makes the process wait for its threads at exit, which was a
minute of a Hub that accepts and never answers after Ctrl-C, deaf to a second Ctrl-C, ending in
uvloop's "Event loop is closed" traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

from vramsupply.timeouts import event_within

log = logging.getLogger(__name__)

T = TypeVar("T")


class StopSignals:
    """SIGINT/SIGTERM: the first asks for a graceful stop; a second cancels the task and stops now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    """SIGHUP: the terminal closed (an SSH session dropped). Its default would end the agent at
    once, leaving its registration online; unless it was ignored when we started (``nohup``)."""
    SERVING = "finishing in-flight requests (again to stop at once)"
    """``first_stop`` unless the caller says otherwise: serving, requests may be in flight."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._handled: list[signal.Signals] = []
        self.first_stop = self.SERVING
        """What the first signal does, for its log line; the caller sets it as it enters each phase."""
        self.in_flight: Callable[[], int] = lambda: 0
        """The requests in flight, which the caller lets a second signal count (``cut``)."""
        self.cut = 0
        """The requests in flight when a second signal stopped at once: those it did not wait for."""

    def __enter__(self) -> StopSignals:
        self._handled = [sig for sig in self.SIGNALS if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN]
        for sig in self._handled:
            self._loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig in self._handled:
            self._loop.remove_signal_handler(sig)

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _received(self, sig: signal.Signals) -> None:
        if not self.event.is_set():
            log.info("%s received: %s", sig.name, self.first_stop)
            self.event.set()
            from vramsupply.instance_lock import mark_stopping  # here: `devplatform` needs none of it

            mark_stopping()  # a `serve` started now is told to wait for this one, not that it serves
        elif self._task is not None:
            log.warning("%s received again: stopping without waiting", sig.name)
            self.cut = self.in_flight()
            self._task.cancel()

    async def until(self, work: asyncio.Future[T]) -> T | None:
        """``work``'s result, or None as soon as a stop is requested first (``work`` runs on)."""
        stopped = asyncio.ensure_future(self.event.wait())
        try:
            done, _ = await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if work in done:
            return work.result()
        work.add_done_callback(_forget)
        return None


def _forget(future: asyncio.Future[object]) -> None:
    """Nobody waits for this any more: retrieve its outcome so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


async def wait_for_stop(stop: StopSignals, seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as a stop was requested. A cancellation always ends
    it, even one that comes in the same moment as the stop (``vramsupply.timeouts``)."""
    return await event_within(stop.event, seconds)


def in_daemon_thread(function: Callable[..., T], *args: object, **kwargs: object) -> asyncio.Future[T]:
    """Run blocking ``function`` in a daemon thread; the future has its result or exception."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[object], None], value: object) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            outcome: tuple[Callable[[object], None], object] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is gone: nobody is waiting for this any more

    threading.Thread(target=run, name=f"vramsupply-{getattr(function, '__name__', 'work')}", daemon=True).start()
    return future
