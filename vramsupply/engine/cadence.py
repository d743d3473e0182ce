"""How often the scheduler wakes the consumer event loops while answers are under way.

Each hand-over (``generation.post``) wakes an event loop, which then writes an SSE chunk per
stream. On a CPU that wake-up runs on the same cores as the decode's spinning threads, and the
scheduler thread waits for the GIL while the loop holds it: at one stream the event loop's 0.24 ms
of CPU per token was the whole measured gap to llama-server at c=1 (``bench/profile.py``). So
mid-answer tokens are handed over at most once per ``interval``; whatever the steps in between
produced goes in the same hand-over, and so into the same SSE write.

The interval was 12 ms (a display's refresh), which on the 2-core VM batched two tokens at one
stream but from 4 streams on, where a step takes longer, woke the loop every step. At 30 ms,
vramsupply against itself at 12 ms in alternating pairs (``bench/pairs.py --against-args``; see
the README, "Waking the event loop at most every 30 ms") was ahead at c = 1, 4 and 16, by the
most at c=4, where the gap to llama-server was. Text that arrives 33 times a second still reads
as a stream; larger intervals gained a little more (60 ms: about 1 % more at c=4) but would show as
bursts of words.

Nothing that a client waits on is held back: a request's first text (its TTFT; every token goes
at once until some text has, as a first token's may be held back), its end, an error, a cancel,
and any hand-over before the scheduler blocks (waiting for a grammar worker or the inbox) go at
once. ``interval`` 0 hands over every step.
"""

from __future__ import annotations

DEFAULT_INTERVAL_S = 0.030


class Cadence:
    """Decides, after each step, whether the step's events go to the consumer loops now."""

    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.interval = interval
        self._last = float("-inf")
        self._urgent = False

    def urgent(self) -> None:
        """The events held now include one a client is waiting on: hand them over this step."""
        self._urgent = True

    def due(self, now: float) -> bool:
        return self._urgent or now - self._last >= self.interval

    def handed_over(self, now: float) -> None:
        self._last = now
        self._urgent = False
