"""How the thread tuner's switches are said to a provider (``thread_tuner.py`` decides them).

Each switch of thread count is one INFO line in a provider's words (``switch_line``), with what the
probe measured at DEBUG (``probe_line``). Beside a program busy on and off the tuner can go back
and forth every few seconds, and one review counted 162 such lines in 10 minutes, so only a few
switches a window are said at INFO (``SwitchLog``), the rest at DEBUG. The lines go to the tuner's
own logger (``vramsupply.engine.thread_tuner``), which the caller passes in.
"""

from __future__ import annotations

import logging
import statistics

SAID_UP_TO = 100
"""A switch's INFO line says a speed-up past this as "over 100×" (see ``switch_line``)."""
SAID_WINDOW_SECONDS = 600.0
SAID_PER_WINDOW = 4
"""At most this many switches in ``SAID_WINDOW_SECONDS`` are said at INFO, the rest at DEBUG:
beside a program busy on and off the tuner can go back and forth every few seconds, and one
review counted 162 such lines in 10 minutes. The last one said says so, and where the count in
use is shown (``vramsupply_cpu_threads``)."""


class SwitchLog:
    """Says each switch: at INFO, unless ``SAID_PER_WINDOW`` were in the last ``SAID_WINDOW_SECONDS``."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._said: list[float] = []  # when the switches of the last SAID_WINDOW_SECONDS were said at INFO
        self._unsaid = 0  # switches since, said at DEBUG only

    def switched(self, candidate: int, current: int, ratios: list[float], now: float) -> None:
        """From ``current`` threads to ``candidate``, whose steps took ``ratios`` of the current's."""
        self._say(switch_line(candidate, current, ratios), now)
        self._log.debug("%s", probe_line(candidate, current, ratios))

    def _say(self, line: str, now: float) -> None:
        self._said = [at for at in self._said if now - at < SAID_WINDOW_SECONDS]
        if len(self._said) >= SAID_PER_WINDOW:
            self._unsaid += 1
            self._log.debug("%s", line)
            return
        self._said.append(now)
        since = f" ({self._unsaid} more switch{'es' if self._unsaid != 1 else ''} were logged at DEBUG)" if self._unsaid else ""
        often = (
            "; the count changes often: changes are logged at DEBUG for a while (/metrics' vramsupply_cpu_threads shows the count in use)"
            if len(self._said) == SAID_PER_WINDOW else ""
        )
        self._log.info("%s%s%s", line, since, often)
        self._unsaid = 0


def switch_line(candidate: int, current: int, ratios: list[float]) -> str:
    """The INFO line of a switch, in a provider's words: the thread count now used, why the tuner
    looks there, and how much faster its steps were than the current count's (the median of the
    probe's pairs). A ratio of a few hundredths is real: beside a busy program one thread is 50
    times as fast; but so, on a quiet machine, is one step beside a step at the current count that
    a stall of a few milliseconds slowed (the demo model's steps take a tenth of a millisecond, and
    a one-pair probe ends at once, ``DECISIVE_BELOW``): "a step took 0.00045× as long" told a
    provider nothing. So a speed-up past ``SAID_UP_TO`` is said as "over 100×"; the measured ratios
    are in ``probe_line``, at DEBUG."""
    ratio = statistics.median(ratios)
    speedup = 1 / max(ratio, 1e-12)
    faster = "about as fast" if ratio >= 0.95 else f"over {SAID_UP_TO}× faster" if speedup > SAID_UP_TO else f"{speedup:.2g}× faster"
    threads = f"{candidate} CPU thread{'s' if candidate != 1 else ''} instead of {current}"
    if candidate < current:
        return f"using {threads}: other programs may be keeping the cores busy; steps were {faster} with {candidate}"
    return f"using {threads}: the cores have room again; steps were {faster} with {candidate}"


def probe_line(candidate: int, current: int, ratios: list[float]) -> str:
    """The DEBUG line of a switch: what the probe measured, each candidate step's time as a share of
    the current count's step before it."""
    shares = ", ".join(f"{r:.2g}" for r in ratios)
    return f"thread probe: steps with {candidate} took {shares} of the time of steps with {current} (median {statistics.median(ratios):.2g})"
