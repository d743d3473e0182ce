"""Host-RAM prompt cache: a slot's KV survives the slot being given to someone else.

A marketplace endpoint serves more conversations than it has slots, and each turn of a chat
resends the whole history. Without this, a conversation whose slot was taken over in the meantime
pays its full prefill again on every turn (seconds on a CPU, at 2,000 tokens). So, like
llama-server's ``--cache-ram``:

- before a slot's KV is overwritten by a request that keeps little of it, the sequence is copied
  to host memory (``llama_state_seq_get_data``), keyed by the tokens it holds;
- when a request's prompt shares a longer prefix with a saved entry than with its slot, the entry
  is copied back into the slot (``llama_state_seq_set_data``) and only the rest of the prompt is
  decoded; the entry then lives in the slot again, so it leaves the cache;
- everything stays under a byte budget, least recently used first out. An entry whose tokens are
  a prefix of a newer one is dropped: the newer one serves every prompt it could.

Copies run on the scheduler thread at admission, between decode steps: about a millisecond per
30 MB, far less than decoding the same tokens again.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import llama_cpp
import numpy as np

from .slots import Slot

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_MIB = 8192  # llama-server's --cache-ram default
DEFAULT_SHARE_OF_AVAILABLE = 0.25
# Below these, a save or a restore costs more bookkeeping than the prefill it spares.
MIN_SAVED_TOKENS = 32
MIN_RESTORE_GAIN = 16


def default_budget_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """A quarter of the memory available now, at most llama-server's 8 GiB default."""
    available = _available_bytes(meminfo)
    return min(DEFAULT_MAX_MIB, int(available * DEFAULT_SHARE_OF_AVAILABLE) // MIB)


def _available_bytes(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    size = min(len(a), len(b))
    same = a[:size] == b[:size]
    return size if same.all() else int(np.argmin(same))


@dataclass(frozen=True)
class Entry:
    tokens: np.ndarray
    state: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.tokens.nbytes


class PromptCache:
    """Saved sequence states by token prefix, under ``budget`` bytes, least recently used evicted first.

    Pure bookkeeping: the llama.cpp copies live in ``save_sequence`` / ``restore_sequence``.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._keys = count()

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, tokens: np.ndarray) -> bool:
        """True when some entry already starts with all of ``tokens`` (saving them again is useless)."""
        return any(common_prefix(entry.tokens, tokens) == len(tokens) for entry in self._entries.values())

    def put(self, tokens: np.ndarray, state: np.ndarray) -> bool:
        """Keep ``state`` (the KV of exactly ``tokens``); False when it alone exceeds the budget."""
        entry = Entry(np.array(tokens, dtype=np.int32), state)
        if entry.nbytes > self.budget:
            return False
        for key in [k for k, e in self._entries.items() if common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
            self._remove(key)
        while self._entries and self.nbytes + entry.nbytes > self.budget:
            self._remove(next(iter(self._entries)))
        self._entries[next(self._keys)] = entry
        self.nbytes += entry.nbytes
        return True

    def best(self, prompt: np.ndarray, room: int | None = None) -> tuple[int, int] | None:
        """(key, shared prefix) of the entry sharing the longest prefix with ``prompt``, if any,
        among those of at most ``room`` tokens."""
        found = None
        for key, entry in self._entries.items():
            if room is not None and len(entry.tokens) > room:
                continue
            shared = common_prefix(entry.tokens, prompt)
            if shared and (found is None or shared > found[1]):
                found = (key, shared)
        return found

    def take(self, key: int) -> Entry:
        """Remove and return an entry (it goes back into a slot)."""
        entry = self._entries[key]
        self._remove(key)
        return entry

    def _remove(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def save_sequence(ctx: llama_cpp.llama_context_p, seq_id: int) -> np.ndarray | None:
    """A host copy of one sequence's KV, or None when llama.cpp could not write it.

    The copy lives in its own anonymous mapping rather than on the malloc heap: entries of a few
    to tens of MB come and go all the time, and once glibc has freed one such block it serves
    blocks up to that size from the heap, where freed ones are rarely given back to the system.
    A mapping goes back whole when its entry is dropped, so the process holds what the cache
    holds, not its high-water mark.
    """
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    if size <= 0:
        return None
    state = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data(ctx, _pointer(state), size, seq_id)
    return state if written == size else None


def restore_sequence(ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, seq_id: int, state: np.ndarray) -> bool:
    """Replace sequence ``seq_id``'s KV with a saved copy; on failure the sequence is left empty."""
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    if llama_cpp.llama_state_seq_set_data(ctx, _pointer(state), state.nbytes, seq_id) == state.nbytes:
        return True
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    return False


def _pointer(array: np.ndarray) -> ctypes.POINTER(ctypes.c_uint8):
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


class HostPromptCache:
    """The scheduler's side: decides, at admission, what to save from a slot and what to put back."""

    def __init__(self, ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, budget: int) -> None:
        self._ctx = ctx
        self._memory = memory
        self.entries = PromptCache(budget)

    def prepare(self, slot: Slot, prompt: np.ndarray, prefix: int, room: int | None = None, rival: int = 0) -> int:
        """``slot`` is about to serve ``prompt`` and holds ``prefix`` of it; returns what it holds after.

        What the slot would lose is saved first (when worth it), then the entry sharing the longest
        prefix with the prompt is restored into the slot if it beats what the slot has, and the
        ``rival`` prefix another slot could lend (``sharing.py``), and fits the ``room`` left in
        the KV cache (which the slots share: ``preempt.py``).
        """
        if slot.n_cached - prefix >= MIN_SAVED_TOKENS:
            self.save(slot)
        found = self.entries.best(prompt, room)
        if found is None or found[1] < max(prefix, rival) + MIN_RESTORE_GAIN:
            return prefix
        key, shared = found
        entry = self.entries.take(key)
        slot.forget()
        if not restore_sequence(self._ctx, self._memory, slot.seq_id, entry.state):
            log.warning("could not restore a cached prompt of %d tokens into slot %d", len(entry.tokens), slot.seq_id)
            return 0
        slot.record(entry.tokens)
        log.debug("slot %d: restored %d cached tokens (%d shared with the prompt)", slot.seq_id, len(entry.tokens), shared)
        return shared

    def save(self, slot: Slot) -> None:
        """Copy what the slot holds to host memory, unless an entry already covers it."""
        tokens = slot.cached[: slot.n_cached]
        if self.entries.holds(tokens):
            return
        state = save_sequence(self._ctx, slot.seq_id)
        if state is not None and self.entries.put(tokens, state):
            log.debug("slot %d: saved %d tokens (%d bytes); cache %d entries, %d bytes",
                      slot.seq_id, len(tokens), state.nbytes, len(self.entries), self.entries.nbytes)
