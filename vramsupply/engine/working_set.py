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

Until ``MIN_SEEN`` restores or misses have been seen, the budget alone bounds the cache.
"""

from __future__ import annotations

from collections import deque

WINDOW = 32
"""Restores (and misses) whose deepest reach sets the bound."""
MARGIN = 2.0
"""The bound over the deepest recent reach: room for a reach a little deeper than any seen."""
MIN_SEEN = 8
"""Restores or misses seen before the bound applies; until then the budget alone."""


class WorkingSet:
    """The bound the host prompt cache keeps to; ``cache_entries.PromptCache`` feeds it."""

    def __init__(self, floor_tokens: int = 0) -> None:
        self._floor_tokens = floor_tokens
        self._reaches: deque[int] = deque(maxlen=WINDOW)

    def reached(self, nbytes: int) -> None:
        """A restore reached ``nbytes`` deep into the cache (its stack distance, its own bytes included)."""
        self._reaches.append(nbytes)

    def bound(self, budget: int, bytes_per_token: float) -> int:
        """The bytes the cache keeps to: ``MARGIN`` times the deepest recent reach, at least the
        KV of ``floor_tokens`` tokens at ``bytes_per_token``, at most ``budget``."""
        if len(self._reaches) < MIN_SEEN:
            return budget
        floor = int(self._floor_tokens * bytes_per_token)
        return min(budget, max(floor, int(MARGIN * max(self._reaches))))

    def missed(self, bound: int) -> None:
        """An admission wanted an entry dropped under ``bound`` (``PromptCache.admitted``): count a
        reach as deep as that bound, so the next bound is ``MARGIN`` times it."""
        self._reaches.append(bound)
