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


class DecodesFailing(Exception):
    """Raised on the scheduler thread by ``Liveness.decode_failed`` once the engine has failed."""


def decode_status(status: int) -> str:
    """``llama_decode``'s ``status`` in words, e.g. "status -3: the computation failed ..."."""
    return f"status {status}: {DECODE_STATUS.get(status, 'a fatal error inside llama.cpp')}"


class Liveness:
    """The scheduler reports progress, failed decodes and death here; anyone asks ``failure``."""

    def __init__(self, stall_timeout: float = DEFAULT_STALL_TIMEOUT, clock: Callable[[], float] = time.monotonic) -> None:
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be more than 0 seconds, got {stall_timeout}")
        self.stall_timeout = stall_timeout
        self._clock = clock
        self._progress_at = clock()
        self._cause: str | None = None
        self._failing = 0  # steps in a row whose every decode failed (scheduler thread only)
        self._last_status = 0

    def progressed(self) -> None:
        """Work arrived at an idle engine, or a step moved on without a decode (a rollback, a
        grammar token): the stall clock restarts (a float store: no lock needed)."""
        self._progress_at = self._clock()

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

    def failure(self, *, pending: bool, running: bool) -> str | None:
        """Why the engine cannot serve, or None. ``running``: the thread should be alive."""
        if self._cause is not None:
            return self._cause
        if not running:
            return None
        waited = self._clock() - self._progress_at
        if pending and waited > self.stall_timeout:
            failed = f"; its last {self._failing} decodes failed ({decode_status(self._last_status)})" if self._failing else ""
            return f"the inference engine stalled: no decode step finished for {waited:.0f}s with requests pending (stall timeout {self.stall_timeout:g}s){failed}"
        return None
