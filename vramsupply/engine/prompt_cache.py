"""Host-RAM prompt cache: a slot's KV survives the slot being given to someone else.

A marketplace endpoint serves more conversations than it has slots, and each turn of a chat
resends the whole history. Without this, a conversation whose slot was taken over in the meantime
pays its full prefill again on every turn (seconds on a CPU, at 2,000 tokens). So, like
llama-server's ``--cache-ram``:

- before a slot's KV is overwritten by a request that keeps little of it, the sequence is copied
  to host memory (``llama_state_seq_get_data``), keyed by the tokens it holds;
- when a request's prompt shares a longer prefix with a saved entry than with its slot, the entry
  is copied back into the slot (``llama_state_seq_set_data``) and only the rest of the prompt is
  decoded; the entry then lives in the slot again, so it leaves the cache (when the prompt shares
  no more than the prefix the entry shares with others, only that prefix is copied back, and the
  entry stays for its own conversation);
- everything stays under a byte budget, least recently used first out, and within what recent
  restores reach into the cache (``working_set.py``): the budget is a ceiling, not a target. An
  entry whose tokens are a prefix of a newer one is dropped: the newer one serves every prompt it
  could;
- a prefix that saved conversations share (their system prompt) is stored once, and each entry
  keeps only the KV after it (``cache_entries.py``). Copies of part of a sequence go through a
  spare sequence id, since llama.cpp saves and restores whole sequences only.

Copies run on the scheduler thread at admission, between decode steps. On the bench CPU a
2,000-token sequence of the bench model (18.5 MB) saved in 3 ms with flash attention off and 23 ms
with it on, its cells consecutive, far less than decoding the same tokens again; but without flash
attention V is stored transposed, and 300 tokens decoded beside another sequence took 59 ms (with
it on, 0.3 ms); ``save_policy.py`` decides from the measured cost and reuse whether a save pays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np

from vramsupply.host.cgroups import PROC_SELF
from vramsupply.host.memory import MEMINFO, available_bytes

from .cache_entries import Base, Entry, PromptCache
from .checkpoints import Checkpoint
from .counters import Counters
from .save_policy import SavePolicy
from .seq_state import load_state, save_state
from .slots import Slot

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_MIB = 8192  # llama-server's --cache-ram default
DEFAULT_SHARE_OF_AVAILABLE = 0.25
# Below this, a save costs more bookkeeping than the prefill it may spare.
MIN_SAVED_TOKENS = 32
# A restore copies the whole entry back, so it must spare prefilling at least one token per this
# many tokens it copies: a few tokens' KV copy in well under the time of a decode step, and a
# short prompt (a 6-token question behind a saved 130-token answer) still gets its shared words
# back, as a slot that kept them would give them (llama-server keeps them in the slot). Before,
# a restore had to spare 16 tokens, and such a prompt's first token took twice as long.
RESTORE_TOKENS_PER_GAINED = 64
# A prefix shorter than this is not worth storing apart from the entries that share it.
MIN_BASE_TOKENS = 64
# The cache keeps at least this much before any restore shows how deep they reach (working_set.py).
LEAST_KEPT_BYTES = 32 * MIB


def default_budget_mib(meminfo: Path = MEMINFO, proc: Path = PROC_SELF) -> int:
    """A quarter of the memory available now (within the process's cgroup limit), at most llama-server's 8 GiB default."""
    return min(DEFAULT_MAX_MIB, int((available_bytes(meminfo, proc) or 0) * DEFAULT_SHARE_OF_AVAILABLE) // MIB)


def budget_mib(requested: int | None, meminfo: Path = MEMINFO, proc: Path = PROC_SELF) -> int:
    """``--cache-ram`` as given (warned about when more than this process may use: the cache would
    grow into swap or the OOM killer), else the default."""
    if requested is None:
        return default_budget_mib(meminfo, proc)
    available = available_bytes(meminfo, proc)
    if available is not None and requested * MIB > available:
        log.warning("--cache-ram %d MiB is more than the %d MiB of memory available now: the prompt cache could drive the machine into swap or the OOM killer", requested, available // MIB)
    return requested


def save_sequence(ctx: llama_cpp.llama_context_p, seq_id: int) -> np.ndarray | None:
    """A host copy of one sequence's KV (``seq_state.py``), or None when llama.cpp could not write it."""
    return save_state(ctx, seq_id)


def restore_sequence(ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, seq_id: int, state: np.ndarray) -> bool:
    """Replace sequence ``seq_id``'s KV with a saved copy; on failure the sequence is left empty."""
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    if load_state(ctx, seq_id, state):
        return True
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    return False


def worth_restoring(entry_tokens: int, gained: int) -> bool:
    """Whether copying back an entry of ``entry_tokens`` tokens to prefill ``gained`` fewer pays."""
    return gained >= 1 and gained * RESTORE_TOKENS_PER_GAINED >= entry_tokens


class HostPromptCache:
    """The scheduler's side: decides, at admission, what to save from a slot and what to put back.

    With ``whole`` (models whose state cannot be cut back, ``Model.copies_prefixes``), only an
    entry that the prompt starts with entirely is restored. ``scratch`` is a sequence id no slot
    uses (the context has one more sequence than slots), or None. With it, entries that start with
    a prefix another entry shares keep only the KV after that prefix, and the prefix is kept once
    (``cache_entries.py``); without it (one KV stream per slot, or a recurrent state), every entry
    is whole. ``prefill_seconds`` (seconds to prefill so many tokens, 0 while unknown) lets
    ``save_policy.py`` skip saves that cost more than their expected reuse spares; without it every
    slot worth keeping is saved.
    """

    def __init__(
        self,
        ctx: llama_cpp.llama_context_p,
        memory: llama_cpp.llama_memory_t,
        budget: int,
        scratch: int | None = None,
        whole: bool = False,
        prefill_seconds: Callable[[int], float] | None = None,
        counters: Counters | None = None,
    ) -> None:
        self._ctx = ctx
        self._memory = memory
        self._scratch = scratch
        self._whole = whole
        # At least the KV of the whole context stays: all that one park or pause moves out at once.
        self.entries = PromptCache(budget, floor_tokens=llama_cpp.llama_n_ctx(ctx), least_bytes=LEAST_KEPT_BYTES)
        self.policy = SavePolicy(prefill_seconds)
        self._counters = counters or Counters()

    def prepare(self, slot: Slot, prompt: np.ndarray, prefix: int, room: int | None = None, rival: int = 0) -> int:
        """``slot`` is about to serve ``prompt`` and holds ``prefix`` of it; returns what it holds after.

        What the slot would lose is saved first (when worth it), then the entry sharing the longest
        prefix with the prompt is restored into the slot if it beats what the slot has, and the
        ``rival`` prefix another slot could lend (``sharing.py``), and fits the ``room`` left in
        the KV cache (which the slots share: ``preempt.py``).
        """
        if slot.n_cached - prefix >= MIN_SAVED_TOKENS:
            self.save(slot)
        have = max(prefix, rival)

        def gain(length: int, shared: int) -> int:
            """Prompt tokens restoring an entry of ``length`` tokens, ``shared`` of them with the prompt, spares."""
            fits = room is None or length <= room
            return shared - have if fits and worth_restoring(length, shared - have) else 0

        found = self.entries.best(prompt, room, self._whole)
        spared = gain(self.entries.length(found[0]), found[1]) if found is not None else 0
        self.policy.admitted(spared, prompt, gain)
        missed = self.entries.admitted(prompt, have + spared)
        if missed:
            log.debug("a dropped entry would have given %d tokens where %d were: the cache keeps to %d bytes now",
                      missed, have + spared, self.entries.bound)
        if found is None or not spared:
            return prefix
        key, shared = found
        base = self.entries.base_for(prompt)
        if base is not None and shared <= len(base.tokens):
            # Only the stored shared prefix: the entry that holds it stays for its own conversation.
            # Taking it, as before, threw a cached chat away to serve a new one its system prompt.
            return self._put_back(slot, Entry(base.tokens, base.state), shared)
        return self._put_back(slot, self.entries.take(key, shared), shared)

    def _put_back(self, slot: Slot, entry: Entry, shared: int) -> int:
        """Restore ``entry`` as all of ``slot``; returns the prompt tokens the slot holds after."""
        slot.forget()
        if not self._restore(slot.seq_id, entry):
            log.warning("could not restore a cached prompt of %d tokens into slot %d", len(entry.tokens), slot.seq_id)
            return 0
        slot.record(entry.tokens)
        slot.checkpoints = list(entry.checkpoints)  # what the slot holds now was checkpointed there (checkpoints.py)
        log.debug("slot %d: restored %d cached tokens (%d shared with the prompt)", slot.seq_id, len(entry.tokens), shared)
        return shared

    def save(self, slot: Slot, certain: bool = False) -> None:
        """Copy what the slot holds to host memory, unless an entry already covers it or the copy
        is not worth its cost (``save_policy.py``). ``certain``: it will be wanted back (a paused
        request's, ``preempt.py``), so only the copy's cost is weighed against the prefill's."""
        tokens = slot.cached[: slot.n_cached]
        if self.entries.holds(tokens):
            return
        if not self.policy.worth_saving(len(tokens), certain):
            self.policy.skipped(tokens)
            self._counters.add(prompt_cache_skipped_saves_total=1)
            log.debug("slot %d: not saving %d tokens (reuse %.2f)", slot.seq_id, len(tokens), self.policy.reuse)
            return
        with self.policy.timed(len(tokens)):
            stored = self._copy(slot.seq_id, tokens, tuple(slot.valid_checkpoints()))
        if stored:
            self._counters.add(prompt_cache_saves_total=1)

    def _copy(self, seq_id: int, tokens: np.ndarray, checkpoints: tuple[Checkpoint, ...] = ()) -> bool:
        """Copy ``seq_id``'s KV into the cache as ``tokens`` (with the sequence's checkpoints, for a
        state that cannot be cut back); False when llama.cpp could not write it or it does not fit
        the budget."""
        base = self._base_for(seq_id, tokens)
        if base is None:
            state = save_sequence(self._ctx, seq_id)
        else:
            state = self._save_range(seq_id, len(base.tokens), len(tokens))
        if state is None or not self.entries.put(tokens, state, base, checkpoints):
            return False
        log.debug("slot %d: saved %d tokens (%d bytes, %d after a shared prefix); cache %d entries, %d bases, %d bytes, kept to %d",
                  seq_id, len(tokens), state.nbytes, len(tokens) - (len(base.tokens) if base else 0),
                  len(self.entries), self.entries.bases, self.entries.nbytes, self.entries.kept_to)
        return True

    def _base_for(self, seq_id: int, tokens: np.ndarray) -> Base | None:
        """The stored prefix ``tokens`` start with, or a new one cut from ``seq_id`` when they share
        at least MIN_BASE_TOKENS with an entry; None when neither, or without a scratch sequence."""
        if self._scratch is None:
            return None
        base = self.entries.base_for(tokens)
        if base is not None:
            return base
        shared = self.entries.longest_shared(tokens)
        if shared < MIN_BASE_TOKENS:
            return None
        state = self._save_range(seq_id, 0, shared)
        return None if state is None else Base(np.array(tokens[:shared], dtype=np.int32), state)

    def _save_range(self, seq_id: int, start: int, end: int) -> np.ndarray | None:
        """A host copy of the KV of positions [start, end) of ``seq_id``, made through the scratch
        sequence: its cells are only tagged with the scratch id, never duplicated."""
        scratch = self._scratch
        llama_cpp.llama_memory_seq_rm(self._memory, scratch, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, seq_id, scratch, start, end)
        try:
            return save_sequence(self._ctx, scratch)
        finally:
            llama_cpp.llama_memory_seq_rm(self._memory, scratch, -1, -1)

    def _restore(self, seq_id: int, entry: Entry) -> bool:
        """Put ``entry`` back as all of ``seq_id``; a tail after a base goes through the scratch
        sequence, as restoring a sequence replaces whatever it held."""
        if entry.base is None:
            return restore_sequence(self._ctx, self._memory, seq_id, entry.state)
        if not restore_sequence(self._ctx, self._memory, seq_id, entry.base.state):
            return False
        scratch = self._scratch
        restored = restore_sequence(self._ctx, self._memory, scratch, entry.state)
        if restored:
            llama_cpp.llama_memory_seq_cp(self._memory, scratch, seq_id, -1, -1)
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, scratch, -1, -1)
        return restored
