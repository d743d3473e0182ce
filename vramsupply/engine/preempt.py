"""When the slots' shared KV cache runs out: pause the youngest request and bring it back later.

The slots share one KV cache of ``context_length`` cells, as llama-server's do (``model.py``):
4 slots cost the memory of one context, and any one request may still use all of it. The price
is that slots together can outgrow it. ``llama_decode`` then returns 1 and leaves the KV as it
was (llama.cpp prepares every micro-batch before computing any). Failing the batch would fail
requests that fit alone, so, like vLLM's preemption:

1. the step's bookkeeping is rolled back (``rollback``): the tokens ``_fill_batch`` recorded,
   the drafts it added, the next tokens it consumed;
2. idle slots' leftover KV (kept for prefix reuse) goes first, saved to the host prompt cache
   when there is one;
3. otherwise the youngest active request is paused: its KV is removed and its task, with its
   sampler, stop-string and detokenizer state, goes back to the front of the waiting queue
   (``Slot.suspend``). Admission holds off until some request ends, then it resumes and carries
   on: nothing is streamed twice, nothing lost, its usage unchanged. With the host prompt cache
   on (the default), its KV is copied there first, so it resumes by copying it back (tens of
   milliseconds at most for 2,000 tokens of the bench model on its CPU, ``prompt_cache.py``; as
   vLLM's swap preemption), not by prefilling its prompt and the tokens it had generated again
   (seconds on a CPU at a few thousand tokens);
   the save policy still weighs the copy's measured cost against the prefill's (a GPU may
   recompute faster than it copies interleaved cells, ``save_policy.py``), with the reuse
   certain, and leaves a copy that would hold every stream past ``MAX_PAUSE_COPY_SECONDS`` to
   the recompute, which runs in paced steps. The KV copied back is bit for bit the one it had.
   Without the cache, when the copy does not pay, or when the entry was evicted meanwhile, it
   prefills them again (recompute);
4. the scheduler runs the step again without it.

The oldest request is never paused, so it always finishes and frees room. A request alone that
still cannot decode is a real failure.

Pausing stops the paused buyer's answer until another request ends (and, when its KV is not
kept in host memory, throws its prefill away), so admission avoids it up front (``fits``): a
waiting request whose prompt does not fit beside the active ones (counting their prompts whole,
and room for each, and for itself, to generate what its ``max_tokens`` still allows, up to
``growth_cap`` cells) stays in the queue until room frees up, as vLLM admits only what its free
blocks hold. With only a little room for each to grow, a long prompt admitted beside answers
still under way was prefilled and then paused, or paused one of them, as they grew (5 pauses
and 5,344 tokens recomputed in one run of the marketplace bench at 0.8 conv/s; throughput rose
1-12 % on four such traces with the reserve, ``bench/results/…-growth-reserve-ab.json``).

A cell that several sequences share (a borrowed prefix, the prompt of ``n`` choices) is counted
once (``Slot.cells``), and so is the prefix of the waiting prompt that it will keep or borrow:
counted once per slot, a system prompt that four conversations share held back admissions that
fit. On the marketplace bench with 24 conversations, requests admitted into a
nearly full cache were paused part way through their prompts and answered 2.5-4.6 s late.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence

import llama_cpp

from . import backend_sampling
from .counters import Counters
from .prompt_cache import HostPromptCache
from .slots import NO_DRAFT, Plan, Slot, Task, distinct_cells

log = logging.getLogger(__name__)


HEADROOM_PER_SLOT = 32
"""The fewest KV cells kept free per active request when admitting another."""
GROWTH_RESERVE = 256
"""The most KV cells kept free per active request for what it will still generate."""


def growth_cap(n_ctx: int, slots: int) -> int:
    """The most cells kept free per request: ``GROWTH_RESERVE``, and never more than half the
    cache with every slot busy, so that short requests still fill every slot (16 buyers of a
    4096-token context get 128 each, not 256)."""
    return max(HEADROOM_PER_SLOT, min(GROWTH_RESERVE, n_ctx // (2 * slots)))


def growth(task: Task, generated: int, cap: int) -> int:
    """Cells admission keeps free for a request that has generated ``generated`` tokens: what its
    ``max_tokens`` still allows, within [``HEADROOM_PER_SLOT``, ``cap``]."""
    return max(HEADROOM_PER_SLOT, min(task.max_completion - generated, cap))


def used_cells(active: Sequence[Slot]) -> int:
    """Cells the active slots hold in the shared cache (each once, however many sequences share
    it), plus those their prompts will take; a later choice of an ``n`` > 1 request that has not
    copied its sibling's prompt yet will decode only its last prompt token (``sharing.py``)."""
    coming = 0
    for slot in active:
        task = slot.task
        prompt = len(slot.prompt)
        start = max(slot.n_cached, prompt - 1) if task is not None and task.shares_prompt_with is not None else slot.n_cached
        coming += max(0, prompt - start)
    return distinct_cells(active) + coming


def rollback(plan: Plan, memory: llama_cpp.llama_memory_t) -> None:
    """Undo what filling the batch recorded, for a step whose decode changed nothing."""
    for slot, chunk in plan:
        if chunk is None:  # its next token, then any draft
            slot.n_cached -= 1 + len(slot.draft)
            slot.next_token = int(slot.cached[slot.n_cached])
            slot.draft = NO_DRAFT
        else:
            slot.n_cached -= len(chunk)
        slot.row = -1
        llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, slot.n_cached, -1)


