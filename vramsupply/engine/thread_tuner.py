"""Fewer decode threads while other programs keep the CPU busy, and all of them again after.

llama.cpp's CPU threads meet at a barrier after every operation of the graph, so a step runs at
the pace of the thread that got the least CPU. Alone on the 2-core bench VM, a one-stream step of
the bench model took 4.2 ms with two threads and 5.5 ms with one. Beside ONE busy program in
another session (``while True: pass``), two threads took 330 to 1,240 ms a step and one thread
6 ms: one of the two always waits for a core the other program holds. Beside two, 26 ms against
10 (ad-hoc, decoding in a loop). llama-server fixes its threads at start, and so did we: served
beside one busy program, it gave 2.7 tok/s at one stream where it had given 186
(``bench/contention.py``, ``bench/results/2026-12-04-contention-tuner.json``). A provider's
machine that also runs a build, a browser or a game serves tens of times slower.

So when the provider did not set ``--threads``, the scheduler asks this tuner how many threads each
step should use. It tries a neighbouring count for a few steps now and then (a *probe*): the
candidate and the current count take turns step by step, so both see the same streams at the
same length, and each candidate step is compared with the current step just before it: by time
where both carry the same streams and no prompt, by time per row where both carry prompt tokens
and about as many rows (``step_kind``, in ``thread_measure.py`` with the CPU readings). The
candidate is kept when it is clearly faster (median ratio below ``KEEP_BELOW``, or one step at half
the time or less), or, for more threads (back toward the default), when it is not slower; the probe
ends at once when a candidate step is ``ABORT_ABOVE`` times slower.

- **Fewer threads**: as many as the cores other programs left this process (its CPUs less their
  idle time and its own use, from ``/proc/stat`` and its CPU time), or half the current count
  where it cannot tell or they took none. A probe that finds them slower costs a step or two at
  most a few milliseconds longer, so it is tried on a timer that backs off from 1 to 16 seconds
  while the answer stays no. Such a probe takes its candidate steps among steps without prompt
  rows only: a step that carries them is longer, and on a quiet machine half the threads doubled
  it (beside a 4,000-token prompt a 0.21 s step of one tile took 0.35 s with one thread, a gap
  over the 250 ms bound in the stream beside it, ``bench/worst_case.py``). It is tried at once,
  with any step as a candidate, when the decode got much less CPU than it asked for (the
  process's CPU time against decode time × threads, below ``STARVED_SHARE``) or a step took
  ``SLOWED_BY`` times its usual time, at most once a second: on a GPU the CPU threads wait for
  the device, and that is no reason to churn.
- **More threads**: one more per idle core (twice as many where idle time is unknown), up to the
  default. Beside a busy program one step of too many can take a second, so more are tried only
  when the CPUs this process may run on had idle time for them (measured only while the engine
  decodes: between requests a core is idle anyway), and on a timer that backs off from 1 to 64
  seconds.

Measured on two cores only, where both rules give one thread beside a busy program; on more cores
the counts come from the simulated machine of ``tests/test_engine_thread_tuner.py``.

This module decides; what it measures is in ``thread_measure.py``, and how a switch is said to the
provider in ``thread_switch_log.py``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp._internals import LlamaContext

from .counters import Counters
from .pacing import StepWork
from .thread_measure import CpuClock, CpuWindow, Window, step_kind
from .thread_switch_log import SwitchLog
from .types import EngineOptions

log = logging.getLogger(__name__)

PROBE_PAIRS = 3
"""Candidate steps a probe compares (each with the current step before it)."""
KEEP_BELOW = 0.9
"""The candidate is kept when its median step takes less than this share of the current's."""
MORE_KEPT_BELOW = 1.0
"""More threads, back toward the default, are kept when they are not slower."""
DECISIVE_BELOW = 0.5
"""One candidate step at this share of the current's or less is kept at once."""
ABORT_ABOVE = 1.5
"""One candidate step this many times slower than the current's ends the probe."""
STARVED_SHARE = 0.75
"""Below this share of the CPU it asked for, the decode is starved: try fewer threads now."""
IDLE_FOR_MORE = 0.5
"""More threads are tried only when the CPUs had idle time for this share of each extra thread."""
OTHERS_AT_LEAST = 0.25
"""Other programs' use below this many cores is noise: fewer threads are then tried by halving."""
SLOWED_BY = 3.0
"""A step this many times its usual time (same streams, same threads) starts a probe after one
window of such steps (which tells how many cores other programs took): with many cores the
threads spin at each barrier, so a starved decode still gets its CPU time."""
USUAL_WEIGHT = 0.1
"""How much each step moves the usual time of its stream count."""
WINDOW_SECONDS = 0.25
"""How often the CPU the decode got is looked at (at a step's end, at most this often)."""
IDLE_GAP_SECONDS = 0.05
"""A pause this long between two steps (no request) starts a new window: idle cores while the
engine itself had nothing to do say nothing about room for more threads."""


