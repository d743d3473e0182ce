"""Scheduler-side state of one request (``Task``) and one KV sequence (``Slot``).

Only the scheduler thread reads or writes these.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from .cache_entries import common_prefix
from .checkpoints import Checkpoint
from .generation import Channel
from .logprobs import MIN_SCORED_ROWS
from .sampling import RequestSampler
from .scoring import PromptScores, Scored
from .speculative import DraftState
from .text import StopStrings, TextStream
from .types import Usage

NO_DRAFT = np.zeros(0, dtype=np.int32)

_BLOCKS = count(1)
"""Numbers the runs of KV cells that slots decode or restore, so that each cell has its own id."""
_BLOCK_CELLS = 1 << 32


def new_cells(n: int) -> np.ndarray:
    """Ids for ``n`` cells just decoded or restored: no other cell has them."""
    return next(_BLOCKS) * _BLOCK_CELLS + np.arange(n, dtype=np.int64)


def distinct_cells(slots: Sequence[Slot]) -> int:
    """KV cells the slots hold, each counted once however many sequences it belongs to (a borrowed
    prefix, the prompt that the choices of one request share: ``sharing.py``)."""
    held = [slot.cells[: slot.n_cached] for slot in slots if slot.n_cached]
    return len(np.unique(np.concatenate(held))) if held else 0


@dataclass(eq=False)
class Tally:
    """One request's prompt, as the engine's counters (heartbeats, ``/metrics``) count it: once,
    whatever its ``n``, and only once the request served its buyer something.

    Its first choice to take a slot notes the prompt here; it is counted at the request's first
    completion token, or when its last choice ends without an error (a buyer who hung up after the
    prefill: the earnings ledger records that prompt too). A request whose choices all ended
    without a token, one of them with an error, gave its buyer nothing but that error and has no
    ledger row: its prompt is never counted. Counting late, rather than counting at the slot and
    taking it back, keeps the counters monotonic, as Prometheus counters and heartbeat deltas need."""

    open: int = 1
    """Choices not ended yet."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    counted: bool = False
    failed: bool = False

    def ended(self, failed: bool) -> bool:
        """One choice ended: whether the prompt is to be counted now (the last one ended, none failed)."""
        self.open -= 1
        self.failed = self.failed or failed
        return not (self.open or self.failed or self.counted)


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
    later_choice: bool = False
    """Not the first choice of its request: its prompt was counted with the first one's."""
    later_prompt: bool = False
    """Not the first prompt of its request (a batch of prompts): the request was counted with it."""
    tally: Tally = field(default_factory=Tally)
    """Shared by the choices of one request."""
    resume: Resume | None = None
    """Set while the request waits to resume after a preemption (``preempt.py``)."""
    arrived: float = field(default_factory=time.monotonic)
    """When it was submitted (``time.monotonic``): how long its buyer has waited (``pacing.py``)."""
    first_token_at: float | None = None
    """When its first completion token was sampled (``time.monotonic``): whether its stream is
    serving its buyer well (``service_level.py``)."""
    spoke: bool = False
    """Some of its text has gone to the buyer; until then every token is handed over at once (``cadence.py``)."""
    stop_ids: frozenset[int] = frozenset()
    """Token ids that end it as a stop string does (vLLM's ``stop_token_ids``)."""
    keep_stop_token: bool = False
    """A stop token's text stays at the end of its output (``include_stop_str_in_output``)."""
    min_tokens: int = 0
    """Until this many completion tokens are out, ``ends`` cannot be sampled and stop strings do not stop."""
    ends: np.ndarray | None = None
    """The end-of-generation and stop token ids, which ``min_tokens`` holds back (``rows.py``)."""
    prompt_logprobs: int | None = None
    """Alternatives per prompt token to report with its log-probability (an echo with logprobs);
    None: the prompt is not scored. Such a prompt is decoded from where its scores stop, never from
    a cached prefix beyond (``admission.py``): cached positions have no logits."""
    prompt_scores: PromptScores = field(default_factory=PromptScores)
    """The scores of prompt tokens 1, 2, ... so far (token 0 has none: nothing precedes it), being
    reduced on the scoring worker (``scoring.py``)."""

    def share_scores(self) -> None:
        """A later choice (``shares_prompt_with``) takes its first choice's prompt scores once
        they are complete: the same prompt, the same scores, whatever each decoded."""
        source = self.shares_prompt_with
        if source is not None and self.scoring and not source.scoring:
            self.prompt_scores = source.prompt_scores

    @property
    def scoring(self) -> bool:
        """Prompt tokens wait for their scores (only a request that asked for them). Row ``p`` of
        the prompt scores token ``p + 1``, so it may start from at most ``prompt_scores.taken`` tokens."""
        return self.prompt_logprobs is not None and self.prompt_scores.taken < len(self.prompt) - 1

    @property
    def to_prefill(self) -> np.ndarray:
        """What taking a slot means prefilling: the prompt, or more when it resumes after a pause."""
        return self.prompt if self.resume is None else self.resume.tokens

    def usage_while_waiting(self) -> Usage:
        """Its usage if it ends while waiting for a slot. Paused (``resume``): its prompt and what it
        generated before the pause. Never admitted: nothing, as the engine's counters (heartbeats,
        /metrics) count it; the earnings ledger billed its whole prompt."""
        done = self.resume
        if done is None:
            return Usage(0, 0, 0)
        return Usage(len(self.prompt), done.completion_tokens, done.cached_tokens)


