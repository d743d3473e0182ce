"""Which prompt is prefilled next, and how much of it one decode step may take.

**How much.** A step holds the next token of every generating slot plus prompt chunks, so a long
prompt prefilled in one ``n_batch`` chunk makes every stream wait for the whole chunk: 2048 prompt
tokens of the 768x12 bench model on two CPU cores take about three seconds, a pause in every other
buyer's stream. While anyone is generating, the prompt share of a step is therefore sized from the
measured prefill speed so that the step stays near ``STEP_TARGET_SECONDS``. Before any speed is
known, a prompt next to a generating slot starts with a small chunk to learn it from. With nobody
generating a prompt gets at most one micro-batch (``n_ubatch``) per step, and no more than
``ALONE_STEP_TARGET_SECONDS`` of work: about the same speed as the whole batch (llama.cpp computes
a batch one micro-batch at a time anyway, and a 192-token chunk prefilled as fast as a 512-token
one on this CPU), but a short prompt that arrives meanwhile waits for one such step, not for the
whole long prompt.

The target is a trade measured on that machine (``bench/prefill.py``, median of 3, and
``bench/worst_case.py``; results in ``bench/results/``): a step beside a stream costs a fixed share
on top of its prompt rows, so small chunks prefill slowly, with a cliff. A 1000-token prompt
beside one stream took 2.7 s at a 0.1 s target, 2.6 s at 0.13 s and 1.8 s at 0.15 s, against 1.6 s
for llama-server, which prefills it in one step and so stalls the stream for 1.6 s. But at 0.15 s
a 2048-token prompt put a 264 ms gap in the stream in one round of two, past the 250 ms bound of
the reliability issue (a prompt token costs more the deeper it goes, and the learned speed lags
behind); at 0.13 s three rounds gave 195-224 ms. The bound wins.

The speed is learned from the steps themselves (seconds per prompt token, a moving average that
counts the generated rows of the step against the prompt, so it errs towards smaller chunks), and
from paced steps only: a prompt prefilled alone runs whole micro-batches at a lower cost per token,
which would size the next paced chunk too big. So the same code sizes chunks right on a CPU and on
a GPU that is a hundred times faster.

**Which first.** A buyer judges a request by its first token (the marketplace bench counts a
request as served well when it comes within ``TTFT_TARGET_SECONDS``), so prompts are prefilled
earliest deadline first, which is oldest first, among those that can still make the target
(judged by what is left to prefill at the learned speed, which errs optimistic for long prompts),
and those that can no longer make it (they arrived too long ago, or are too long) go after them,
oldest first. Oldest first rather than shortest first: a prompt prefilled second runs next to the
first one's stream, in chunks paced as above, so putting a long prompt second costs it more than
it saves the short one. In one marketplace run two first turns arrived 0.2 s apart with about 650
and 200 tokens to prefill: shortest first answered them in 1.74 s and 0.41 s (one missed),
llama-server, batching both, in 0.81 and 0.89 s. One deferred for ``MAX_DEFER_SECONDS`` goes
before all, which bounds how long anyone waits for others under overload, and so does a paused
request being brought back (``preempt.py``), since its buyer is already reading its answer. The
same order decides which waiting request takes a slot that frees up (``admission_order``, counting
what it would find cached), so under overload a fresh question is not queued behind requests that
have already missed the target. And a step in which a prompt ends carries no other prompt's rows,
which would only delay its first token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from itertools import islice

import numpy as np

from .sharing import share_prompt
from .prompt_cache import HostPromptCache
from .slots import Slot, Task

STEP_TARGET_SECONDS = 0.13
ALONE_STEP_TARGET_SECONDS = 0.4
"""With nobody generating: at most a micro-batch, and no longer than this, which is how long a
request arriving meanwhile waits for the step to end (a 512-token micro-batch took 0.8 s here)."""
MIN_CHUNK = 16
"""Never fewer prompt tokens than this per step, so a long prompt still makes progress. Also the
first chunk next to a generating slot, before any prefill speed is known. On the 2-core bench
machine a 32-token chunk deep in a 4k context took 220 ms and a 64-token one 330 ms, so 16 keeps
the step well under a quarter second at the price of a slower prefill while others generate."""
SMOOTHING = 0.3
TTFT_TARGET_SECONDS = 1.0
MAX_DEFER_SECONDS = 10.0
"""A request put behind others (because it could no longer answer within the target) for this
long goes first: the bound on how long anyone is deferred under overload."""
ADMISSION_WINDOW = 32


class PrefillPacer:
    def __init__(self, n_ubatch: int) -> None:
        self._n_ubatch = n_ubatch
        self._paced: float | None = None
        """Seconds per prompt token in steps beside generating slots: what sizes their chunks."""
        self._alone: float | None = None
        """The same in steps with nobody generating, which run whole micro-batches and cost less
        per token: kept apart, or a prompt prefilled alone would size the next paced chunk too big."""

    def budget(self, room: int, generating: bool) -> int:
        """Prompt tokens this step may carry, out of ``room`` free batch rows."""
        if not generating:
            if self._alone is None:
                return min(room, self._n_ubatch)
            return min(room, self._n_ubatch, max(MIN_CHUNK, int(ALONE_STEP_TARGET_SECONDS / self._alone)))
        if self._paced is None:  # nothing learned yet: a small first chunk to learn from
            return min(room, MIN_CHUNK)
        return min(room, max(MIN_CHUNK, int(STEP_TARGET_SECONDS / self._paced)))

    def observe(self, prompt_tokens: int, seconds: float, paced: bool = True) -> None:
        """A step with ``prompt_tokens`` prompt rows took ``seconds`` (decode and sampling);
        ``paced``: other slots were generating in it."""
        if prompt_tokens < MIN_CHUNK:  # too few to tell the prompt's cost from the rest of the step
            return
        sample = seconds / prompt_tokens
        previous = self._paced if paced else self._alone
        learned = sample if previous is None else previous + SMOOTHING * (sample - previous)
        if paced:
            self._paced = learned
        else:
            self._alone = learned

    def plan(self, slots: list[Slot], capacity: int, memory: object) -> list[tuple[Slot, np.ndarray | None]]:
        """What each slot puts in the next batch of ``capacity`` rows: generating slots one token
        (``None``) first, so generation never starves, then prompt chunks in the room left."""
        plan: list[tuple[Slot, np.ndarray | None]] = [(slot, None) for slot in slots if slot.generating]
        room = self.budget(capacity - len(plan), generating=bool(plan))
        for slot in self.prefill_order((s for s in slots if s.prefilling), paced=bool(plan)):
            if room == 0:
                break
            if not share_prompt(slot, slots, memory):
                continue
            chunk = slot.prompt[slot.n_cached : slot.n_cached + room]
            plan.append((slot, chunk))
            room -= len(chunk)
            if slot.n_cached + len(chunk) == len(slot.prompt):
                break  # its first token waits for no other prompt's rows
        return plan

    def prefill_order(self, prefilling: Iterable[Slot], now: float | None = None, paced: bool = True) -> list[Slot]:
        """The prefilling slots in the order their prompts get the step's room (module docstring);
        ``paced``: others are generating, so the prompts will be prefilled in paced chunks."""
        now = time.monotonic() if now is None else now

        def rank(slot: Slot) -> tuple[int, float]:
            assert slot.task is not None
            return self._urgency(slot.task, len(slot.prompt) - slot.n_cached, now, slot.resume_token is not None, paced)

        return sorted(prefilling, key=rank)

    def admission_order(
        self, waiting: Iterable[Task], idle: list[Slot], cache: HostPromptCache | None, paced: bool = True
    ) -> list[tuple[bool, Task]]:
        """The waiting requests in the order they should take the idle slots, by the same urgency
        as ``prefill_order``, each with whether it must go next (paused, or deferred too long):
        what a request would find cached (in an idle slot or the host prompt cache) is not left to
        prefill. Only the ``ADMISSION_WINDOW`` oldest are weighed, which bounds the cost; a lone
        request goes next anyway, so it is marked so without the lookup."""
        candidates = list(islice(waiting, ADMISSION_WINDOW))
        if len(candidates) == 1:  # nothing to weigh: skip the prompt cache lookup
            return [(True, candidates[0])]
        now = time.monotonic()

        def rank(task: Task) -> tuple[int, float]:
            tokens = task.to_prefill
            known = max(slot.common_prefix(tokens) for slot in idle)
            found = cache.entries.best(tokens) if cache is not None else None
            left = len(tokens) - max(known, found[1] if found else 0)
            return self._urgency(task, left, now, task.resume is not None, paced)

        ranked = sorted(((rank(task), task) for task in candidates), key=lambda item: item[0])
        return [(urgency[0] == 0, task) for urgency, task in ranked]

    def _urgency(self, task: Task, left: int, now: float, resuming: bool, paced: bool) -> tuple[int, float]:
        """Lower goes first: a paused request or one deferred too long, then those that can still
        answer within the target, then the rest; oldest first within each."""
        waited = now - task.arrived
        if resuming or waited > MAX_DEFER_SECONDS:
            return (0, task.arrived)
        per_token = (self._paced or self._alone if paced else self._alone or self._paced) or 0.0
        if waited + left * per_token <= TTFT_TARGET_SECONDS:
            return (1, task.arrived)
        return (2, task.arrived)
