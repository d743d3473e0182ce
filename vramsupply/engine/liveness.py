"""Whether the scheduler thread is still doing its job, readable from any thread.

A dead engine must never look healthy: the marketplace routes buyers by ``/health`` and heartbeats,
and systemd restarts only a process that stops pinging its watchdog or exits with an error. Three
ways the scheduler can stop serving while the process lives on:

- its thread raised (a bug, a llama.cpp error surfacing as an exception): ``died`` records why;
- a decode step never returns (a driver hang, a deadlock in a backend): no step has decoded for
  ``stall_timeout`` seconds while requests are pending. Idle time never counts: the clock is reset
  whenever work arrives at an idle engine and after every step that decoded;
- every ``llama_decode`` fails (a GPU out of memory, a driver error): each failed step ends its
  requests with a 500, quickly, forever. A failed decode is no progress: ``decode_failed`` counts
  the steps in a row whose every decode failed, and ``FAILING_STEPS`` of them are the engine's
  death, named with llama.cpp's status. One failed step among good ones ends only its own requests.

A frozen process is no stall. ``kill -STOP`` then ``-CONT``, ``docker pause`` (the cgroup freezer)
or a debugger stop every thread while the monotonic clock runs on; the first reader after the resume
would see a long wait with requests pending, and ``serve`` would restart a healthy engine (minutes of
loading, buyers turned away) for having been paused. ``PauseClock`` tells those freezes apart: a
thread that wakes every ``PAUSE_CHECK_SECONDS`` finds its wake-up late by the time nothing in the
process ran, and the stall clock leaves out what was frozen since the last progress. A decode that
never returns keeps that thread on time (``llama_decode`` releases the GIL), so it is still a stall.
Measuring what did run instead (the process's CPU time) would not do: a step waiting on a hung GPU
burns no CPU. (Hadoop's ``JvmPauseMonitor`` tells a JVM's pauses the same way.)

``failure`` is cheap (two clock reads), so ``Engine.stats()`` computes it on every call and every
reader (``/health``, heartbeats, the watchdog, ``serve``) sees the same answer. A stall, once a
reader has seen it, is the engine's failure for good (``died``): ``serve`` stops on it, and a step
that returned late after all must neither turn /health back to ok while the agent exits nor end its
requests as "shutting down" without the cause (the scheduler ends them with it, ``cause``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_STALL_TIMEOUT = 600.0
"""Seconds one decode step may take. The slowest legitimate step is a full ``n_batch`` prompt chunk
(2048 tokens) of a 70B model on a CPU, about 200 s at 10 prompt tokens/s; 600 s leaves a margin of
three."""

FAILING_STEPS = 8
"""Steps in a row whose every ``llama_decode`` failed, none decoding between, after which the engine
has failed. Each failed step ends every request in its batch, so a run of 8 has failed at least 8
buyers in a row and served none: no passing trouble (one request's odd batch, a moment of memory
pressure) does that, and on a busy engine the 8 steps take well under a second, so few buyers pay
for the wait. A smaller run would risk restarting the agent (minutes of loading) for a blip."""

DECODE_STATUS = {
    1: "no room in the KV cache for the batch",
    2: "the decode was aborted",
    -1: "llama.cpp refused the batch as invalid",
    -2: "llama.cpp could not allocate memory for the computation: the GPU (or host) is out of memory",
    -3: "the computation failed in llama.cpp's backend, most often the GPU out of memory or a driver error",
}
"""What ``llama_decode``'s return values mean (llama.h; -2 and -3 from llama-context.cpp)."""

PAUSE_CHECK_SECONDS = 1.0
"""How often the pause clock's thread wakes up. A freeze is measured to within this much (it began
somewhere in the wait that ends late); what is missed counts as stall time, as before."""

PAUSE_THRESHOLD_SECONDS = 2.0
"""How late the pause clock's thread must wake up for the time to count as a freeze of the process.
A thread that sleeps is late by well under 0.1 s even on a loaded 2-core host, and by a few hundred
milliseconds where something holds the GIL (a garbage collection of a large heap, a big JSON body);
2 s is far past either, yet a freeze that short could not make a stall of any sensible
``stall_timeout``. A late wake-up past it is counted whole, not less the threshold."""


class DecodesFailing(Exception):
    """Raised on the scheduler thread by ``Liveness.decode_failed`` once the engine has failed."""


def decode_status(status: int) -> str:
    """``llama_decode``'s ``status`` in words, e.g. "status -3: the computation failed ..."."""
    return f"status {status}: {DECODE_STATUS.get(status, 'a fatal error inside llama.cpp')}"