@dataclass(eq=False)
class Resume:
    """Where a preempted request stands: what to prefill again and the state it carries on with."""

    tokens: np.ndarray  # the prompt and the completion tokens already in its KV
    next_token: int | None  # sampled and streamed, not yet decoded (None: still prefilling its prompt)
    completion_tokens: int
    cached_tokens: int
    stream: TextStream


class Slot:
    """One llama.cpp sequence (``seq_id``) and the request currently running in it.

    ``cached`` mirrors exactly the tokens whose KV the sequence holds, so a later request can
    keep the longest common prefix and only decode the rest. A slot keeps its KV when its
    request ends; the next request either reuses or overwrites it. ``cells`` names the KV cell
    behind each of those tokens: a cell another sequence also holds has the same id in both, so
    the shared cache's use is counted once per cell (``distinct_cells``).
    """

    def __init__(self, seq_id: int, n_ctx: int, max_draft: int = 0) -> None:
        self.seq_id = seq_id
        self.cached = np.zeros(n_ctx, dtype=np.int32)
        self.cells = np.zeros(n_ctx, dtype=np.int64)
        self.n_cached = 0
        self.started = 0
        self.task: Task | None = None
        self.prompt = NO_DRAFT  # what the slot prefills: the task's prompt, or more when it resumes
        self.resume_token: int | None = None  # a resumed task's next token, once ``prompt`` is in
        self.stream: TextStream | None = None
        self.next_token: int | None = None
        self.row = -1
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.draft = NO_DRAFT  # prompt-lookup tokens in the current batch after next_token
        self.backend_sampled = False  # the task's chain runs in llama.cpp's graph (backend_sampling)
        self.drafts = DraftState(max_draft)
        # Its token, being sampled off the thread (offthread), or held back for its prompt's scores (scoring).
        self.pending: Future[int] | Future[Scored] | None = None
        self.checkpoints: list[Checkpoint] = []  # a recurrent state part way (checkpoints.py)
        self.checkpoints_due: list[int] = []  # where the prompt being prefilled gets them, ascending
        self.scored_rows = MIN_SCORED_ROWS  # a scored prompt's rows per step (``logprobs.scored_rows``; set by ``step.py``)

    @property
    def prefilling(self) -> bool:
        return self.task is not None and self.n_cached < len(self.prompt)

    @property
    def generating(self) -> bool:
        return self.next_token is not None

    def common_prefix(self, prompt: np.ndarray) -> int:
        """Length of the longest prefix ``prompt`` shares with what this sequence holds."""
        return common_prefix(self.cached[: self.n_cached], prompt)

    def reusable(self, prompt: np.ndarray, whole: bool = False) -> int:
        """How much of ``prompt`` this sequence can start it from. With ``whole`` (a state that
        cannot be cut back) that is all it holds, when the prompt starts with all of it, or else
        the tokens of its longest checkpoint that the prompt starts with (``checkpoints.py``), or nothing."""
        held = self.common_prefix(prompt)
        if not whole or held == self.n_cached:
            return held
        checkpoint = self.checkpoint_for(prompt, held)
        return len(checkpoint.tokens) if checkpoint is not None else 0

    def valid_checkpoints(self) -> list[Checkpoint]:
        """The checkpoints made after tokens this sequence still holds."""
        return [c for c in self.checkpoints if len(c.tokens) <= self.n_cached and np.array_equal(self.cached[: len(c.tokens)], c.tokens)]

    def checkpoint_for(self, prompt: np.ndarray, limit: int) -> Checkpoint | None:
        """The longest valid checkpoint of at most ``limit`` tokens that ``prompt`` starts with."""
        fitting = [c for c in self.valid_checkpoints() if len(c.tokens) <= limit and c.serves(prompt)]
        return max(fitting, key=lambda c: len(c.tokens), default=None)

    @property
    def before_checkpoint(self) -> int | None:
        """Prompt tokens left to prefill before the next checkpoint is made; None when none is due.
        A prompt being scored (``Task.scoring``) stops as if at one every ``scored_rows`` tokens, so
        that no step holds more rows of its logits (``logprobs.py``), nor rewinds it (``pacing.py``)."""
        due = [at - self.n_cached for at in self.checkpoints_due if at > self.n_cached]
        if self.task is not None and self.task.scoring:
            due.append(self.scored_rows)
        return min(due, default=None)

    def usage(self) -> Usage:
        assert self.task is not None
        return Usage(len(self.task.prompt), self.completion_tokens, self.cached_tokens)

    def begin(self, task: Task, keep: int, clock: int) -> None:
        """Take ``task``, keeping the first ``keep`` cached tokens (the caller trimmed the KV).

        A resumed task (``task.resume``) carries on where it was paused: its stream, counts and
        next token come back, and it prefills its prompt plus what it had generated.
        """
        resume, task.resume = task.resume, None
        self.task = task
        self.n_cached = keep
        self.next_token = None
        if resume is None:
            self.prompt = task.prompt
            self.resume_token = None
            self.cached_tokens = keep
            self.completion_tokens = 0
            self.stream = TextStream(task.stop)
        else:
            self.prompt = resume.tokens
            self.resume_token = resume.next_token
            self.cached_tokens = resume.cached_tokens
            self.completion_tokens = resume.completion_tokens
            self.stream = resume.stream
        self.row = -1
        self.started = clock
        self.drafts.reset()

    def record(self, tokens: np.ndarray) -> None:
        """Note tokens just placed in the batch for this sequence (or restored into it)."""
        end = self.n_cached + len(tokens)
        self.cached[self.n_cached : end] = tokens
        self.cells[self.n_cached : end] = new_cells(len(tokens))
        self.n_cached = end

    def record_one(self, token: int) -> None:
        self.cached[self.n_cached] = token
        self.cells[self.n_cached] = next(_BLOCKS) * _BLOCK_CELLS
        self.n_cached += 1

    def adopt(self, other: Slot, n: int) -> None:
        """This sequence, holding nothing, was given ``other``'s first ``n`` cells (``llama_memory_seq_cp``)."""
        self.cached[:n] = other.cached[:n]
        self.cells[:n] = other.cells[:n]
        self.n_cached = n

    def forget(self) -> None:
        """The KV was wiped (parked in the host cache, or after a failed decode): nothing is
        reusable, and the checkpoints of what it held are let go (a cache entry may keep them)."""
        self.n_cached = 0
        self.checkpoints = []
        self.checkpoints_due = []

    @property
    def checkpoint_bytes(self) -> int:
        """Host memory of the checkpoints this slot keeps."""
        return sum(c.nbytes for c in list(self.checkpoints))

    def suspend(self) -> Task:
        """Give the task up without ending it (a preemption); the caller removed the KV.

        After rolling back the step, the KV holds ``cached[:n_cached]``: the prompt, or part of
        it, and every completion token but the last sampled one, ``next_token``.
        """
        task = self.task
        assert task is not None and self.pending is None and self.stream is not None
        tokens = self.cached[: self.n_cached].copy()
        if self.n_cached < len(self.prompt) or self.resume_token is not None:
            tokens, next_token = self.prompt, self.resume_token  # paused again before it was back
        else:
            next_token = self.next_token
        task.resume = Resume(tokens, next_token, self.completion_tokens, self.cached_tokens, self.stream)
        task.shares_prompt_with = None
        self.task = None
        self.stream = None
        self.next_token = None
        self.resume_token = None
        self.row = -1
        self.n_cached = 0
        return task

    def release(self) -> Task:
        task = self.task
        assert task is not None
        if self.pending is not None:  # a worker may still walk the grammar: close the sampler after it
            self.pending.add_done_callback(lambda _: task.sampler.close())
            self.pending = None
        else:
            task.sampler.close()
        self.task = None
        self.stream = None
        self.next_token = None
        self.resume_token = None
        self.row = -1
        return task


