"""One decode step of the running requests: its rows written, decoded, and sampled.

Apart from ``scheduler.py`` because the scheduler decides *whether* a step runs (the inbox,
admission, tokens that arrive from the grammar worker), while this module is what a step does
once ``pacing.py`` has planned its rows:

- the rows are written in sequence-id order (``_fill_batch``), one ``llama_decode`` per part
  (two when the generating rows and the prompt rows together reach a flash-attention tile,
  ``tiles.decode_parts``), with the CPU threads ``thread_tuner.py`` chooses;
- a part llama.cpp has no KV room for is rolled back and a request paused (``preempt.py``); a
  part that fails ends its requests, and too many failed steps in a row end the engine
  (``liveness.py``);
- every slot with a logits row is sampled (``rows.py``) and a prompt that reached its
  checkpoint gets one (``checkpoints.py``); the step's time teaches the pacer and the thread tuner;
- a prompt a request asked to score (an echo with logprobs) has logits in every row of its chunks,
  copied as soon as the step is decoded and reduced to each next token's score on the scoring
  worker (``scoring.py``); when the prompt is in, its first token (or, with ``max_tokens`` 0, its
  end) waits for the last scores, which go to its buyer first. Only such requests' chunks take
  that path (``_fill_prompt``): every other row costs what it did.

Everything here runs on the scheduler thread; only the reductions of scored rows run on the scoring worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import llama_cpp
import numpy as np

from .batch import Batch
from .checkpoints import save_checkpoint
from .counters import Counters
from .generation import Finish
from .liveness import Liveness, decode_status
from .logprobs import TokenLogprob, scored_rows
from .outbox import Outbox
from .pacing import PrefillPacer
from .preempt import KvPressure
from .rows import RowSampler
from .slots import Plan, Slot, Task
from .thread_tuner import StepThreads
from .tiles import decode_parts
from .types import EngineError

log = logging.getLogger(__name__)


class StepRunner:
    """Runs the scheduler's steps over the slots it shares with the scheduler and admission; owns
    the step's ``Batch`` and the sampler of its rows."""

    def __init__(
        self, ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, slots: list[Slot], waiting: deque[Task],
        pacer: PrefillPacer, threads: StepThreads, kv: KvPressure, out: Outbox, liveness: Liveness, counters: Counters,
        *, n_batch: int, n_vocab: int, max_draft: int, apart: bool,
    ) -> None:
        self._ctx = ctx
        self._memory = memory
        self._slots = slots
        self._waiting = waiting
        self._batch = Batch(n_batch)
        self._pacer = pacer
        self._threads = threads
        self._rows = RowSampler(ctx, memory, self._batch, n_vocab, counters)
        self._prompted: list[tuple[Slot, int, int, int, bool]] = []
        """This step's chunks of prompts to score or end (``_fill_prompt``): slot, first row and
        position, rows, whether the prompt ends there."""
        for slot in slots:
            slot.scored_rows = scored_rows(n_vocab)
        self.offthread = self._rows.offthread
        """The grammar worker, whose tokens the scheduler takes between steps (``offthread.py``)."""
        self._kv = kv
        self._out = out
        self._liveness = liveness
        self._counters = counters
        self._max_draft = max_draft
        self._apart = apart
        """Whether a step whose rows reach a tile decodes streams' and prompt rows apart (``model.tiled_cpu_attention``)."""

    def run(self) -> bool:
        """One step of every slot with a row to add, in one ``llama_decode`` or two (``decode_parts``);
        False when none has (all await a token). ``_decode`` tells ``liveness`` how each went: a
        step counts as failed only when none of its decodes succeeded."""
        plan = self._pacer.plan(self._slots, self._batch.capacity, self._memory)
        if not plan:
            return False
        work = self._pacer.step_work(plan)
        alone = len(plan) == 1 and not self._waiting
        threads = self._threads.before(work.prompt_tokens > 0)
        started = time.perf_counter()
        rows, decoding = 0, 0.0
        for part in decode_parts(plan) if self._apart else [plan]:
            seconds = self._decode(part, alone)
            if seconds is None:  # rolled back for KV room, or failed: the step is not learned from
                if rows:  # an earlier part decoded: the step is no failed one
                    self._liveness.decoded()
                return True
            rows, decoding = rows + self._batch.size, decoding + seconds
        self._pacer.observe(work, time.perf_counter() - started)
        self._threads.after(threads, work, rows, decoding)
        return True

    def _fill_batch(self, plan: Plan, alone: bool) -> list[Slot]:
        """Write the planned rows in sequence-id order: llama.cpp groups only consecutive sequence
        ids into one forward pass, so rows in any other order split the step into more passes.
        ``alone``: the step's only slot, nobody waiting (a slot may then add a draft)."""
        batch = self._batch
        batch.clear()
        if self._prompted:
            self._prompted = []
        plan = sorted(plan, key=lambda item: item[0].seq_id)
        for slot, chunk in plan:
            if chunk is None:
                token = slot.next_token
                slot.row = batch.add(token, slot.n_cached, slot.seq_id)
                slot.record_one(token)
                slot.next_token = None
                if alone and self._max_draft and not slot.backend_sampled:
                    self._rows.add_draft(slot, batch)
            elif slot.task.prompt_logprobs is not None or not slot.task.max_completion:  # type: ignore[union-attr]
                slot.row = self._fill_prompt(slot, chunk)
            else:
                # A resumed request already has its next token (``resume_token``): no logits.
                sample = slot.n_cached + len(chunk) == len(slot.prompt) and slot.resume_token is None
                row = batch.add_chunk(chunk, slot.n_cached, slot.seq_id, logits_for_last=sample)
                slot.record(chunk)
                slot.row = row if sample else -1
        return [slot for slot, _ in plan]

    def _fill_prompt(self, slot: Slot, chunk: np.ndarray) -> int:
        """A chunk of a prompt to score, or of one that generates nothing (``max_tokens`` 0); its
        sampled row or -1. While scores are missing, every row has logits but the prompt's last
        one, unless it is sampled: row ``p`` scores token ``p + 1``."""
        task = slot.task
        assert task is not None
        end = slot.n_cached + len(chunk)
        last = end == len(slot.prompt) and slot.resume_token is None
        sample = last and task.max_completion > 0
        scoring = task.scoring
        first = self._batch.size
        row = self._batch.add_chunk(
            chunk, slot.n_cached, slot.seq_id, logits_for_last=sample or (scoring and end < len(task.prompt)), logits_for_all=scoring
        )
        if scoring or last:
            self._prompted.append((slot, first, slot.n_cached, len(chunk), last))
        slot.record(chunk)
        return row if sample else -1

    def _after_prompts(self) -> set[Slot]:
        """Hand this step's scored prompt rows to the scoring worker. A prompt that is in and was
        scored waits for its scores: its first token is held (``_hold``; these slots are returned),
        or, with ``max_tokens`` 0, its end, until the worker has them all (``Outbox.scored``). One
        of ``max_tokens`` 0 that was not scored ends now (its usage counts the prompt)."""
        held = set()
        for slot, row, position, count, last in self._prompted:
            task = slot.task
            assert task is not None
            if task.scoring:
                self._rows.score_prompt(task, row, position, count)
            if last and task.prompt_logprobs is not None:
                held.add(slot)
                if not task.max_completion:  # no token to sample: the end waits
                    slot.pending = self._rows.scoring.after(task.prompt_scores, None, None)
            elif last and not task.max_completion:
                self._out.end_slot(slot, Finish("length", slot.usage()))
        self._prompted = []
        return held

    def _hold(self, slot: Slot, token: int, logprob: TokenLogprob | None) -> int:
        """The first token after a scored prompt, held until its scores are all in (``Outbox.scored``)."""
        assert slot.task is not None
        slot.pending = self._rows.scoring.after(slot.task.prompt_scores, token, logprob)
        return 0

    def close(self) -> None:
        """Wait for the workers (the grammar's, the scores'): the scheduler thread is ending."""
        self._rows.offthread.close()
        self._rows.scoring.close()

    def _decode(self, part: Plan, alone: bool) -> float | None:
        """Decode ``part`` of a step and sample its rows; the ``llama_decode`` call's seconds, or None
        when it was rolled back (no KV room: ``preempt.py``) or failed."""
        in_batch = self._fill_batch(part, alone)
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx, self._batch.for_decode())
        seconds = time.perf_counter() - started
        if status == 1 and self._kv.relieve(part, self._slots, self._waiting):
            self._liveness.progressed()
            return None  # no KV room: rolled back and made some; the next step runs it again
        if status != 0:
            self._decode_failed(in_batch, status)
            return None
        self._liveness.decoded()
        self._rows.new_step()
        held = self._after_prompts() if self._prompted else set()
        generated = 0
        for slot in in_batch:
            if slot.row >= 0:
                generated += self._rows.sample(slot, self._hold if slot in held else self._out.token)
            elif slot.resume_token is not None and not slot.prefilling:  # resumed: carry on generating
                slot.next_token, slot.resume_token = slot.resume_token, None
        prefilled = sum(len(chunk) for _, chunk in part if chunk is not None)
        self._counters.add(prefill_tokens_total=prefilled, completion_tokens_total=generated)
        self._make_checkpoints(in_batch)
        return seconds

    def _make_checkpoints(self, in_batch: list[Slot]) -> None:
        """Slots whose prompt reached its checkpoint in this step (``checkpoints.py``)."""
        for slot in in_batch:
            if slot.n_cached in slot.checkpoints_due:
                slot.checkpoints_due.remove(slot.n_cached)
                checkpoint = save_checkpoint(self._ctx, slot.seq_id, slot.cached[: slot.n_cached])
                slot.checkpoints += [checkpoint] if checkpoint is not None else []
                self._counters.add(checkpoints_total=int(checkpoint is not None))

    def _decode_failed(self, slots: list[Slot], status: int) -> None:
        """End the batch's requests; raises ``DecodesFailing`` once too many steps in a row failed."""
        log.error("llama_decode failed with %s; failing the %d requests in the batch", decode_status(status), len(slots))
        for slot in slots:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.forget()
            error = EngineError(f"llama.cpp failed to decode this request ({decode_status(status)})")
            self._out.end_slot(slot, Finish(None, slot.usage(), error))
        self._liveness.decode_failed(status)
