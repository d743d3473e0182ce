"""How much prompt one decode step may take while other slots are generating.

A step holds the next token of every generating slot plus prompt chunks, so a long prompt
prefilled in one ``n_batch`` chunk makes every stream wait for the whole chunk: 2048 prompt tokens
of the 768x12 bench model on two CPU cores take about a second, a second-long pause in every
other buyer's stream. While anyone is generating, the prompt share of a step is therefore sized
from the measured prefill speed so that the step stays near ``STEP_TARGET_SECONDS``; with nobody
generating a prompt still gets the whole batch, so an idle engine prefills at full speed. Before
any speed is known, a prompt next to a generating slot starts with a small chunk to learn it from.

The speed is learned from the steps themselves (seconds per prompt token, a moving average that
counts the generated rows of the step against the prompt, so it errs towards smaller chunks), so
the same code sizes chunks right on a CPU and on a GPU that is a hundred times faster.
"""

from __future__ import annotations

STEP_TARGET_SECONDS = 0.1
MIN_CHUNK = 16
"""Never fewer prompt tokens than this per step, so a long prompt still makes progress. Also the
first chunk next to a generating slot, before any prefill speed is known. On the 2-core bench
machine a 32-token chunk deep in a 4k context took 220 ms and a 64-token one 330 ms, so 16 keeps
the step well under a quarter second at the price of a slower prefill while others generate."""
SMOOTHING = 0.3


class PrefillPacer:
    def __init__(self) -> None:
        self._seconds_per_token: float | None = None

    def budget(self, room: int, generating: bool) -> int:
        """Prompt tokens this step may carry, out of ``room`` free batch rows."""
        if not generating:
            return room
        if self._seconds_per_token is None:  # nothing learned yet: a small first chunk to learn from
            return min(room, MIN_CHUNK)
        return min(room, max(MIN_CHUNK, int(STEP_TARGET_SECONDS / self._seconds_per_token)))

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        """A step with ``prompt_tokens`` prompt rows took ``seconds`` (decode and sampling)."""
        if prompt_tokens < MIN_CHUNK:  # too few to tell the prompt's cost from the rest of the step
            return
        sample = seconds / prompt_tokens
        previous = self._seconds_per_token
        self._seconds_per_token = sample if previous is None else previous + SMOOTHING * (sample - previous)