class KvPressure:
    """Makes room in the shared KV cache after a decode found none (see the module docstring)."""

    def __init__(
        self,
        ctx: llama_cpp.llama_context_p,
        memory: llama_cpp.llama_memory_t,
        counters: Counters,
        prompt_cache: HostPromptCache | None,
        slots: int,
    ) -> None:
        self._ctx = ctx
        self._memory = memory
        self._counters = counters
        self._prompt_cache = prompt_cache
        self._unified = llama_cpp.llama_n_ctx_seq(ctx) == llama_cpp.llama_n_ctx(ctx)
        self._growth_cap = growth_cap(llama_cpp.llama_n_ctx_seq(ctx), slots)
        self.held = False
        """True from a preemption until a request ends: admitting more now would only thrash."""

    def room(self, slot: Slot, slots: Sequence[Slot]) -> int:
        """KV cells ``slot`` may fill: its own stream, or what the other slots leave of the shared one."""
        others = distinct_cells([s for s in slots if s is not slot]) if self._unified else 0
        return llama_cpp.llama_n_ctx_seq(self._ctx) - others

    def admission_room(self, slots: Sequence[Slot]) -> int | None:
        """Cells a waiting prompt may take now: what the active requests leave of the shared cache,
        less what each of them may still generate (``growth``); None when any
        prompt may start (a cache per slot, or nobody running). Admitting one that does not fit
        would only fill the cache part way through its prompt and pause it (or another) again,
        wasting the prefill. Computed once per admission pass (``fits`` per waiting request)."""
        active = [slot for slot in slots if slot.task is not None]
        if not self._unified or not active:
            return None
        headroom = sum(growth(slot.task, slot.completion_tokens, self._growth_cap) for slot in active if slot.task is not None)
        return llama_cpp.llama_n_ctx_seq(self._ctx) - used_cells(active) - headroom

    def fits(self, task: Task, room: int, held: int = 0) -> bool:
        """Whether ``task``'s prompt, and what it may generate, fit in ``room`` (``admission_room``). ``held``: the prefix of
        its prompt whose cells are in the cache already, to be kept or borrowed (``sharing.py``);
        those cost nothing more."""
        # a later choice copies its sibling's prompt cells and decodes only the last prompt token
        need = 1 if task.shares_prompt_with is not None else len(task.to_prefill) - held
        return need + growth(task, task.resume.completion_tokens if task.resume else 0, self._growth_cap) <= room

    def holding(self, busy: bool) -> bool:
        """Whether admission must wait: a request was paused for KV space and none has ended since."""
        self.held = self.held and busy
        return self.held

    def relieve(self, plan: Plan, slots: Sequence[Slot], waiting: deque[Task]) -> bool:
        """Roll the step back and free some KV; False when nothing can give way (a real failure)."""
        rollback(plan, self._memory)
        if self._evict_idle(slots):
            log.debug("the KV cache is full: dropped the cached prefixes of the idle slots")
            return True
        active = [slot for slot in slots if slot.task is not None]
        candidates = [slot for slot in active if slot.pending is None and (slot.generating or slot.prefilling)]
        if len(active) < 2 or not candidates:
            return False
        rows = sum(1 if chunk is None else len(chunk) for _, chunk in plan)
        log.debug("the KV cache is full: slots hold %s cells, the step planned %d rows", [s.n_cached for s in slots], rows)
        self._preempt(max(candidates, key=lambda slot: slot.started), waiting)
        return True

    @property
    def parks_idle(self) -> bool:
        """Whether idle slots give up their KV after each admission (``park_idle``); if not, a
        shared cache keeps it for their conversations' next turns (``slots.choose_slot``'s ``kept``)."""
        return self._unified and self._prompt_cache is not None

    def park_idle(self, slots: Sequence[Slot]) -> None:
        """After admitting requests into a shared KV cache with a prompt cache: move what the idle
        slots still hold to host memory, as llama-server does (``cache_idle_slots``).

        Every sequence's attention spans the used range of the shared cache, so idle slots' old
        prompts left in it slow every step of everyone else (in the marketplace bench, 37 against
        22 ms per output token) and fill it until requests must be paused. A later request that
        shares such a prefix gets it back from the prompt cache.
        """
        if self.parks_idle and self._evict_idle(slots):
            log.debug("parked the cached prefixes of idle slots in the prompt cache")

    def _evict_idle(self, slots: Sequence[Slot]) -> bool:
        idle = [slot for slot in slots if slot.task is None and slot.n_cached > 0]
        for slot in idle:
            if self._prompt_cache is not None:
                self._prompt_cache.save(slot)
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.forget()
        return bool(idle)

    def _preempt(self, slot: Slot, waiting: deque[Task]) -> None:
        if slot.backend_sampled:
            backend_sampling.detach(self._ctx, slot.seq_id)  # attached again when it resumes
            slot.backend_sampled = False
        if self._prompt_cache is not None:
            self._prompt_cache.save(slot, certain=True)  # it resumes from host memory (module docstring)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        task = slot.suspend()
        slot.forget()
        waiting.appendleft(task)
        self.held = True
        self._counters.add(busy=-1, preemptions_total=1)
        log.debug(
            "the KV cache is full: paused request %s in slot %d (%d tokens to recompute when it resumes)",
            task.id, slot.seq_id, len(task.resume.tokens) if task.resume else 0,
        )
