"""Whether the scheduler thread is still doing its job, readable from any thread.

A dead engine must never look healthy: the marketplace routes buyers by ``/health`` and heartbeats,
and systemd restarts only a process that stops pinging its watchdog or exits with an error. Two
ways the scheduler can stop serving while the process lives on:

- its thread raised (a bug, a llama.cpp error surfacing as an exception): ``died`` records why;
- a decode step never returns (a driver hang, a deadlock in a backend): no step has finished for
  ``stall_timeout`` seconds while requests are pending. Idle time never counts: the clock is reset
  whenever work arrives at an idle engine and after every step.

``failure`` is cheap (a clock read), so ``Engine.stats()`` computes it on every call and every
reader (``/health``, heartbeats, the watchdog, ``serve``) sees the same answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_STALL_TIMEOUT = 600.0
"""Seconds one decode step may take. The slowest legitimate step is a full ``n_batch`` prompt chunk
(2048 tokens) of a 70B model on a CPU, about 200 s at 10 prompt tokens/s; 600 s leaves a margin of
three."""


class Liveness:
    """The scheduler reports progress and death here; anyone asks ``failure``."""

    def __init__(self, stall_timeout: float = DEFAULT_STALL_TIMEOUT, clock: Callable[[], float] = time.monotonic) -> None:
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be more than 0 seconds, got {stall_timeout}")
        self.stall_timeout = stall_timeout
        self._clock = clock
        self._progress_at = clock()
        self._cause: str | None = None

    def progressed(self) -> None:
        """A step finished, or work arrived at an idle engine (a float store: no lock needed)."""
        self._progress_at = self._clock()

    def died(self, cause: str) -> None:
        self._cause = cause

    def failure(self, *, pending: bool, running: bool) -> str | None:
        """Why the engine cannot serve, or None. ``running``: the thread should be alive."""
        if self._cause is not None:
            return self._cause
        if not running:
            return None
        waited = self._clock() - self._progress_at
        if pending and waited > self.stall_timeout:
            return f"the inference engine stalled: no decode step finished for {waited:.0f}s with requests pending (stall timeout {self.stall_timeout:g}s)"
        return None
