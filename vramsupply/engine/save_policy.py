"""Whether copying a slot's KV to the host prompt cache pays: measured cost against measured reuse.

A save (``llama_state_seq_get_data``) stalls every stream while it runs, on the scheduler thread.
What it costs depends on where the sequence's cells lie in the shared KV cache. llama.cpp copies
the K rows of each run of consecutive cells at once, but without flash attention (``auto`` on an
Intel CPU with AMX, see ``gpu/options.py``, or turned off) V is stored transposed, and it copies V one element row per run
of cells. A sequence decoded beside others owns one cell per step, interleaved with theirs, so
each token is a run of its own. On the bench model (2-core EPYC VM), an answer of 133 tokens
decoded in lockstep with 15 others took 30 ms to save, 2 ms with its cells consecutive (1.4 ms
with flash attention on, interleaved or not). In the c=16 sweep a save took about 11 ms, and the
12-13 saves made when one burst of 16 requests gave way to the next held every stream for 150 ms,
for answers that never came back. With the KV cache on a GPU every run is a
device copy instead, which can cost more than prefilling the tokens again there.

Whether the stall pays depends on the traffic: a chat's next turn restores its history and skips
its prefill, while one-off prompts never come back, or share only their first words with a saved
answer. So two figures are measured as the engine runs:

- the seconds a save takes per token it holds (a moving average of the saves made);
- reuse: the prompt tokens that restores spared, per token saved, over the last ``WINDOW`` saves
  and admissions. Counting restores instead of tokens misled: when a burst of the same short
  prompts gave way to the next, each restored a 133-token answer to keep the prompt's 4 tokens.

A slot is saved when ``reuse x seconds to prefill its tokens >= seconds to save them``, with the
prefill seconds taken from the pacer's cost model (``step_cost.py``). Until a save has been timed,
and until the window is full, it is saved; while no prompt has been
long enough to learn the prefill speed from (a workload of short prompts), it is saved while
reuse is at least ``REUSE_FLOOR``. A save that is skipped leaves its token list behind as a
"ghost" (no KV, a few KB), and the tokens a ghost would have spared an admission count as reuse,
so traffic that turns to chats is noticed and saving resumes.

A save is timed (``timed``) less the time the scheduler thread waited meanwhile for a CPU that
another process held (``run_queue_seconds``): that wait is the machine's load, not the copy's cost,
and any step would have waited as long. On the 2-core test VM with one busy process beside the
engine, 72 of 135 saves of 66-211 tokens of the tiny model were preempted and timed at 7-73 ms,
where they copy in 0.3-0.7 ms. One such sample lifted the moving average 30-60 times, past the
prefill's cost, and as skipped saves are not timed it stayed there: every later save was skipped,
paused requests' included, and they were prefilled again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from .cache_entries import Ghosts
from .step_cost import Smoothed

WINDOW = 32
"""Saves (made or skipped) and admissions that reuse looks back over: about 16 requests. After
them with nothing restored reuse is 0, and no save pays whatever it costs."""
REUSE_FLOOR = 0.1
"""Reuse below which a save is skipped while the prefill speed is unknown."""
MAX_PAUSE_COPY_SECONDS = 0.1
"""The longest predicted copy of a paused request's KV (``preempt.py``): the copy holds every stream
at once, where prefilling it again runs in paced steps. On the bench CPU with flash attention a
2,000-token sequence copies in about 20 ms; without it (V stored transposed, one copy per cell for
a sequence decoded beside others) an answer of 133 tokens took 30 ms, so 2,000 would take most of
half a second, past the 250 ms bound on a stream's gap."""
SCHEDSTAT = "/proc/thread-self/schedstat"
"""Linux's scheduler statistics for the calling thread: seconds on a CPU, seconds runnable but
waiting for one, time slices (nanoseconds)."""
MAX_OUTLIER = 4.0
"""One save moves the estimate as if it took at most this many times the current estimate per
token: skipped saves are not timed, so a single outlier (a page fault on new host memory, a wait
for the GIL) that lifted the estimate past the prefill's cost would otherwise stop saving for
good. Copies that really got slower still lift it, by up to 1.9 times a save."""
MAX_GHOSTS = 64
"""Token lists of skipped saves kept to notice reuse (at most 16 KB each at 4,096 tokens)."""


