"""Scoring a prompt (an echo with logprobs) off the scheduler thread.

Reducing a chunk's logits rows to log-probabilities takes tens of milliseconds for 256 rows of a
32k vocabulary (``logprobs.score_rows``); on the scheduler thread, every other stream on the server
would pause that long at each step of the prompt. So the scheduler thread only copies the rows the
scores need (a few milliseconds: llama.cpp's next decode overwrites them) and a worker reduces
the copy while the next steps decode (``OffThreadScoring.reduce``).

The scheduler steers by the rows it has handed over (``PromptScores.taken``: where a paused prompt
may resume, which rows are still to score), never by the scores that arrived. Once the prompt is
in, its first token (sampled in the step, as any) or its end (``max_tokens`` 0) is held back until
the worker has every score (``OffThreadScoring.after``): the slot sits out the steps as a grammar
slot does (``offthread.py``), and the scores reach its buyer first, then that token
(``Outbox.scored``). A reduction that fails becomes the request's error; a request that ends
meanwhile (its buyer hung up) leaves the worker's result unread.

One worker, whose jobs run in the order they came: a prompt's reductions, then the job that
gathers them. It holds at most ``QUEUED_LOGITS`` floats of copies: past that, the scheduler thread
waits for the oldest reduction before copying more, so a worker slower than the decode costs the
steps what it did on the thread, never unbounded memory.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from concurrent.futures import Future
from typing import NamedTuple

import llama_cpp
import numpy as np

from .logprobs import SCORED_LOGITS, TokenLogprob, copy_rows, score_rows
from .types import EngineError

QUEUED_LOGITS = 2 * SCORED_LOGITS
"""Floats of copied rows the worker may hold, queued or being reduced: one step's rows reduced
while the next step's are decoded (64 MiB)."""


class Scored(NamedTuple):
    """A prompt's scores, all in, with what was held back for them: the first token sampled after
    the prompt and its logprob, or no token (``max_tokens`` 0: the request ends)."""

    scores: tuple[TokenLogprob, ...]
    token: int | None
    logprob: TokenLogprob | None


class PromptScores:
    """A prompt's scores in the making: how many prompt tokens' rows were handed to the worker
    (``taken``: tokens 1 .. ``taken``), and the worker's reductions of them, in order. A later choice
    of the same prompt shares its first's (``Task.share_scores``)."""

    def __init__(self) -> None:
        self.taken = 0
        self._parts: list[Future[list[TokenLogprob]]] = []

    def add(self, part: Future[list[TokenLogprob]], count: int) -> None:
        self._parts.append(part)
        self.taken += count

    def gather(self) -> tuple[TokenLogprob, ...]:
        """Every score, in order; raises a reduction's error. Blocks until each has ended."""
        return tuple(score for part in self._parts for score in part.result())


class OffThreadScoring:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramsupply-scores")
        self._queued: deque[tuple[Future[list[TokenLogprob]], int]] = deque()

    def reduce(
        self, scores: PromptScores, ctx: llama_cpp.llama_context_p, first_row: int, count: int, n_vocab: int, tokens: np.ndarray, top_n: int
    ) -> None:
        """Copy logits rows ``first_row`` .. ``first_row + count - 1`` of the last decode now, and
        score ``tokens`` (one per row) from the copy on the worker."""
        self._make_room(count * n_vocab)
        logits = copy_rows(ctx, first_row, count, n_vocab)
        part = self._pool.submit(score_rows, logits, tokens.copy(), top_n)
        self._queued.append((part, logits.size))
        scores.add(part, count)

    def after(self, scores: PromptScores, token: int | None, logprob: TokenLogprob | None) -> Future[Scored]:
        """``scores`` once all in, with the token held back for them: the worker's next job, after
        every reduction handed to it so far."""
        return self._pool.submit(_gathered, scores, token, logprob)

    def _make_room(self, floats: int) -> None:
        """Wait for the oldest reductions while the copies queued and ``floats`` more would pass
        ``QUEUED_LOGITS`` (one job alone may)."""
        queued = self._queued
        while queued and (queued[0][0].done() or sum(size for _, size in queued) + floats > QUEUED_LOGITS):
            concurrent.futures.wait([queued[0][0]])
            queued.popleft()

    def close(self) -> None:
        """Drop the queued jobs and wait for the running one (its request has ended already)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _gathered(scores: PromptScores, token: int | None, logprob: TokenLogprob | None) -> Scored:
    try:
        return Scored(scores.gather(), token, logprob)
    except Exception as exc:
        raise EngineError(f"scoring this request's prompt failed: {exc!r}") from exc
