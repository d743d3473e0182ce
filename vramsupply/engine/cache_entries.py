"""The host prompt cache's bookkeeping: saved KV states by token prefix, under a byte budget.

Pure Python and numpy, no llama.cpp: ``prompt_cache.py`` makes the copies and decides when.

**A prefix that several entries share is stored once.** Marketplace chats run behind one system
prompt, so every saved conversation starts with the same few hundred tokens: kept whole, each
entry would carry its own copy of their KV (2.8 MB per entry for a 300-token prompt on the bench
model, tens of entries at a time). An entry may instead hold only the KV after a ``Base``, a
prefix kept once for all the entries that start with it; a base lives while some entry uses it.

    Entry(tokens=system + chat A, base=B, state=KV of chat A)  ─┐
    Entry(tokens=system + chat B, base=B, state=KV of chat B)  ─┼─> Base(tokens=system, state=its KV)
    Entry(tokens=other prompt, base=None, state=KV of it all)

**A state that cannot be cut back** (``checkpoints.py``) is stored whole, with the slot's
checkpoints: such an entry serves a prompt that starts with all of its tokens, or with one of its
checkpoints'.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import numpy as np

from .checkpoints import Checkpoint
from .working_set import WorkingSet

MAX_COLD = 64
"""Token lists of entries dropped for the working-set bound, kept to notice that they were wanted."""
MIN_MISSED_TOKENS = 32
"""A cold entry counts as a miss when it would have given at least this many more prompt tokens
than the admission got (``prompt_cache.MIN_SAVED_TOKENS``: below it, a save is not worth making)."""


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest prefix ``a`` and ``b`` share. Admission calls it thousands of times a
    burst (every waiting prompt against every slot, entry and ghost), so it makes three numpy
    calls where ``.all()`` made four: 1.2 us instead of 3.0 on the bench VM."""
    size = min(len(a), len(b))
    if size == 0:
        return 0
    same = a[:size] == b[:size]
    first = int(same.argmin())  # the first difference; 0 when there is none
    return size if same[first] else first


class Ghosts:
    """Token lists of KV that was not kept, without the KV (a few KB each): a prompt that comes
    back for one shows what keeping it would have given. ``save_policy.py`` keeps those of saves
    it skipped, ``PromptCache`` those of entries it dropped for the working-set bound."""

    def __init__(self, size: int) -> None:
        self._lists: deque[np.ndarray] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._lists)

    def add(self, tokens: np.ndarray) -> None:
        self._lists.append(np.array(tokens, dtype=np.int32))

    def claim(self, prompt: np.ndarray, score: Callable[[int, int], int], least: int = 1) -> int:
        """The best ``score(ghost's length, prefix it shares with prompt)`` among the ghosts, when
        it is at least ``least``; that ghost is dropped (the prompt that wanted it is served now).
        0 when none scores so. It runs on the scheduler thread at each admission: 64 ghosts of
        2,000 tokens that share a 300-token prefix with the prompt took 0.22 ms on the bench CPU."""
        scores = [score(len(tokens), common_prefix(tokens, prompt)) for tokens in self._lists]
        best = max(range(len(scores)), key=scores.__getitem__, default=None)
        if best is None or scores[best] < least:
            return 0
        del self._lists[best]
        return scores[best]


@dataclass(eq=False)
class Base:
    """A prefix stored once: ``state`` is the KV of exactly ``tokens``."""

    tokens: np.ndarray
    state: np.ndarray
    users: int = 0

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.tokens.nbytes


@dataclass(frozen=True)
class Entry:
    """A saved sequence of ``tokens``: ``state`` holds the KV of all of them, or, with a ``base``,
    only of those after it."""

    tokens: np.ndarray
    state: np.ndarray
    base: Base | None = None
    checkpoints: tuple[Checkpoint, ...] = ()

    @property
    def nbytes(self) -> int:
        """What the entry holds itself, its base not included."""
        extra = sum(c.nbytes for c in self.checkpoints)
        return self.state.nbytes + self.tokens.nbytes + extra

    def serves(self, prompt: np.ndarray, whole: bool) -> int:
        """How much of ``prompt`` restoring this entry gives (with ``whole``: all its tokens when
        the prompt starts with them, else its longest checkpoint's that it starts with, else nothing)."""
        shared = common_prefix(self.tokens, prompt)
        if not whole or shared == len(self.tokens):
            return shared
        return max((len(c.tokens) for c in self.checkpoints if c.serves(prompt)), default=0)


