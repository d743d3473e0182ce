"""Which prompt is prefilled next, and how much of it one decode step may take.

**How much.** A step holds the next token of every generating slot plus prompt chunks, so a long
prompt prefilled in one ``n_batch`` chunk makes every stream wait for the whole chunk: 2048 prompt
tokens of the 768x12 bench model on two CPU cores take about three seconds, a pause in every other
buyer's stream. While anyone is generating, the prompt share of a step is therefore sized from the
measured prefill speed so that the step stays near ``STEP_TARGET_SECONDS``; with nobody generating
a prompt still gets the whole batch, so an idle engine prefills at full speed. Before any speed is
known, a prompt next to a generating slot starts with a small chunk to learn it from.

The target is a trade measured on that machine (``bench/results/2026-12-01-prefill-pacing.json``):
a chunk costs a fixed share per step, so a 1000-token prompt next to one stream took 2.7 s in the
~45-token chunks a 0.1 s target gives, against 1.4-1.6 s for llama-server, which prefills it in one
step and stalls the stream for as long. At 0.15 s (chunks of about a hundred tokens) it took about
the same as llama-server's while the stream's largest gap stayed near 0.2 s, under the 250 ms bound
of the reliability issue.

The speed is learned from the steps themselves (seconds per prompt token, a moving average that
counts the generated rows of the step against the prompt, so it errs towards smaller chunks), so
the same code sizes chunks right on a CPU and on a GPU that is a hundred times faster.

**Which first.** A buyer judges a request by its first token (the marketplace bench counts a
request as served well when it comes within ``TTFT_TARGET_SECONDS``), so among prompts waiting to
be prefilled the one that can still make that target and has the least left goes first: shortest
remaining first is what minimises the waiting of everyone. A prompt that can no longer make it
(it arrived too long ago, or it is too long for the learned speed) goes after those that can, the
oldest first, so it is never starved: every prompt becomes one of these within the target. A
paused request being brought back (``preempt.py``) goes before all, since its buyer is already
reading its answer. And a prompt that finishes in a step does not wait for other prompts' rows
beyond the micro-batch it ends in (``room_after``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from .sharing import share_prompt
from .slots import Slot

STEP_TARGET_SECONDS = 0.15
MIN_CHUNK = 16
"""Never fewer prompt tokens than this per step, so a long prompt still makes progress. Also the
first chunk next to a generating slot, before any prefill speed is known. On the 2-core bench
machine a 32-token chunk deep in a 4k context took 220 ms and a 64-token one 330 ms, so 16 keeps
the step well under a quarter second at the price of a slower prefill while others generate."""
SMOOTHING = 0.3
TTFT_TARGET_SECONDS = 1.0


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

    def plan(self, slots: list[Slot], capacity: int, n_ubatch: int, memory: object) -> list[tuple[Slot, np.ndarray | None]]:
        """What each slot puts in the next batch of ``capacity`` rows: generating slots one token
        (``None``) first, so generation never starves, then prompt chunks in the room left."""
        plan: list[tuple[Slot, np.ndarray | None]] = [(slot, None) for slot in slots if slot.generating]
        rows = len(plan)
        room = self.budget(capacity - rows, generating=bool(plan))
        for slot in self.prefill_order(s for s in slots if s.prefilling):
            if room == 0:
                break
            if not share_prompt(slot, slots, memory):
                continue
            chunk = slot.prompt[slot.n_cached : slot.n_cached + room]
            plan.append((slot, chunk))
            rows, room = rows + len(chunk), room - len(chunk)
            if slot.n_cached + len(chunk) == len(slot.prompt):
                room = room_after(rows, room, n_ubatch)
        return plan

    def prefill_order(self, prefilling: Iterable[Slot], now: float | None = None) -> list[Slot]:
        """The prefilling slots in the order their prompts get the step's room (module docstring)."""
        now = time.monotonic() if now is None else now
        per_token = self._seconds_per_token or 0.0

        def rank(slot: Slot) -> tuple[int, float]:
            assert slot.task is not None
            if slot.resume_token is not None:
                return (0, slot.started)
            left = len(slot.prompt) - slot.n_cached
            if now - slot.task.arrived + left * per_token <= TTFT_TARGET_SECONDS:
                return (1, left)
            return (2, slot.task.arrived)

        return sorted(prefilling, key=rank)


def room_after(rows: int, room: int, n_ubatch: int) -> int:
    """Rows a step may still add once a prompt ends at row ``rows``: only those that fill the
    micro-batch it ends in, which is computed anyway, so its first token waits for no other prompt."""
    return min(room, -rows % n_ubatch)
