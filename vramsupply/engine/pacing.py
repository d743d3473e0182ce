"""Which prompt is prefilled next, and how much of it one decode step may take.

**How much.** A step holds the next token of every generating slot plus prompt chunks, so a long
prompt prefilled in one ``n_batch`` chunk makes every stream wait for the whole chunk: 2048 prompt
tokens of the 768x12 bench model on two CPU cores take about three seconds, a pause in every other
buyer's stream. While anyone is generating, each prompt chunk is therefore sized so that the step
stays near ``STEP_TARGET_SECONDS``: the generating rows' part of a step is learned from steps
without prompts, and a chunk's cost from its size and depth (``step_cost.py``: a token costs more
the deeper it sits, and on a CPU about half as much in a step of whole 64-row flash-attention
tiles, where chunks end when they can). Before anything is known, a prompt starts with a small
chunk to learn from, next to a generating slot and alone. With nobody generating a prompt gets at
most one micro-batch (``n_ubatch``) per step, and no more than ``ALONE_STEP_TARGET_SECONDS`` of
work: about the same speed as the whole batch (llama.cpp computes a batch one micro-batch at a
time anyway, and a 192-token chunk prefilled as fast as a 512-token one on this CPU), but a short
prompt that arrives meanwhile waits for one such step, not for the whole long prompt.

The target is a trade measured on that machine (``bench/prefill.py`` and ``bench/worst_case.py``;
results in ``bench/results/``): a step beside a stream costs a fixed share on top of its prompt
rows, so small chunks prefill slowly; but every step is a gap in the streams, bounded at 250 ms by
the reliability issue, and the gap a buyer sees is the step plus the time to write the token to
them. With one seconds-per-token figure learned from past steps, which lags a deepening prompt,
the target had to be 0.13 s (a 1000-token prompt beside a stream answered in 2.6 s, against 1.6 s
for llama-server, which prefills it in one step and so stalls the stream for as long). Knowing the
depth, and correcting by how far the latest steps came out from the model, it is 0.16 s: the
1000-token prompt answers in 1.4 s (median of 3; llama-server 1.3 s, stalling the stream 1.3 s),
and a 2048-token prompt beside a stream left gaps of 181-230 ms in four rounds. At 0.17 s two
rounds in five came within 10 ms of the bound (without that correction).

The costs are learned apart beside streams and alone: a prompt prefilled alone runs whole
micro-batches at a lower cost per token, which would size the next paced chunk too big. So the
same code sizes chunks right on a CPU and on a GPU that is a hundred times faster.

A prompt that can no longer answer within the target, even at its speed alone, gets less than the
step's target: only what the streams still serving their buyers well can spare
(``service_level.py``), so that under overload a prompt that is late already does not make every
stream late too.

**Tiles.** Beside streams, a whole 64-row tile may go in place of a smaller chunk, and a step
whose rows reach a tile is decoded in two calls: ``tiles.py`` says why and when.

**Which first.** A buyer judges a request by its first token (the marketplace bench counts a
request as served well when it comes within ``TTFT_TARGET_SECONDS``), so prompts are prefilled
earliest deadline first, which is oldest first, among those that can still make the target
(judged by what is left to prefill, at the learned cost of its depth),
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
which would only delay its first token, except whole prompts that end in the same step and together
cost no more than the step did so far (at most doubling its time): when 16 short questions arrive at
once they start in a few steps, not one a step (the 16th waited 16 steps). In two runs of 8
alternating rounds at c=16 (``bench/ab_level.py``) the TTFT p95 went from 555 and 571 ms to 343 and
338, the median up from 136 and 140 ms to 181 and 202 (the first prompt of a step now shares it),
the mean down from 216 to 202 ms, and tok/s 1.11 and 1.01x.

"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from itertools import islice
from typing import NamedTuple

import numpy as np

from .sharing import rewind_for_tile, share_prompt
from .prompt_cache import HostPromptCache
from .service_level import TTFT_TARGET_SECONDS, step_allowance
from .slots import Plan, Slot, Task
from .step_cost import TILE_ROWS, Smoothed, StepCost, work
from .tiles import tile_budget, tile_in_place

log = logging.getLogger(__name__)

STEP_TARGET_SECONDS = 0.16
ALONE_STEP_TARGET_SECONDS = 0.4
"""With nobody generating: at most a micro-batch, and no longer than this, which is how long a
request arriving meanwhile waits for the step to end (a 512-token micro-batch took 0.8 s here)."""
FIRST_ALONE_ROWS = 2 * TILE_ROWS
"""With nobody generating and no speed known yet (the first prompt after start), a step takes at
most this many prompt rows, two whole flash-attention tiles, to learn from. A whole micro-batch
first (512 rows, about a second on the 2-core bench CPU) kept a request arriving meanwhile waiting
for all of it: in a marketplace replay two first turns came 0.4 s apart at start, about 950 and 345
tokens to prefill, and answered in 1.58 and 1.72 s; sized from a learned cost after a first step of
this size, the second can be taken up after a fifth of a second."""
MIN_CHUNK = 16
"""Never fewer prompt tokens than this per step, so a long prompt still makes progress. Also the
first chunk next to a generating slot, before any prefill speed is known. On the 2-core bench
machine a 32-token chunk deep in a 4k context took 220 ms and a 64-token one 330 ms, so 16 keeps
the step well under a quarter second at the price of a slower prefill while others generate.

