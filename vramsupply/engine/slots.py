"""Scheduler-side state of one request (``Task``) and one KV sequence (``Slot``).

Only the scheduler thread reads or writes these.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .generation import Channel
from .sampling import RequestSampler
from .speculative import DraftState
from .text import StopStrings, TextStream

NO_DRAFT = np.zeros(0, dtype=np.int32)


@dataclass(eq=False)
class Task:
    """An admitted request: everything the scheduler needs, already validated."""

    id: str
    prompt: np.ndarray
    sampler: RequestSampler
    max_completion: int
    stop: StopStrings
    channel: Channel
    preserve: frozenset[int] = frozenset()
    logprobs: int | None = None  # top alternatives per token to report; None: no logprobs
    backend_sampling: bool = False  # sample in llama.cpp's graph (see backend_sampling)
    shares_prompt_with: Task | None = None
    """Another choice of the same request (``n`` > 1): its decoded prompt KV is copied, not redone."""


class Slot:
    """One llama.cpp sequence (``seq_id``) and the request currently running in it.

    ``cached`` mirrors exactly the tokens whose KV the sequence holds, so a later request can
    keep the longest common prefix and only decode the rest. A slot keeps its KV when its
    request ends; the next request either reuses or overwrites it.
    """

    def __init__(self, seq_id: int, n_ctx: int, max_draft: int = 0) -> None:
        self.seq_id = seq_id
        self.cached = np.zeros(n_ctx, dtype=np.int32)
        self.n_cached = 0
        self.started = 0
        self.task: Task | None = None
        self.stream: TextStream | None = None
        self.next_token: int | None = None
        self.row = -1
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.draft = NO_DRAFT  # prompt-lookup tokens in the current batch after next_token
        self.backend_sampled = False  # the task's chain runs in llama.cpp's graph (backend_sampling)
        self.drafts = DraftState(max_draft)
        self.pending: Future[int] | None = None  # its token, being sampled off the thread (offthread)

    @property
    def prefilling(self) -> bool:
        return self.task is not None and self.n_cached < len(self.task.prompt)

    @property
    def generating(self) -> bool:
        return self.next_token is not None

    def common_prefix(self, prompt: np.ndarray) -> int:
        """Length of the longest prefix ``prompt`` shares with what this sequence holds."""
        size = min(self.n_cached, len(prompt))
        same = self.cached[:size] == prompt[:size]
        return size if same.all() else int(np.argmin(same))

    def begin(self, task: Task, keep: int, clock: int) -> None:
        """Take ``task``, keeping the first ``keep`` cached tokens (the caller trimmed the KV)."""
        self.task = task
        self.n_cached = keep
        self.cached_tokens = keep
        self.completion_tokens = 0
        self.stream = TextStream(task.stop)
        self.next_token = None
        self.row = -1
        self.started = clock
        self.drafts.reset()

    def record(self, tokens: np.ndarray) -> None:
        """Note tokens just placed in the batch for this sequence."""
        end = self.n_cached + len(tokens)
        self.cached[self.n_cached : end] = tokens
        self.n_cached = end

    def record_one(self, token: int) -> None:
        self.cached[self.n_cached] = token
        self.n_cached += 1

    def forget(self) -> None:
        """The KV was wiped (after a failed decode): nothing is reusable."""
        self.n_cached = 0

    def release(self) -> Task:
        task = self.task
        assert task is not None
        if self.pending is not None:  # the worker still walks the grammar: close the sampler after it
            self.pending.add_done_callback(lambda _: task.sampler.close())
            self.pending = None
        else:
            task.sampler.close()
        self.task = None
        self.stream = None
        self.next_token = None
        self.row = -1
        return task


def choose_slot(idle: Sequence[Slot], prompt: np.ndarray) -> tuple[Slot, int]:
    """The idle slot for ``prompt`` and the prefix it already holds.

    llama.cpp decodes per-slot KV in one forward pass only for *consecutive* sequence ids
    (``split_equal``), so busy slots must stay packed at the bottom: every gap costs a pass per
    step for as long as the requests run. A cached prefix outweighs that only when it covers more
    than half of the prompt; otherwise the lowest idle sequence id wins.
    """
    def rank(item: tuple[Slot, int]) -> tuple[int, int]:
        slot, prefix = item
        return (prefix if 2 * prefix > len(prompt) else 0, -slot.seq_id)

    return max(((slot, slot.common_prefix(prompt)) for slot in idle), key=rank)