class PromptCache:
    """Entries under ``budget`` bytes (bases counted once), least recently used evicted first, and
    within the bound that recent restores reach (``working_set.py``; at least the KV of
    ``floor_tokens`` tokens, and ``least_bytes``)."""

    def __init__(self, budget: int, floor_tokens: int = 0, least_bytes: int = 0) -> None:
        self.budget = budget
        self.nbytes = 0
        self.working = WorkingSet(floor_tokens, least_bytes)
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._keys = count()
        self._cold = Ghosts(MAX_COLD)
        self.kept_to = budget
        """The bound as of the last save: read by other threads (``EngineStats``), an int."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bases(self) -> int:
        return len(self._bases())

    def holds(self, tokens: np.ndarray) -> bool:
        """True when some entry already starts with all of ``tokens`` (saving them again is useless)."""
        return any(common_prefix(entry.tokens, tokens) == len(tokens) for entry in self._entries.values())

    def base_for(self, tokens: np.ndarray) -> Base | None:
        """The longest base that ``tokens`` start with."""
        fitting = [base for base in self._bases() if common_prefix(base.tokens, tokens) == len(base.tokens) < len(tokens)]
        return max(fitting, key=lambda base: len(base.tokens), default=None)

    def longest_shared(self, tokens: np.ndarray) -> int:
        """The longest prefix ``tokens`` share with any entry."""
        return max((common_prefix(entry.tokens, tokens) for entry in self._entries.values()), default=0)

    def put(self, tokens: np.ndarray, state: np.ndarray, base: Base | None = None, checkpoints: tuple[Checkpoint, ...] = ()) -> bool:
        """Keep ``state`` (the KV of ``tokens``, after ``base`` if given); False when it does not fit
        the budget even alone."""
        entry = Entry(np.array(tokens, dtype=np.int32), state, base, checkpoints)
        if entry.nbytes + (base.nbytes if base is not None else 0) > self.budget:
            return False
        self._use(entry)
        for key in [k for k, e in self._entries.items() if common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
            self._remove(key)
        while self._entries and self.nbytes + entry.nbytes > self.budget:
            self._remove(next(iter(self._entries)))
        self._entries[next(self._keys)] = entry
        self.nbytes += entry.nbytes
        self._keep_to_bound()
        return True

    @property
    def bound(self) -> int:
        """The bytes the cache keeps to now (``working_set.py``), within the budget."""
        return self.working.bound(self.budget, self._bytes_per_token())

    def admitted(self, prompt: np.ndarray, served: int) -> int:
        """A request was admitted with ``served`` tokens of ``prompt`` kept or restored: when an
        entry dropped for the bound would have given at least ``MIN_MISSED_TOKENS`` more, the
        bound was too tight, and grows (``WorkingSet.missed``). Returns the tokens it would have given."""
        gained = self._cold.claim(prompt, lambda _, shared: shared - served, least=MIN_MISSED_TOKENS)
        if not gained:
            return 0
        self.working.missed(self.kept_to)
        return served + gained

    def _keep_to_bound(self) -> None:
        """Drop the oldest entries past the bound (never the newest), keeping their token lists."""
        bound = self.kept_to = self.bound
        while len(self._entries) > 1 and self.nbytes > bound:
            key = next(iter(self._entries))
            self._cold.add(self._entries[key].tokens)
            self._remove(key)

    def _bytes_per_token(self) -> float:
        """Host bytes of one token's KV, from the entries held (0 while there are none)."""
        states = [(entry.state.nbytes, len(entry.tokens) - (len(entry.base.tokens) if entry.base else 0)) for entry in self._entries.values()]
        tokens = sum(n for _, n in states)
        return sum(b for b, _ in states) / tokens if tokens > 0 else 0.0

    def best(self, prompt: np.ndarray, room: int | None = None, whole: bool = False) -> tuple[int, int] | None:
        """(key, shared prefix) of the entry sharing the longest prefix with ``prompt``, if any,
        among those of at most ``room`` tokens (and, with ``whole``, all of whose tokens start
        ``prompt``, or one of its checkpoints': ``Entry.serves``)."""
        found = None
        for key, entry in self._entries.items():
            if room is not None and len(entry.tokens) > room:
                continue
            shared = entry.serves(prompt, whole)
            if shared and (found is None or shared > found[1]):
                found = (key, shared)
        return found

    def length(self, key: int) -> int:
        """How many tokens an entry holds (with its base's)."""
        return len(self._entries[key].tokens)

    def take(self, key: int, shared: int | None = None) -> Entry:
        """Remove and return an entry (it goes back into a slot; its base stays while others use
        it), noting how deep the restore reached (``working_set.py``): the bytes of the newest entry
        that starts with the same ``shared`` tokens (by default all of this one's), and of those
        saved after it. Any of those would have served as well, so only the newest had to be kept."""
        entry = self._entries[key]
        head = entry.tokens[: len(entry.tokens) if shared is None else shared]
        keys = list(self._entries)
        newest = max(i for i, k in enumerate(keys) if common_prefix(self._entries[k].tokens, head) == len(head))
        self.working.reached(sum(self._entries[k].nbytes for k in keys[newest:]))
        self._remove(key)
        return entry

    def _bases(self) -> list[Base]:
        """Every base in use, once."""
        return list({id(entry.base): entry.base for entry in self._entries.values() if entry.base is not None}.values())

    def _use(self, entry: Entry) -> None:
        if entry.base is not None:
            if entry.base.users == 0:
                self.nbytes += entry.base.nbytes
            entry.base.users += 1

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        if entry.base is not None:
            entry.base.users -= 1
            if entry.base.users == 0:
                self.nbytes -= entry.base.nbytes
