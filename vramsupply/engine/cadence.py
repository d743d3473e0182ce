"""How often the scheduler wakes the consumer event loops while answers are under way.

Each hand-over (``generation.post``) wakes an event loop, which then writes an SSE chunk per
stream. At one stream on a CPU that wake-up comes after every 6 ms decode step and runs on the
same cores as the decode's spinning threads: the event loop's 0.24 ms of CPU per token there was
the whole measured gap to llama-server at c=1 (``bench/profile.py``). A reader cannot tell tokens
that arrive every 6 ms from pairs that arrive every 12, so mid-answer tokens are handed over at
most once per ``interval``, like a display that refreshes 60 to 100 times a second; whatever the
steps in between produced goes in the same hand-over, and so into the same SSE write.

Nothing that a client waits on is held back: a request's first text (its TTFT; every token goes
at once until some text has, as a first token's may be held back), its end, an error, a cancel, and any hand-over before the scheduler blocks (waiting for a grammar worker or
the inbox) go at once. With 4 or more streams a step takes longer than the interval, so every
step hands over, as before. ``interval`` 0 hands over every step.
"""

from __future__ import annotations

DEFAULT_INTERVAL_S = 0.012


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
