"""Turning a decode step's logits rows into tokens, one slot at a time.

A slot's row is sampled in one of three ways: on the host with the request's own chain (the
default), by llama.cpp inside the graph (``backend_sampling``), or, for a grammar request, on the
grammar worker (``offthread``) so the step never waits for it. A prompt being scored has its rows
copied for the scoring worker (``scoring``). A slot that carried a prompt-lookup
draft (``speculative``) has one row per drafted token: they are sampled in order while the
sampled token is the drafted one, and the unconfirmed rest leaves the KV cache.

A request with vLLM's ``min_tokens`` has its end-of-generation and stop tokens' logits set to -inf
in llama.cpp's logits row, row by row, until that many tokens are out: its sampler then never
takes the plain greedy path nor the backend (``build_sampler``, ``backend_sampling.supports``),
so the common path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable

import llama_cpp
import numpy as np

from . import backend_sampling
from .batch import Batch
from .counters import Counters
from .logprobs import TokenLogprob, token_logprob
from .offthread import OffThreadSampling
from .sampling import StepWinners
from .scoring import OffThreadScoring
from .slots import NO_DRAFT, Slot, Task
from .speculative import lookup

OnToken = Callable[[Slot, int, "TokenLogprob | None"], int]
"""Streams one sampled token of a slot; returns the completion tokens it counts for (0 or 1)."""


class RowSampler:
    def __init__(
        self, ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, batch: Batch, n_vocab: int, counters: Counters
    ) -> None:
        self._ctx = ctx
        self._memory = memory
        self._n_vocab = n_vocab
        self._counters = counters
        self._winners = StepWinners(n_vocab, batch)
        self.offthread = OffThreadSampling()
        self.scoring = OffThreadScoring()

    def new_step(self) -> None:
        """After each decode: greedy rows' winners are taken afresh, all at once (``sampling.py``)."""
        self._winners.clear()

    def add_draft(self, slot: Slot, batch: Batch) -> None:
        """Prompt lookup: append a guess of the slot's next tokens to the batch, each with logits."""
        assert slot.task is not None
        room = min(slot.task.max_completion - slot.completion_tokens - 1, batch.free)
        draft = lookup(slot.cached[: slot.n_cached], min(slot.drafts.wanted(), room)).copy()
        for token in draft:
            batch.add(int(token), slot.n_cached, slot.seq_id)
            slot.record_one(int(token))
        slot.draft = draft

    def sample(self, slot: Slot, on_token: OnToken) -> int:
        """Sample the slot's row; with a draft, go on row by row while the sampled token is the drafted one.

        Returns the completion tokens produced. A grammar request is sampled off the thread instead:
        0 for now, its token arrives through ``offthread.ready``.
        """
        if self._plain_greedy(slot):
            token = slot.task.sampler.argmax.pick(self._ctx, slot.row, self._winners)  # type: ignore[union-attr]
            slot.row = -1
            return on_token(slot, token, None)
        if self.offthread.wanted(slot):
            self.offthread.dispatch(slot, self._ctx)
            slot.row = -1
            return 0
        draft, slot.draft = slot.draft, NO_DRAFT
        first_row, generated, accepted = slot.row, 0, 0
        for i in range(len(draft) + 1):
            slot.row = first_row + i
            task = slot.task
            if task is not None and slot.completion_tokens < task.min_tokens and task.ends is not None:
                self._hold_back_ends(slot.row, task.ends)
            token = self._token(slot)
            generated += on_token(slot, token, self._logprob(slot, token))
            if slot.task is None or i == len(draft) or token != draft[i]:
                break
            accepted += 1
        slot.row = -1
        if len(draft):
            self._settle_draft(slot, len(draft), accepted)
        return generated

    @staticmethod
    def _plain_greedy(slot: Slot) -> bool:
        """A greedy request with no draft, no logprobs and its sampling on the host: its token is
        the step's argmax for its row (``StepWinners``), taken without the general path's calls
        (1-2 µs a row with warm caches, more right after a decode; ``bench/step_sections.py``)."""
        task = slot.task
        if task is None or task.sampler.argmax is None:
            return False
        return task.logprobs is None and not slot.draft.size and not slot.backend_sampled

    def _hold_back_ends(self, row: int, ends: np.ndarray) -> None:
        """``min_tokens``: the row's end tokens cannot be sampled (its greedy pick, off the step's
        ``StepWinners``, reads the row itself: ``ArgmaxPick`` is never built for such a request)."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, row)
        if pointer:
            np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))[ends] = -np.inf

    def _token(self, slot: Slot) -> int:
        assert slot.task is not None
        if slot.backend_sampled:
            return backend_sampling.sample(self._ctx, slot.task.sampler.sampler, slot.row)
        return slot.task.sampler.sample(self._ctx, slot.row, self._winners)

    def _logprob(self, slot: Slot, token: int) -> TokenLogprob | None:
        """Only for requests that asked: a pass over the vocabulary's logits per token."""
        top_n = slot.task.logprobs if slot.task is not None else None
        return None if top_n is None else token_logprob(self._ctx, slot.row, self._n_vocab, token, top_n)

    def score_prompt(self, task: Task, first_row: int, position: int, count: int) -> None:
        """Score the prompt tokens that rows ``first_row`` .. ``first_row + count - 1`` (positions
        from ``position``) predict and that have no score yet: row ``p`` scores token ``p + 1``. The
        rows are copied now; the scoring worker reduces them."""
        prompt, scores = task.prompt, task.prompt_scores
        start = max(0, scores.taken - position)  # rows whose token is scored already (decoded again)
        stop = min(count, len(prompt) - 1 - position)  # the prompt's last row predicts no prompt token
        if start < stop:
            tokens = prompt[position + start + 1 : position + stop + 1]
            self.scoring.reduce(scores, self._ctx, first_row + start, stop - start, self._n_vocab, tokens, task.prompt_logprobs or 0)

    def _settle_draft(self, slot: Slot, drafted: int, accepted: int) -> None:
        """Count the draft, and drop its unconfirmed tokens from the KV cache."""
        slot.drafts.update(drafted, accepted)
        self._counters.add(draft_tokens_total=drafted, draft_accepted_total=accepted)
        valid = slot.n_cached - drafted + accepted
        if valid < slot.n_cached:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, valid, -1)
            slot.n_cached = valid