Plan = Sequence[tuple[Slot, "np.ndarray | None"]]
"""A step's rows: each slot with its prompt chunk, or None for a generating slot's next token."""


def choose_slot(
    idle: Sequence[Slot], prompt: np.ndarray, packed: bool = False, whole: bool = False, kept: bool = False,
) -> tuple[Slot, int]:
    """The idle slot for ``prompt`` and the prefix it can start from (``Slot.reusable``).

    With a KV cache per slot (``packed``) llama.cpp decodes in one forward pass only
    *consecutive* sequence ids (``split_equal``), so busy slots must stay packed at the bottom:
    every gap costs a pass per step for as long as the requests run. A cached prefix outweighs
    that only when it covers more than half of the prompt; otherwise the lowest idle sequence id
    wins. The shared cache splits batches by rows (``split_simple``), so there the longest cached
    prefix wins.

    Except where idle slots keep their KV in the shared cache (``kept``: no host prompt cache
    to park it in, ``preempt.park_idle``): there a slot's KV is a conversation that may come
    back, so a slot is reused for its prefix only when that prefix is at least as long as what
    the slot would throw away (the conversation's next turn). A shorter one (a BOS token, a
    system prompt every conversation shares, lent anyway by ``sharing.py``) sends the prompt to
    the slot that loses least, an empty one first, and among equals the least recently used
    (llama-server takes the least recently used); a long history costs most to prefill again.
    Taking the lowest id, one-off prompts overwrote chats' KV while slots stood empty: with 4
    chats of 4 turns beside 10 one-off prompts a turn on the bench model, the chats' later
    turns found 33 % of their prompts cached (89 % so) and waited 508-526 ms on average for a
    first token (180-202 ms so; ``bench/slot_choice.py``). Least recently used first, ties to an
    empty slot, kept only 62 % with 8 one-off prompts, since the chats were the oldest.

    With parking, idle slots are emptied after each admission anyway, and taking the one that
    holds the prefix frees its cells for the prompt (a restore needs them).
    """
    def rank(item: tuple[Slot, int]) -> tuple[int, int, int, int]:
        slot, prefix = item
        if packed:
            return (prefix if 2 * prefix > len(prompt) else 0, 0, 0, -slot.seq_id)
        if not kept:
            return (prefix, 0, 0, -slot.seq_id)
        continues = prefix > 0 and 2 * prefix >= slot.n_cached
        return (prefix if continues else 0, prefix - slot.n_cached, -slot.started, -slot.seq_id)

    return max(((slot, slot.reusable(prompt, whole)) for slot in idle), key=rank)
