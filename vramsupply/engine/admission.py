"""Which waiting request takes an idle slot, and what it starts from.

Between decode steps the scheduler thread admits waiting requests into idle slots:

- the most urgent first (``pacing.py``), and only when its prompt fits in the KV cache beside the
  running ones (``preempt.py``); one that must go next and does not fit yet keeps the room for
  itself;
- into the idle slot holding the longest prefix of its prompt (``choose_slot``);
- starting from the longest prefix found anywhere: that slot, the host prompt cache
  (``prompt_cache.py``), or cells another slot holds (``sharing.py``). At least one prompt token is
  always decoded again, because sampling needs the logits of the last one; a prompt to score
  (an echo with logprobs) is decoded from where its scores stop, since a cached position has no
  logits, and takes the emptiest slot (``_keep_limit``). A recurrent state
  cannot be cut back, so for such a model a slot is reused whole, or from its checkpoint
  (``checkpoints.py``), or not at all; and a long prompt gets a checkpoint near its end;
- then what idle slots still hold moves to the host prompt cache, so the shared KV cache holds
  only running requests.
"""

from __future__ import annotations

import logging
from collections import deque
from itertools import count

import llama_cpp
import numpy as np

from . import backend_sampling
from .checkpoints import checkpoint_positions, restore_checkpoint
from .counters import Counters
from .pacing import PrefillPacer
from .preempt import KvPressure
from .prompt_cache import MIN_SAVED_TOKENS, HostPromptCache
from .sharing import MIN_BORROW, borrow_prefix, lender, share_head
from .slots import Slot, Task, choose_slot

log = logging.getLogger(__name__)


