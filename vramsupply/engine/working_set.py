"""How deep into the host prompt cache recent restores reach: the cache keeps that much, not all its budget.

**Why.** The budget (``--cache-ram``, by default a quarter of the free RAM, at most 8 GiB, as
llama-server's) is a ceiling, and under it the cache used to keep every conversation's last state
until the budget was full. Most of that is never read again: a chat that ended, a one-off question.
On the marketplace bench (48 conversations at 0.4 conv/s, vramsupply alone), the cache held 52
entries, 309 MB, at the end of the trace, while the deepest of its 40 restores reached 47 MB into it
(the bytes of the entries saved after the restored one, and its own), and the server's peak RSS was
252 MB over llama-server's on the same trace: held memory that served nobody.

**The rule.** A restore's *reach* is its least-recently-used stack distance in bytes. The cache
keeps ``MARGIN`` times the deepest reach of the last ``WINDOW`` restores: at least the KV of the
context's own ``n_ctx`` tokens (all that one park of the idle slots, or one pause, can move out at
once, so what was just moved out is never dropped for the bound), at most the budget. Entries past
it go, oldest first, and their memory goes back to the system at once (``seq_state.py``).

**Growing back.** A bound learned from short gaps (agents that answer in seconds) would drop the
conversations of people who take minutes, and then never see them come back. So the token lists
of entries dropped for the bound stay behind as *cold* ghosts (a few KB each, no KV), and an
admission that one of them would have served better than what it got (a miss the bound caused)
counts as a reach as deep as the bound, which makes the next bound ``MARGIN`` (2) times it: a
workload whose conversations return later grows it back, doubling per miss.

**Before the first restores.** Until ``MIN_SEEN`` restores or misses had been seen, the budget
alone bounded the cache. On the marketplace bench's 0.1 conv/s trace (48 conversations over 8
minutes) the eighth restore came after 5 minutes, and by then the cache held 133 MB in 26 entries,
twice the bound it then learned (72 MB: the context's KV, as no restore had reached deeper than 36
MB), and that was the server's peak RSS: 136 MB over llama-server's on that trace. Now the floor
bounds it from the first save, grown by misses as later: conversations that come back later than
the floor holds find their ghosts, and each such miss doubles the bound. Only where the floor is
unknown (no context size given) does the budget alone bound it until ``MIN_SEEN``. The floor is
at least ``least_bytes`` (``prompt_cache.LEAST_KEPT_BYTES``): a small model's context holds a few
MB of KV, less than a handful of its conversations, and keeping that little costs nothing.
"""

from __future__ import annotations

from collections import deque

WINDOW = 32
"""Restores (and misses) whose deepest reach sets the bound."""
MARGIN = 2.0
"""The bound over the deepest recent reach: room for a reach a little deeper than any seen."""
MIN_SEEN = 8
"""Restores or misses seen before the bound applies where there is no floor; until then the budget alone."""


class WorkingSet:
    """The bound the host prompt cache keeps to; ``cache_entries.PromptCache`` feeds it."""

    def __init__(self, floor_tokens: int = 0, least_bytes: int = 0) -> None:
        self._floor_tokens = floor_tokens
        self._least_bytes = least_bytes
        self._reaches: deque[int] = deque(maxlen=WINDOW)

    def reached(self, nbytes: int) -> None:
        """A restore reached ``nbytes`` deep into the cache (its stack distance, its own bytes included)."""
        self._reaches.append(nbytes)

    def bound(self, budget: int, bytes_per_token: float) -> int:
        """The bytes the cache keeps to: ``MARGIN`` times the deepest recent reach, at least the
        KV of ``floor_tokens`` tokens at ``bytes_per_token`` and ``least_bytes`` (from the first
        save: see the module docstring), at most ``budget``."""
        floor = max(self._least_bytes, int(self._floor_tokens * bytes_per_token)) if self._floor_tokens else 0
        if len(self._reaches) < MIN_SEEN and not floor:
            return budget
        return min(budget, max(floor, int(MARGIN * max(self._reaches, default=0))))

    def missed(self, bound: int) -> None:
        """An admission wanted an entry dropped under ``bound`` (``PromptCache.admitted``): count a
        reach as deep as that bound, so the next bound is ``MARGIN`` times it."""
        self._reaches.append(bound)