@dataclass
class Backoff:
    """Seconds until the next try in one direction: doubled after each no, reset after a yes."""

    first: float
    longest: float
    wait: float = 0.0
    due: float = 0.0
    last: float = float("-inf")
    """When the last try ended."""

    def __post_init__(self) -> None:
        self.wait = self.first

    def refused(self, now: float) -> None:
        self.last = now
        self.due = now + self.wait
        self.wait = min(self.wait * 2, self.longest)

    def reset(self, now: float) -> None:
        self.last = now
        self.wait = self.first
        self.due = now + self.first


@dataclass
class Probe:
    candidate: int
    prompts: bool = True
    """Whether its candidate steps may carry prompt rows: not for a timer's probe for fewer threads."""
    ratios: list[float] = field(default_factory=list)
    last_current: tuple[tuple[str, int], float] | None = None  # (kind, cost) of the latest current step
    candidate_next: bool = False


class ThreadTuner:
    """Chooses each step's thread count; the scheduler thread's own (not thread-safe)."""

    def __init__(
        self,
        most: int,
        clock: Callable[[], float] = time.monotonic,
        cpu: CpuClock | None = None,
    ) -> None:
        self.most = most
        self.current = most
        self._clock = clock
        self._cpu = cpu or CpuClock()
        now = clock()
        self._fewer = Backoff(1.0, 16.0, due=now + 1.0)
        self._more = Backoff(1.0, 64.0, due=now + 1.0)
        self._probe: Probe | None = None
        self._last_step_end = now
        self._switches = SwitchLog(log)
        self._window = CpuWindow(self._cpu, now)
        self._usual: dict[tuple[str, int], float] = {}
        self._usual_threads = most
        self._slowed_since: float | None = None

    def threads_for_step(self, prompt: bool = False) -> int:
        """The threads for the next step; ``prompt``: it carries prompt rows."""
        probe = self._probe
        if probe is not None and self._clock() - self._last_step_end > IDLE_GAP_SECONDS:
            probe.last_current, probe.candidate_next = None, False  # a pair is two steps in a row
        if probe is not None and probe.candidate_next and probe.last_current is not None and (probe.prompts or not prompt):
            return probe.candidate
        return self.current

    def observe(self, threads: int, rows: int, seconds: float, prompt_tokens: int = 0) -> None:
        """A step of ``rows`` batch rows, ``prompt_tokens`` of them prompt tokens, decoded with
        ``threads`` threads in ``seconds``."""
        now = self._clock()
        if now - seconds - self._last_step_end > IDLE_GAP_SECONDS:
            self._window.restart(now)  # the engine was idle: a window covers busy time only
        else:
            self._window.add(threads, seconds)
        self._last_step_end = now
        kind, cost = step_kind(rows, seconds, prompt_tokens)
        probing = self._probe is not None
        if probing:
            self._probe_step(self._probe, threads, kind, cost)
        slowed = threads == self.current and self._slowed(kind, cost)
        if slowed or now - self._window.start >= WINDOW_SECONDS:
            self._end_window(now)
            if slowed and self._probe is None:
                self._slowed_since = now  # the next window sees only slow steps: it tells what others took
            if not probing and self._probe is not None and threads == self.current:
                self._probe_step(self._probe, threads, kind, cost)  # a new probe: this step is the first of its pair

    # ---- probes -----------------------------------------------------------------------------

    def _probe_step(self, probe: Probe, threads: int, kind: tuple[str, int], cost: float) -> None:
        if threads == self.current:
            probe.last_current = (kind, cost)
            probe.candidate_next = True
            return
        probe.candidate_next = False
        if probe.last_current is None or probe.last_current[0] != kind:
            return  # a stream ended or joined between the two, or a prompt came or went: not comparable
        ratio = cost / max(probe.last_current[1], 1e-9)
        probe.ratios.append(ratio)
        if ratio >= ABORT_ABOVE:
            self._end_probe(probe, keep=False)
        elif ratio <= DECISIVE_BELOW:
            self._end_probe(probe, keep=True)
        elif len(probe.ratios) >= PROBE_PAIRS:
            bar = KEEP_BELOW if probe.candidate < self.current else MORE_KEPT_BELOW
            self._end_probe(probe, keep=statistics.median(probe.ratios) < bar)

    def _end_probe(self, probe: Probe, keep: bool) -> None:
        now = self._clock()
        self._probe = None
        fewer = probe.candidate < self.current
        if keep:
            self._switches.switched(probe.candidate, self.current, probe.ratios, now)
            self.current = probe.candidate
            self._fewer.reset(now)
            self._more.reset(now)
        else:
            (self._fewer if fewer else self._more).refused(now)

    def _start_probe(self, candidate: int, prompts: bool = True) -> None:
        self._probe = Probe(candidate, prompts)

    # ---- when to probe ----------------------------------------------------------------------

    def _slowed(self, kind: tuple[str, int], cost: float) -> bool:
        """Whether this step cost ``SLOWED_BY`` times the usual for its kind at this thread count
        (an average over the steps before it, forgotten when the count changes)."""
        if self._usual_threads != self.current:
            self._usual, self._usual_threads = {}, self.current
        usual = self._usual.get(kind)
        self._usual[kind] = cost if usual is None else usual + USUAL_WEIGHT * (cost - usual)
        return usual is not None and cost > SLOWED_BY * usual

    def _end_window(self, now: float) -> None:
        slowed, self._slowed_since = self._slowed_since is not None, None
        window = self._window.end(now)
        if self._probe is None:
            self._maybe_probe(now, window, slowed)
        elif self._starved(now, window, slowed):
            self._probe.prompts = True  # the machine got busy during a timer's probe: any step will do

    def _starved(self, now: float, window: Window, slowed: bool) -> bool:
        return (slowed or window.share < STARVED_SHARE) and now - self._fewer.last >= self._fewer.first

    def _maybe_probe(self, now: float, window: Window, slowed: bool = False) -> None:
        fewer, more = self._fewer_candidate(window), self._more_candidate(window)
        starved = self._starved(now, window, slowed)
        if fewer < self.current and (starved or now >= self._fewer.due):
            self._start_probe(fewer, prompts=starved)
        elif more > self.current and now >= self._more.due and self._idle_enough(window.idle_cores, more):
            self._start_probe(more)

    def _fewer_candidate(self, window: Window) -> int:
        """The cores other programs left this process, when it can tell and they took any; else half."""
        halved = max(self.current // 2, 1)
        if window.idle_cores is None:
            return halved
        others = self._cpu.count - window.idle_cores - window.own_cores
        if others < OTHERS_AT_LEAST:
            return halved
        return max(1, min(self.current - 1, self._cpu.count - math.ceil(others - OTHERS_AT_LEAST)))

    def _more_candidate(self, window: Window) -> int:
        """As many more as there were idle cores (at least one), when it can tell; else twice as many."""
        if window.idle_cores is None:
            return min(self.current * 2, self.most)
        return min(self.current + max(1, math.floor(window.idle_cores + OTHERS_AT_LEAST)), self.most)

    def _idle_enough(self, idle_cores: float | None, more: int) -> bool:
        if idle_cores is None:
            return True  # unknown: the timer alone decides
        return idle_cores >= IDLE_FOR_MORE * (more - self.current)


def thread_tuner(options: EngineOptions, context: LlamaContext) -> ThreadTuner | None:
    """A tuner when the provider left ``--threads`` to us and there are two threads or more to tune."""
    most = llama_cpp.llama_n_threads(context.ctx)
    return ThreadTuner(most) if options.threads is None and most > 1 else None


class StepThreads:
    """The scheduler's side: gives each step the tuner's thread count, and reports its choice.

    Without a tuner (``--threads`` set, or one core) every step keeps the context's threads."""

    def __init__(self, ctx: llama_cpp.llama_context_p, tuner: ThreadTuner | None, counters: Counters) -> None:
        self._ctx = ctx
        self._tuner = tuner
        self._counters = counters
        self._applied = llama_cpp.llama_n_threads(ctx)
        counters.cpu_threads = self._applied

    def before(self, prompt: bool) -> int:
        """Set the threads for the next step (``prompt``: it carries prompt rows); returns them."""
        if self._tuner is None:
            return self._applied
        threads = self._tuner.threads_for_step(prompt)
        if threads != self._applied:
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
            self._applied = threads
        return threads

    def after(self, threads: int, work: StepWork, rows: int, seconds: float) -> None:
        """The step's ``llama_decode`` of ``rows`` batch rows took ``seconds``."""
        if self._tuner is None:
            return
        self._tuner.observe(threads, rows, seconds, work.prompt_tokens)
        chosen = self._tuner.current
        if chosen != self._counters.cpu_threads:
            self._counters.add(cpu_threads=chosen - self._counters.cpu_threads, thread_switches_total=1)
