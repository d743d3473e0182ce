"""Whether copying a slot's KV to the host prompt cache pays: measured cost against measured reuse.

A save (``llama_state_seq_get_data``) stalls every stream while it runs, on the scheduler thread.
What it costs depends on where the sequence's cells lie in the shared KV cache. llama.cpp copies
the K rows of each run of consecutive cells at once, but without flash attention (the default on
the CPU, see ``engine/model.py``) V is stored transposed, and it copies V one element row per run
of cells. A sequence decoded beside others owns one cell per step, interleaved with theirs, so
each token is a run of its own. On the bench model (2-core EPYC VM), an answer of 133 tokens
decoded beside 15 others took 30 ms to save, 2 ms with its cells consecutive (1.4 ms with flash
attention on, interleaved or not); when a burst of 16 requests ended and the next began, the 16
saves held every stream for about half a second. With the KV cache on a GPU every run is a
device copy instead, which can cost more than prefilling the tokens again there.

Whether the stall pays depends on the traffic: a chat's next turn restores its history and skips
its prefill, while one-off prompts never come back. So two figures are measured as the engine
runs:

- the seconds a save takes per token it holds (a moving average of the saves made);
- how often an admitted request gets an entry restored, over the last ``REUSE_WINDOW`` admissions.

A slot is saved when ``reuse x seconds to prefill its tokens >= seconds to save them``, with the
prefill seconds taken from the pacer's cost model (``step_cost.py``). Until a save has been timed
it is saved, and reuse starts at 1 (the window starts full of hits); while no prompt has been long enough to learn the prefill
speed from (a workload of short prompts), it is saved while reuse is at least ``REUSE_FLOOR``. A save that is skipped leaves its token list behind as a "ghost"
(no KV, a few KB), and an admission whose prompt an entry or a ghost would have served counts as
reuse, so traffic that turns to chats is noticed and saving resumes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from .cache_entries import common_prefix
from .step_cost import Smoothed

REUSE_WINDOW = 16
"""Admissions the reuse rate looks back over. After this many with nothing restored it is 0, and
no save pays whatever it costs."""
REUSE_FLOOR = 0.1
"""Reuse below which a save is skipped while the prefill speed is unknown."""
MAX_GHOSTS = 64
"""Token lists of skipped saves kept to notice reuse (at most 16 KB each at 4,096 tokens)."""


class SavePolicy:
    """Decides whether a slot's KV is worth saving; the scheduler thread alone uses it."""

    def __init__(self, prefill_seconds: Callable[[int], float] | None = None) -> None:
        self._prefill_seconds = prefill_seconds
        """Seconds to prefill so many tokens from depth 0 (0 while unknown), or None: always save."""
        self._save_per_token = Smoothed()
        self._restored = deque([True] * REUSE_WINDOW, maxlen=REUSE_WINDOW)
        self._ghosts: deque[np.ndarray] = deque(maxlen=MAX_GHOSTS)

    @property
    def reuse(self) -> float:
        """The share of recent admissions that got (or would have got) an entry restored."""
        return sum(self._restored) / len(self._restored)

    def worth_saving(self, tokens: int) -> bool:
        per_token = self._save_per_token.value
        if self._prefill_seconds is None or per_token is None or tokens <= 0:
            return True
        prefill = self._prefill_seconds(tokens)
        if prefill <= 0:
            return self.reuse >= REUSE_FLOOR
        return self.reuse * prefill >= per_token * tokens

    def saved(self, tokens: int, seconds: float) -> None:
        """A save of ``tokens`` tokens took ``seconds``."""
        if tokens > 0:
            self._save_per_token.observe(seconds / tokens)

    def skipped(self, tokens: np.ndarray) -> None:
        """A save of ``tokens`` was skipped: remember them, to notice when such prompts come back."""
        self._ghosts.append(np.array(tokens, dtype=np.int32))

    def admitted(self, restored: bool, prompt: np.ndarray, worth: Callable[[int, int], bool]) -> None:
        """An admission: ``restored`` when an entry went back into its slot; otherwise a ghost that
        ``worth(ghost tokens, shared prefix)`` would have restored counts as reuse (and is dropped:
        the prompt that wanted it is now in a slot)."""
        self._restored.append(restored or self._ghost_hit(prompt, worth))

    def _ghost_hit(self, prompt: np.ndarray, worth: Callable[[int, int], bool]) -> bool:
        for at, ghost in enumerate(self._ghosts):
            if worth(len(ghost), common_prefix(ghost, prompt)):
                del self._ghosts[at]
                return True
        return False