def run_queue_seconds() -> float:
    """Seconds the calling thread has been runnable but waiting for a CPU (0 where Linux's
    ``SCHEDSTAT`` cannot be read: saves are then timed by the wall clock alone)."""
    try:
        with open(SCHEDSTAT, "rb") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class SavePolicy:
    """Decides whether a slot's KV is worth saving; the scheduler thread alone uses it."""

    def __init__(
        self,
        prefill_seconds: Callable[[int], float] | None = None,
        waited: Callable[[], float] = run_queue_seconds,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._prefill_seconds = prefill_seconds
        """Seconds to prefill so many tokens from depth 0 (0 while unknown), or None: always save."""
        self._waited = waited
        """The scheduler thread's seconds waiting for a CPU so far (``run_queue_seconds``)."""
        self._clock = clock
        self._save_per_token = Smoothed()
        self._recent: deque[tuple[int, int]] = deque(maxlen=WINDOW)
        """(tokens saved or skipped, prompt tokens a restore spared) of recent saves and admissions."""
        self._ghosts = Ghosts(MAX_GHOSTS)

    @property
    def reuse(self) -> float:
        """Prompt tokens that restores spared (or would have) per token saved, lately; 1 until
        the window is full, or while nothing was saved in it."""
        saved = sum(tokens for tokens, _ in self._recent)
        if len(self._recent) < WINDOW or not saved:
            return 1.0
        return sum(spared for _, spared in self._recent) / saved

    def worth_saving(self, tokens: int, certain: bool = False) -> bool:
        """Whether saving ``tokens`` pays; ``certain``: they will be wanted back (a paused
        request's KV, ``preempt.py``), so reuse is 1 and only the two costs are weighed, as long
        as the copy stays within ``MAX_PAUSE_COPY_SECONDS``."""
        per_token = self._save_per_token.value
        if self._prefill_seconds is None or per_token is None or tokens <= 0:
            return True
        if certain and per_token * tokens > MAX_PAUSE_COPY_SECONDS:
            return False
        reuse = 1.0 if certain else self.reuse
        prefill = self._prefill_seconds(tokens)
        if prefill <= 0:
            return reuse >= REUSE_FLOOR
        return reuse * prefill >= per_token * tokens

    @contextmanager
    def timed(self, tokens: int) -> Iterator[None]:
        """Times the save of ``tokens`` tokens made in the block (``saved``): by the wall clock,
        less what the thread waited for a CPU meanwhile, which is another process's time, not
        the copy's. Whether or not the copy succeeds: the stall was paid either way."""
        waited, started = self._waited(), self._clock()
        try:
            yield
        finally:
            self.saved(tokens, self._clock() - started, self._waited() - waited)

    def saved(self, tokens: int, seconds: float, waited: float = 0.0) -> None:
        """A save of ``tokens`` tokens took ``seconds`` by the wall clock, ``waited`` of them
        with the thread waiting for a CPU (``timed``)."""
        if tokens > 0:
            sample = max(seconds - waited, 0.0) / tokens
            estimate = self._save_per_token.value
            self._save_per_token.observe(sample if estimate is None else min(sample, MAX_OUTLIER * estimate))
            self._recent.append((tokens, 0))

    def skipped(self, tokens: np.ndarray) -> None:
        """A save of ``tokens`` was skipped: remember them, to notice when such prompts come back."""
        self._ghosts.add(tokens)
        self._recent.append((len(tokens), 0))

    def admitted(self, spared: int, prompt: np.ndarray, gain: Callable[[int, int], int]) -> None:
        """An admission, ``spared`` prompt tokens by a restore (0: none). Without one, what a ghost
        would have spared, ``gain(ghost tokens, shared prefix)``, counts, and that ghost is
        dropped (the prompt that wanted it is in a slot now)."""
        self._recent.append((0, spared or self._ghosts.claim(prompt, gain)))