class PauseClock:
    """Seconds the whole process was frozen, told by a thread that wakes every ``PAUSE_CHECK_SECONDS``.

    Only the thread that drives the clock writes ``_state`` (``watching`` before the thread starts,
    then the thread): one tuple, stored whole, so any thread reads a consistent pair without a lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: tuple[float, float | None] = (0.0, None)  # seconds frozen so far; the last wake-up, None unwatched
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def frozen(self) -> float:
        """Seconds frozen so far, from any thread. A freeze that the thread has not yet noticed
        counts too: after a resume, a reader may run before the thread does."""
        frozen, woke = self._state
        return frozen if woke is None else frozen + self._late(self._clock() - woke)

    def watching(self) -> None:
        """From now on ``woke`` is called every ``PAUSE_CHECK_SECONDS`` (``start``, or a test)."""
        self._state = (self._state[0], self._clock())

    def woke(self) -> float:
        """The thread woke up: the freeze it noticed, in seconds, 0 for none."""
        frozen, woke = self._state
        now = self._clock()
        late = 0.0 if woke is None else self._late(now - woke)
        self._state = (frozen + late, now)
        return late

    @staticmethod
    def _late(since_woke: float) -> float:
        late = since_woke - PAUSE_CHECK_SECONDS
        return late if late > PAUSE_THRESHOLD_SECONDS else 0.0

    def start(self) -> None:
        """Start the thread (call it from a thread at normal priority: the scheduler's is lowered)."""
        if self._thread is None:
            self.watching()
            self._thread = threading.Thread(target=self._run, name="vramsupply-pause-clock", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the thread (idempotent); freezes go uncounted from here."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(PAUSE_CHECK_SECONDS)  # it wakes at once

    def _run(self) -> None:
        try:
            while not self._stop.wait(PAUSE_CHECK_SECONDS):
                late = self.woke()
                if late:
                    log.warning("the agent was paused for at least %d s (SIGSTOP, docker pause, a debugger, or a host too busy to run it): "
                                "not counted as an engine stall", late)
        finally:
            self._state = (self._state[0], None)  # no thread: a late wake-up would be no freeze


class Liveness:
    """The scheduler reports progress, failed decodes and death here; anyone asks ``failure``."""

    def __init__(
        self, stall_timeout: float = DEFAULT_STALL_TIMEOUT, clock: Callable[[], float] = time.monotonic, pauses: PauseClock | None = None
    ) -> None:
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be more than 0 seconds, got {stall_timeout}")
        self.stall_timeout = stall_timeout
        self._clock = clock
        self.pauses = pauses if pauses is not None else PauseClock(clock)
        """Its thread is started and stopped with the scheduler's."""
        self._progress = (clock(), 0.0)  # when the stall clock restarted, and the seconds frozen by then
        self._cause: str | None = None
        self._failing = 0  # steps in a row whose every decode failed (scheduler thread only)
        self._last_status = 0

    def progressed(self) -> None:
        """Work arrived at an idle engine, or a step moved on without a decode (a rollback, a
        grammar token): the stall clock restarts (a tuple stored whole: no lock needed)."""
        self._progress = (self._clock(), self.pauses.frozen())

    def decoded(self) -> None:
        """A ``llama_decode`` succeeded: the stall clock restarts and so does the run of failed steps."""
        self._failing = 0
        self.progressed()

    def decode_failed(self, status: int) -> None:
        """A step's ``llama_decode`` failed with ``status`` (the step's requests were ended). Raises
        ``DecodesFailing``, the engine's death recorded, once ``FAILING_STEPS`` steps in a row failed."""
        self._failing += 1
        self._last_status = status
        if self._failing >= FAILING_STEPS:
            self.died(f"the inference engine failed: llama.cpp failed every decode of the last {self._failing} steps ({decode_status(status)})")
            raise DecodesFailing(self._cause)

    def died(self, cause: str) -> None:
        self._cause = cause

    @property
    def cause(self) -> str | None:
        """Why the engine has failed for good (a death, or a stall a reader has seen), or None."""
        return self._cause

    def failure(self, *, pending: bool, running: bool) -> str | None:
        """Why the engine cannot serve, or None. ``running``: the thread should be alive."""
        if self._cause is not None:
            return self._cause
        if not running:
            return None
        progress_at, frozen_then = self._progress
        waited = self._clock() - progress_at - (self.pauses.frozen() - frozen_then)  # a frozen process stalls nothing
        if pending and waited > self.stall_timeout:
            failed = f"; its last {self._failing} decodes failed ({decode_status(self._last_status)})" if self._failing else ""
            seconds = f"{waited:.0f}" if waited >= 10 else f"{waited:.1f}"
            self.died(f"the inference engine stalled: no decode step finished for {seconds}s with requests pending (stall timeout {self.stall_timeout:g}s){failed}")
            return self._cause
        return None