class Admission:
    """The scheduler's admission step; it shares the scheduler's slots and waiting queue."""

    def __init__(
        self,
        ctx: llama_cpp.llama_context_p,
        memory: llama_cpp.llama_memory_t,
        slots: list[Slot],
        waiting: deque[Task],
        pacer: PrefillPacer,
        kv: KvPressure,
        prompt_cache: HostPromptCache | None,
        counters: Counters,
        kv_per_slot: bool,
        lends: bool,
        window: int | None,
        whole: bool = False,
        checkpoints: bool = False,
    ) -> None:
        self._ctx = ctx
        self._memory = memory
        self._slots = slots
        self._waiting = waiting
        self._pacer = pacer
        self._kv = kv
        self._prompt_cache = prompt_cache
        self._counters = counters
        self._packed = kv_per_slot  # see choose_slot
        self._lends = lends  # slots may borrow other slots' prefixes (sharing.py)
        self._window = window  # attention's sliding window (0: none), None for a recurrent state
        self._whole = whole  # a state that cannot be cut back: a slot is reused whole or from a checkpoint
        self._checkpoints = checkpoints  # long prompts get one (checkpoints.py)
        self._clock = count(1)

    def admit(self) -> None:
        """Move waiting tasks into idle slots; then park what idle slots still hold."""
        if self._kv.holding(busy=any(slot.task is not None for slot in self._slots)):
            return
        if self._admit_waiting():
            self._kv.park_idle(self._slots)

    def _admit_waiting(self) -> bool:
        admitted = False
        while self._waiting:
            taken, blocked = self._admit_pass()
            admitted = admitted or taken
            if blocked or not taken:
                break
        return admitted

    def _admit_pass(self) -> tuple[bool, bool]:
        """Rank the waiting requests once (``pacing.admission_order``) and admit them in that
        order, each when a slot is idle and it fits in the KV cache; returns whether any was
        admitted, and whether admission must stop for now: no slot is idle, or one that must go
        next does not fit yet, so that room is kept for it.

        Ranking once per pass instead of once per admitted request: a burst of 16 requests took
        about 0.75 ms of the scheduler thread per request to admit, about 40 % of it ranking the rest
        again (each ranking looks up every waiting prompt in every slot and the host prompt
        cache), all of it before the burst's first step (wave 2's 31st session; the median burst's
        admission went from 10.9 to 6.1 ms over HTTP, 12 bursts each way). A pass's order
        misses only the cells the requests it admits could lend the later ones; the next pass
        (when this one admitted any) sees them."""
        idle = [slot for slot in self._slots if slot.task is None]
        if not idle:
            return False, True
        paced = any(slot.generating for slot in self._slots)
        holders = [slot for slot in self._slots if slot.n_cached] if self._lends else idle  # who could lend
        taken = False
        for must, task in self._pacer.admission_order(self._waiting, holders, self._prompt_cache, paced, self._whole):
            if self._first_choice_waits(task):
                continue
            idle = [slot for slot in self._slots if slot.task is None]
            if not idle:
                return taken, True
            room = self._kv.admission_room(self._slots)
            if room is None or self._kv.fits(task, room, self._held_prefix(task, idle)):
                self._waiting.remove(task)
                self._start(task, idle)
                taken = True
            elif must:
                return taken, True
        return taken, False

    def _first_choice_waits(self, task: Task) -> bool:
        """A later choice (``n`` > 1) starts after its first: it needs one cell to fit, its first
        the whole prompt, so it fitted first under a full KV cache, decoded the prompt itself and
        lent it to the first, whose count of the request's prompt (``Tally``) then came after the
        request's was taken: the counters missed the prompt, and its usage said it was cached."""
        source = task.shares_prompt_with
        return source is not None and any(waiting is source for waiting in self._waiting)

    def _start(self, task: Task, idle: list[Slot]) -> None:
        tokens = task.to_prefill
        task.share_scores()  # a later choice whose first one was scored: it may start from a prefix
        limit = _keep_limit(task)
        scratch = limit == 0 and task.scoring  # a prompt to score from its start: no prefix serves it
        slot, prefix = choose_slot(idle, tokens[:0] if scratch else tokens, self._packed, self._whole, kept=not self._kv.parks_idle)
        shared = self._shared(tokens) if self._checkpoints else 0
        reused = self._save_before_scoring(slot) if scratch else self._reuse_prefix(slot, tokens, prefix)
        keep = self._cut(slot, tokens, min(reused, limit))
        counted_before = task.resume is not None or task.later_choice  # begin() takes task.resume
        slot.begin(task, keep, next(self._clock))
        self._plan_checkpoints(slot, keep, shared)
        if task.backend_sampling:
            slot.backend_sampled = backend_sampling.attach(self._ctx, slot.seq_id, task.sampler.for_backend())
        # A request's prompt counts once, however many choices, and a resumed one (preempt.py) is counted.
        if counted_before:
            self._counters.add(busy=1)
        else:  # counted once it serves its buyer something (``Tally``)
            self._counters.add(busy=1)
            task.tally.prompt_tokens, task.tally.cached_tokens = len(task.prompt), keep

    def _save_before_scoring(self, slot: Slot) -> int:
        """A prompt to score starts from nothing: what ``slot`` holds goes to the host prompt cache
        first, as any prompt's slot's would (``HostPromptCache.prepare``); returns 0."""
        if self._prompt_cache is not None and slot.n_cached >= MIN_SAVED_TOKENS:
            self._prompt_cache.save(slot)
        return 0

    def _cut(self, slot: Slot, tokens: np.ndarray, keep: int) -> int:
        """Drop the slot's KV after ``keep``, and return what it keeps: ``keep``; else, when llama.cpp
        cannot cut there (a recurrent state) or the cells the rest of the prompt attends to are gone
        (a sliding window), its checkpoint's tokens when it has one and the prompt starts with them;
        else nothing."""
        seq_id = slot.seq_id
        if llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep, -1) and not self._lost_cells(seq_id, keep):
            return keep
        if self._checkpoints:
            keep = self._back_to_checkpoint(slot, tokens, keep)
            if keep and not self._lost_cells(seq_id, keep):
                return keep
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        return 0

    def _back_to_checkpoint(self, slot: Slot, tokens: np.ndarray, keep: int) -> int:
        """Put the slot's checkpoint back, and cut the sequence after it, when the prompt shares
        its tokens within ``keep`` (then that is what is kept); else keep nothing."""
        checkpoint = slot.checkpoint_for(tokens, keep)
        if checkpoint is None:
            return 0
        if not restore_checkpoint(self._ctx, self._memory, slot.seq_id, checkpoint):
            log.warning("could not restore slot %d's checkpoint of %d tokens", slot.seq_id, len(checkpoint.tokens))
            slot.forget()
            return 0
        log.debug("slot %d: back to its checkpoint after %d tokens", slot.seq_id, len(checkpoint.tokens))
        self._counters.add(checkpoint_restores_total=1)
        return len(checkpoint.tokens)

    def _plan_checkpoints(self, slot: Slot, keep: int, shared: int) -> None:
        """Where the slot's new prompt gets checkpoints (``checkpoint_positions``). Of those it has and
        still holds, it keeps the shortest (the start other conversations share, which the new
        prompt's own will not replace), unless two new ones are due."""
        if not self._checkpoints:
            return
        kept = [c for c in slot.valid_checkpoints() if len(c.tokens) <= keep]
        slot.checkpoints_due = checkpoint_positions(len(slot.prompt), keep, shared)
        slot.checkpoints = [min(kept, key=lambda c: len(c.tokens))] if kept and len(slot.checkpoints_due) < 2 else []

    def _shared(self, tokens: np.ndarray) -> int:
        """The longest prefix of ``tokens`` that a sequence in a slot or the host prompt cache holds:
        what conversations share (a system prompt), or this one's history. A scan like the prompt
        cache's own lookups: about 4 us an entry for prompts of hundreds to thousands of tokens on
        the 2-core bench VM (0.7 ms at 200 entries; an entry of a recurrent model holds a whole
        state, tens of MB on a real one, so a budget holds few)."""
        held = max((slot.common_prefix(tokens) for slot in self._slots), default=0)
        cached = self._prompt_cache.entries.longest_shared(tokens) if self._prompt_cache is not None else 0
        return max(held, cached)

    def _lost_cells(self, seq_id: int, keep: int) -> bool:
        """Whether positions the tokens after ``keep`` attend to are missing from the sequence. A
        sliding-window model's cache may overwrite cells that left every window (llama.cpp then
        drops the oldest positions of that sequence), so a prefix kept, restored or borrowed may
        start late: like llama-server, it is reused only while the last window before ``keep``
        (with full attention, all of it) is there. Not for recurrent state, which has no cells."""
        if keep == 0 or self._window is None:
            return False
        oldest_needed = max(0, keep - self._window) if self._window > 0 else 0
        return llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id) > oldest_needed

    def _reuse_prefix(self, slot: Slot, tokens: np.ndarray, prefix: int) -> int:
        """What ``slot``, holding ``prefix`` of ``tokens``, starts from: the longest prefix found
        in it, the host prompt cache, or another slot's cells (``sharing.py``)."""
        offer = lender(slot, tokens, self._slots) if self._lends else None
        borrowable = offer[1] if offer is not None else 0
        if self._prompt_cache is not None:
            room = self._kv.room(slot, self._slots)
            prefix = self._prompt_cache.prepare(slot, tokens, prefix, room, rival=borrowable)
        if offer is not None and borrowable >= prefix + MIN_BORROW:
            borrow_prefix(slot, offer[0], borrowable, self._memory)
            log.debug("slot %d: borrowed %d prompt tokens from slot %d", slot.seq_id, borrowable, offer[0].seq_id)
            return borrowable
        if offer is not None and self._window == 0:  # (a windowed cache may have lost the lender's first cells)
            share_head(slot, offer[0], min(borrowable, prefix), self._memory)
        return prefix

    def _held_prefix(self, task: Task, idle: list[Slot]) -> int:
        """How much of ``task``'s prompt is already in cells the active requests hold (so counted
        in ``admission_room``), for it to keep or borrow: those cost no more room. The rest of a
        prefix that an idle slot keeps is in no active request's cells, so it takes room as any
        prompt does (counting it free let a 500-token prompt start beside a growing answer that
        then had to be paused). The last token is always decoded again."""
        counted = [slot.cells[: slot.n_cached] for slot in self._slots if slot.task is not None and slot.n_cached]
        if not counted:
            return 0
        active_cells = np.concatenate(counted)
        tokens = task.to_prefill
        best = 0
        for slot in self._slots if self._lends else idle:
            prefix = slot.reusable(tokens, self._whole)
            if prefix > best:
                best = max(best, int(np.isin(slot.cells[:prefix], active_cells).sum()))
        return min(best, _keep_limit(task))


def _keep_limit(task: Task) -> int:
    """How much of its prompt ``task`` may start from, kept or borrowed: all but the last token
    (sampling needs its logits), or, while its prompt is being scored, the positions before the
    first row still to decode for that (``Task.scoring``)."""
    limit = len(task.to_prefill) - 1
    return min(limit, task.prompt_scores.taken) if task.scoring else limit