It is also the fewest prompt rows a step learns that speed from, so while it is unknown, whole
prompts that end in the same step as the first get at least ``MIN_CHUNK - 1`` rows of room after
it (beside a stream, under ``2 * MIN_CHUNK`` prompt rows in all). Without that, short prompts beside a stream right after
start went in one a step (9 tokens each: 16 rows held one), no step had the rows to learn from, and
the 16th of a burst of 16 got its first token 282-487 ms after the burst (``bench/first_burst.py``;
now 191-211 ms)."""
COMPANION_SECONDS = 0.05
"""Whole prompts ending in a step where another ends may always add this much to it. Doubling the
step alone let a burst of 16 five-token questions in two at a time with nobody generating (a step
of one is a few ms), so the 16th got its first token 0.4-0.6 s after the first; 50 ms (a twentieth
of the TTFT target) delays the first by as little."""
MAX_DEFER_SECONDS = 10.0
"""A request put behind others (because it could no longer answer within the target) for this
long goes first: the bound on how long anyone is deferred under overload."""
ADMISSION_WINDOW = 32
MAX_GENERATING_SHARE = 0.75
"""Judging how long a prompt will take beside streams, their rows are taken to use at most this
share of each step (the rest is the prompt's)."""


def companion_seconds(step: float, left: float | None) -> float:
    """How many more predicted seconds whole prompts ending in the same step as another may add:
    what the step cost so far (so that prompt's first token comes at most twice as late), or
    ``COMPANION_SECONDS`` if that is more, within the ``left`` of the step's target; unbounded
    while no prefill speed is known (``left`` None: every prompt is predicted to cost nothing, and
    the step's rows bound them, as they bound the first chunk then)."""
    return math.inf if left is None else min(max(step, COMPANION_SECONDS), left)


class StepWork(NamedTuple):
    """What a planned step carries, for learning its cost: measured before the batch is filled."""

    prompt_tokens: int
    depth_tokens: float
    """The prompt tokens' depths summed (``step_cost.work``)."""
    generating: bool


def _spared_by_streams(allowance: float | None, seconds: float, step: float) -> tuple[float, int]:
    """The seconds left for late prompts in a step whose generating rows take ``step``, within what
    the streams on track spare (``service_level.step_allowance``: ``allowance``), and the smallest
    first chunk: none when they spare nothing (a step of their rows alone gives them more)."""
    if allowance is None:
        return seconds, MIN_CHUNK
    return max(min(seconds, allowance - step), 0.0), 0


class PrefillPacer:
    def __init__(self, n_ubatch: int, rewinds: bool = False) -> None:
        self._n_ubatch = n_ubatch
        self._rewinds = rewinds
        """Whether a prompt's cached tokens can be cut off and decoded again (attention KV, not a
        recurrent state), to pad the end of a prompt to a whole tile (``_pad_to_tile``)."""
        self._paced = StepCost()
        """Prompt rows' cost in steps beside generating slots: what sizes their chunks."""
        self._alone = StepCost()
        """The same in steps with nobody generating, which run whole micro-batches and cost less
        per token: kept apart, or a prompt prefilled alone would size the next paced chunk too big."""
        self._generating = Smoothed()
        """Seconds of a step that carries generating rows only: their part of a paced step."""

    @staticmethod
    def step_work(plan: Plan) -> StepWork:
        chunks = [(len(chunk), slot.n_cached) for slot, chunk in plan if chunk is not None]
        tokens = sum(size for size, _ in chunks)
        return StepWork(tokens, sum(work(size, depth) for size, depth in chunks), len(chunks) < len(plan))

    def observe(self, step: StepWork, seconds: float) -> None:
        """A step planned as ``step`` took ``seconds`` (decode and sampling)."""
        if step.prompt_tokens == 0:
            if step.generating:
                self._generating.observe(seconds)
            return
        if step.prompt_tokens < MIN_CHUNK:  # too few to tell the prompt's cost from the rest of the step
            return
        if step.generating:
            seconds -= self._generating.value or 0.0
        cost, rows = self._cost(step.generating), step.prompt_tokens  # decoded apart from the generating rows
        if log.isEnabledFor(logging.DEBUG):
            log.debug("prompt rows %d (mean depth %.0f): %.3f s, predicted %.3f s", step.prompt_tokens,
                      step.depth_tokens / step.prompt_tokens, seconds, cost.predict(rows, step.prompt_tokens, step.depth_tokens))
        cost.observe(rows, step.prompt_tokens, step.depth_tokens, seconds)

    def plan(self, slots: list[Slot], capacity: int, memory: object) -> Plan:
        """What each slot puts in the next batch of ``capacity`` rows: generating slots one token
        (``None``) first, so generation never starves, then prompt chunks in the room left, each
        as big as the step's time target allows at its depth."""
        plan: list[tuple[Slot, np.ndarray | None]] = [(slot, None) for slot in slots if slot.generating]
        generating, streams = bool(plan), len(plan)
        room, seconds = self._room(capacity - len(plan), generating), self._seconds_for_prompts(generating)
        cost = self._cost(generating)
        step = (self._generating.value or 0.0) if generating else 0.0  # the step's predicted seconds so far
        now = time.monotonic()
        order = self.prefill_order((s for s in slots if s.prefilling), now, paced=generating)
        seconds, floor, tile = self._budgets(slots, order, now, seconds, step) if generating else (seconds, MIN_CHUNK, None)
        rows = 0  # the prompt rows so far: a tile is theirs alone (``tiles.decode_parts``)
        for at, slot in enumerate(order):
            if room == 0:
                break
            if not share_prompt(slot, slots, memory):
                continue
            first, left = len(plan) == 0 or plan[-1][1] is None, len(slot.prompt) - slot.n_cached
            if seconds is not None and self._pad_to_tile(slot, left, rows, room, seconds, cost, slots, memory):
                left = len(slot.prompt) - slot.n_cached
            most = min(room, left, slot.before_checkpoint or left)  # a checkpoint is made between steps
            size = most
            if seconds is not None:
                size = min(size, max(floor if first else 0, cost.tokens_within(seconds, slot.n_cached, rows, size)))
                size = tile_in_place(cost, size, most, rows, slot.n_cached, tile) if tile is not None else size
                chunk_seconds = cost.seconds(size, slot.n_cached, rows)
                seconds, step = seconds - chunk_seconds, step + chunk_seconds
            if size == 0 or (not first and size < min(MIN_CHUNK, left)):
                break  # no time left for a useful chunk
            plan.append((slot, slot.prompt[slot.n_cached : slot.n_cached + size]))
            room, rows = room - size, rows + size
            if size == left:  # its first token waits for no other prompt's rows, but for those of
                free = capacity - streams - rows  # (never past the batch, however small --n-batch is)
                room = room if seconds is not None else max(room, min(MIN_CHUNK - 1, free))  # to learn from (MIN_CHUNK)
                plan += self._companions(order[at + 1 :], slots, memory, room, rows, companion_seconds(step, seconds), cost)
                break  # prompts that end in this step too, up to doubling its time (or COMPANION_SECONDS)
        return plan

    def _budgets(
        self, slots: list[Slot], order: list[Slot], now: float, seconds: float | None, step: float
    ) -> tuple[float | None, int, tuple[float, float | None] | None]:
        """Beside streams whose rows take ``step``: the seconds for prompt rows, the smallest first
        chunk, and what a whole tile may take (``tiles.tile_budget``), all within what the streams on
        track spare when the first prompt in ``order`` is late."""
        if seconds is None:
            return None, MIN_CHUNK, None
        late = bool(order) and self._late(order[0], now)
        spare = step_allowance(slots, now) if late else None  # (None: no stream is on track)
        seconds, floor = _spared_by_streams(spare, seconds, step) if late else (seconds, MIN_CHUNK)
        return seconds, floor, tile_budget(step, late, spare)

    def _late(self, slot: Slot, now: float) -> bool:
        """Whether ``slot``'s prompt, the first in prefill order, can no longer answer within the
        target even at its best speed, prefilled as if alone (nor must it go next): it yields to the
        streams on track (``service_level.py``). Judged at the paced speed, as the order is, a
        prompt a little over the target yielded, which made it surely late: 450 tokens beside a
        young stream answered in 1.2 s where llama-server took 0.53."""
        assert slot.task is not None
        left = len(slot.prompt) - slot.n_cached
        return self._urgency(slot.task, left, slot.n_cached, now, slot.resume_token is not None, paced=False)[0] == 2

    def _pad_to_tile(  # noqa: PLR0913 (the step's state so far, as plan holds it)
        self, slot: Slot, left: int, rows: int, room: int, seconds: float, cost: StepCost, slots: list[Slot], memory: object
    ) -> bool:
        """Cut the cached tokens before the ``left`` last of ``slot``'s prompt that make its step (of
        ``rows`` rows so far) a whole tile, to decode them again with them, when that prefills the
        end sooner (``StepCost.pays_to_pad``)."""
        pad = TILE_ROWS - rows - left
        if not self._rewinds or pad <= 0 or left + pad > room or slot.before_checkpoint is not None:
            return False
        if not cost.pays_to_pad(left, pad, slot.n_cached, seconds):
            return False
        return rewind_for_tile(slot, pad, slots, memory)

    @staticmethod
    def _companions(
        order: list[Slot], slots: list[Slot], memory: object, room: int, rows: int, allowance: float, cost: StepCost
    ) -> list[tuple[Slot, np.ndarray | None]]:
        """Whole prompts that end in a step where another prompt ends, in prefill order, whose
        predicted seconds together stay within ``allowance`` (``companion_seconds``) and whose rows
        fit ``room`` (the step has ``rows`` so far)."""
        chosen: list[tuple[Slot, np.ndarray | None]] = []
        for slot in order:
            if allowance <= 0 or room == 0:
                break
            if slot.before_checkpoint is not None or not share_prompt(slot, slots, memory):
                continue  # (a prompt whose checkpoint is due cannot end in this step)
            left = len(slot.prompt) - slot.n_cached
            seconds = cost.seconds(left, slot.n_cached, rows)  # 0 while nothing is known
            if left <= room and seconds <= allowance + 1e-9:  # (float sums of equal costs)
                chosen.append((slot, slot.prompt[slot.n_cached :]))
                room, rows, allowance = room - left, rows + left, allowance - seconds
        return chosen

    def _cost(self, generating: bool) -> StepCost:
        return self._paced if generating else self._alone

    def _room(self, free_rows: int, generating: bool) -> int:
        """Rows for prompts: a micro-batch with nobody generating; a small first step to learn
        from before anything is known (``FIRST_ALONE_ROWS`` alone, ``MIN_CHUNK`` beside a stream)."""
        if not generating:
            return min(free_rows, self._n_ubatch if self._alone.known else FIRST_ALONE_ROWS)
        return free_rows if self._paced.known else min(free_rows, MIN_CHUNK)

    def _seconds_for_prompts(self, generating: bool) -> float | None:
        """Seconds of the step left for prompt rows; None while nothing is known to size them by."""
        if not self._cost(generating).known:
            return None
        if not generating:
            return ALONE_STEP_TARGET_SECONDS
        return max(STEP_TARGET_SECONDS - (self._generating.value or 0.0), 0.0)

    def prompt_seconds(self, tokens: int) -> float:
        """What prefilling ``tokens`` from depth 0 costs with nobody generating (0 while unknown):
        what restoring them from the prompt cache spares (``save_policy.py``)."""
        return self._prefill_seconds(tokens, 0, paced=False)

    def _prefill_seconds(self, left: int, depth: int, paced: bool) -> float:
        """How long ``left`` prompt tokens from ``depth`` will take to prefill (0 while unknown)."""
        cost = self._cost(paced) if self._cost(paced).known else self._cost(not paced)
        seconds = cost.whole_seconds(left, depth)
        if paced:  # generating rows share every step
            share = min((self._generating.value or 0.0) / STEP_TARGET_SECONDS, MAX_GENERATING_SHARE)
            seconds /= 1 - share
        return seconds

    def prefill_order(self, prefilling: Iterable[Slot], now: float | None = None, paced: bool = True) -> list[Slot]:
        """The prefilling slots in the order their prompts get the step's room (module docstring);
        ``paced``: others are generating, so the prompts will be prefilled in paced chunks."""
        now = time.monotonic() if now is None else now

        def rank(slot: Slot) -> tuple[int, float]:
            assert slot.task is not None
            left = len(slot.prompt) - slot.n_cached
            return self._urgency(slot.task, left, slot.n_cached, now, slot.resume_token is not None, paced)

        return sorted(prefilling, key=rank)

    def admission_order(
        self, waiting: Iterable[Task], holders: list[Slot], cache: HostPromptCache | None, paced: bool = True,
        whole: bool = False,
    ) -> list[tuple[bool, Task]]:
        """The waiting requests in the order they should take the idle slots, by the same urgency
        as ``prefill_order``, each with whether it must go next (paused, or deferred too long):
        what a request would find cached (in the slots it could start from, ``holders``: idle ones,
        and busy ones that can lend their cells, ``sharing.py``; or the host prompt cache) is not left to
        prefill. Only the ``ADMISSION_WINDOW`` oldest are weighed, which bounds the cost; a lone
        request goes next anyway, so it is marked so without the lookup. ``whole``: a state that
        cannot be cut back, reused whole or from a checkpoint (``Slot.reusable``)."""
        candidates = list(islice(waiting, ADMISSION_WINDOW))
        if len(candidates) == 1:  # nothing to weigh: skip the prompt cache lookup
            return [(True, candidates[0])]
        now = time.monotonic()

        def rank(task: Task) -> tuple[int, float]:
            tokens = task.to_prefill
            known = max((slot.reusable(tokens, whole) for slot in holders), default=0)
            found = cache.entries.best(tokens, whole=whole) if cache is not None else None
            cached = max(known, found[1] if found else 0)
            return self._urgency(task, len(tokens) - cached, cached, now, task.resume is not None, paced)

        ranked = sorted(((rank(task), task) for task in candidates), key=lambda item: item[0])
        return [(urgency[0] == 0, task) for urgency, task in ranked]

    def _urgency(self, task: Task, left: int, depth: int, now: float, resuming: bool, paced: bool) -> tuple[int, float]:
        """Lower goes first: a paused request or one deferred too long, then those that can still
        answer within the target, then the rest; oldest first within each."""
        waited = now - task.arrived
        if resuming or waited > MAX_DEFER_SECONDS:
            return (0, task.arrived)
        if waited + self._prefill_seconds(left, depth, paced) <= TTFT_TARGET_SECONDS:
            return (1, task.arrived)
        return (2, task.arrived)
