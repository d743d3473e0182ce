"""What the thread tuner (``thread_tuner.py``) measures: the CPU the decode got, and which steps compare.

The tuner decides; this module only reads the machine and the steps, so that the decisions can be
driven by a simulated machine (``tests/test_engine_thread_tuner.py``) as well as by this one.

- **A window** of steps (``CpuWindow``) tells three things: the share of the CPU time it asked for
  that the decode got (the process's CPU time against decode time × threads: a starved decode gets
  much less), the cores this process used, and the idle cores among the CPUs it may run on (their
  idle and I/O-wait time from ``/proc/stat``; unknown where a container numbers its CPUs apart from
  the affinity mask, as lxcfs does). The cores other programs took are the CPUs less their idle
  time and this process's own use. A window covers the engine's busy time only: between requests a
  core is idle anyway, and that says nothing about room for more threads.
- **A step's kind and cost** (``step_kind``): a candidate step is compared with the current step
  just before it only when both are alike: by time where both carry the same streams and no
  prompt, by time per row where both carry prompt tokens and about as many rows. A first version
  compared steps without prompts only, and in the marketplace bench beside a busy program, where
  nearly every step carries some prompt, its probes never ended.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import NamedTuple

from .threads import allowed_cpus


class Window(NamedTuple):
    """What one window saw: the share of the CPU time it asked for that the decode got, the cores
    this process used, and the idle cores among those it may use (None where unknown)."""

    share: float
    own_cores: float
    idle_cores: float | None


class CpuClock:
    """What the tuner reads from the system: this process's CPU time and the idle time of its CPUs."""

    def __init__(self, cpus: Iterable[int] | None = None, stat_path: str = "/proc/stat") -> None:
        self._names = {f"cpu{cpu}" for cpu in (allowed_cpus() if cpus is None else cpus)}
        self.count = len(self._names)
        self._stat_path = stat_path
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def process_seconds() -> float:
        return time.process_time()

    def idle_seconds(self) -> float | None:
        """Idle and I/O-wait time of this process's CPUs since boot; None where unknown."""
        try:
            with open(self._stat_path) as stat:
                lines = stat.read().splitlines()
        except OSError:
            return None
        ticks, found = 0, 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if name in self._names:
                values = rest.split()
                ticks += int(values[3]) + int(values[4])
                found += 1
        # A container's /proc/stat may number its CPUs apart from the affinity mask (lxcfs): unknown.
        return ticks / self._tick if found == len(self._names) > 0 else None


class CpuWindow:
    """The readings of one window so far: when it started, the CPU and idle time then, and the
    CPU time the decode asked for since (decode time × threads)."""

    def __init__(self, cpu: CpuClock, start: float) -> None:
        self._cpu = cpu
        self.restart(start)

    def restart(self, start: float) -> None:
        self.start = start
        self._cpu_at_start = self._cpu.process_seconds()
        self._idle_at_start = self._cpu.idle_seconds()
        self._decode_seconds = 0.0

    def add(self, threads: int, seconds: float) -> None:
        """A step decoded with ``threads`` threads in ``seconds``."""
        self._decode_seconds += seconds * threads

    def end(self, now: float) -> Window:
        """What the window saw; the next one starts ``now``."""
        cpu, idle = self._cpu.process_seconds(), self._cpu.idle_seconds()
        elapsed = max(now - self.start, 1e-9)
        share = (cpu - self._cpu_at_start) / self._decode_seconds if self._decode_seconds > 0 else 1.0
        window = Window(share, (cpu - self._cpu_at_start) / elapsed, None)
        if idle is not None and self._idle_at_start is not None:
            window = window._replace(idle_cores=(idle - self._idle_at_start) / elapsed)
        self.restart(now)
        return window


def step_kind(rows: int, seconds: float, prompt_tokens: int) -> tuple[tuple[str, int], float]:
    """Which steps a step compares with, and its cost. Steps of generating streams only compare
    with steps of as many streams, by their time. Steps that carry prompt tokens compare with such
    steps of about as many rows (the same power of two), by their time per row: under a long
    prompt, or many, every step carries some, and a probe must still end."""
    if prompt_tokens == 0:
        return ("streams", rows), seconds
    return ("prompt", max(rows, 1).bit_length()), seconds / max(rows, 1)
