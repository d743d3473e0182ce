"""The asyncio side of a request: a ``Generation`` is an async iterator of text deltas.

The scheduler thread never touches a ``Generation``. It holds only the ``Channel`` and, once per
decode step, schedules ``deliver`` on each consumer loop with that step's events, so a consumer
wakes at most once per step however many tokens or requests are involved. Because the scheduler
holds no reference to the ``Generation`` itself, dropping one unfinished (a client that went away)
lets it be garbage-collected, which cancels the request and frees its slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .logprobs import TokenLogprob
from .types import EngineError, Usage

if TYPE_CHECKING:
    from .slots import Task


@dataclass(frozen=True)
class Finish:
    """How a request ended: a finish reason and usage, or an error."""

    reason: str | None
    usage: Usage | None
    error: EngineError | None = None


class Event(NamedTuple):
    """What one decode step produced for one request (a tuple: the scheduler makes one per token
    between two decodes, and a frozen dataclass costs three times as much to build)."""

    channel: Channel
    text: str
    token: int | None
    finish: Finish | None
    logprob: TokenLogprob | None = None


class Channel:
    """Loop-side buffer of one request's output; only the consumer loop's thread touches it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[str] = deque()
        self.token_ids: list[int] = []
        # Per completion token: the text delivered so far, in characters, once that token was in.
        self.text_ends: list[int] = []
        self._delivered = 0
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        """Prompt tokens 1, 2, ...'s scores, once the prompt is in (a request that asked: ``post_prompt_scores``)."""
        self.finish: Finish | None = None
        self._waiter: asyncio.Future[None] | None = None

    def push(self, event: Event) -> None:
        if event.text:
            self.pending.append(event.text)
            self._delivered += len(event.text)
        if event.token is not None:
            self.token_ids.append(event.token)
            self.text_ends.append(self._delivered)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.finish is not None:
            self.finish = event.finish
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def scored(self, scores: tuple[TokenLogprob, ...]) -> None:
        self.prompt_logprobs = scores
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            # A cancelled earlier consumer (a client that hung up) must not unhook a later one's
            # waiter (the ledger waiting for the final usage), or that one would never wake.
            if self._waiter is waiter:
                self._waiter = None


def deliver(events: list[Event]) -> None:
    """Runs on a consumer loop (via ``call_soon_threadsafe``) with one step's events for it."""
    for event in events:
        event.channel.push(event)


def post_prompt_scores(channel: Channel, scores: tuple[TokenLogprob, ...]) -> None:
    """Hand a request's prompt scores over, ahead of its first token's event (which the outbox
    posts later, on the same loop). Apart from ``post``: only requests that asked for them send
    them, so no other event pays for them. A closed loop is the outbox's to find (``_abandon``)."""
    try:
        channel.loop.call_soon_threadsafe(channel.scored, scores)
    except RuntimeError:
        pass


def post(events: list[Event]) -> list[asyncio.AbstractEventLoop]:
    """Hand one step's events over with one ``call_soon_threadsafe`` per consumer loop; returns
    the loops that are closed (nobody can read their requests any more)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Event]] = {}
    for event in events:
        by_loop.setdefault(event.channel.loop, []).append(event)
    closed = []
    for loop, loop_events in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, loop_events)
        except RuntimeError:
            closed.append(loop)
    return closed


class Generation:
    """One submitted request. Iterate it for non-empty text deltas; stop strings never appear.

    ``finish_reason`` ("stop", "length" or "cancelled") and ``usage`` are set once the request
    has ended; iteration then finishes, or raises the ``EngineError`` that ended it.
    """

    def __init__(self, request_id: str, channel: Channel, request_cancel: Callable[[str], None], task: Task | None = None) -> None:
        self.id = request_id
        self.task = task
        """The scheduler's side of this request, for another choice to share its prompt with."""
        self._channel = channel
        self._request_cancel = request_cancel
        self._cancel_requested = False
        self._logprobs_taken = 0

    @property
    def finish_reason(self) -> str | None:
        finish = self._channel.finish
        return finish.reason if finish else None

    @property
    def usage(self) -> Usage | None:
        finish = self._channel.finish
        return finish.usage if finish else None

    @property
    def token_ids(self) -> list[int]:
        """Completion token ids received so far (no EOG token; tokens holding a stop string included)."""
        return list(self._channel.token_ids)

    @property
    def completion_tokens_so_far(self) -> int:
        """How many completion tokens have come so far (``token_ids`` without the copy)."""
        return len(self._channel.token_ids)

    @property
    def token_text_ends(self) -> list[int]:
        """Per completion token, the length of the text delivered up to and with it: which token
        brought which part of the text (text held back, e.g. half a UTF-8 character, comes with a
        later token). Exact counts of tokens in a span of the text, such as a thought, read it."""
        return list(self._channel.text_ends)

    def token_text_ends_from(self, first: int, count: int) -> list[int]:
        """``token_text_ends`` of completion tokens ``first`` .. ``first + count - 1`` (fewer where
        fewer tokens came), without copying every end."""
        return self._channel.text_ends[first : first + count]

    def token_text_starts(self, first: int, count: int) -> list[int]:
        """Where completion tokens ``first`` .. ``first + count - 1`` start in the text (see
        ``token_text_ends``), without copying every end: a stream asks for each chunk's few."""
        ends = self._channel.text_ends
        return [ends[min(k, len(ends)) - 1] if k and ends else 0 for k in range(first, first + count)]

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """Every completion token's logprobs so far, when the request asked for them."""
        return list(self._channel.logprobs)

    @property
    def prompt_logprobs(self) -> tuple[TokenLogprob, ...] | None:
        """Prompt tokens 1, 2, ...'s scores (token 0 has none), once the prompt is in, when the
        request asked for them (``GenerationRequest.prompt_logprobs``)."""
        return self._channel.prompt_logprobs

    async def prompt_scored(self) -> None:
        """Wait until the prompt's scores are here, or the request has ended (an error, a cancel);
        at once for a request that did not ask for them."""
        channel = self._channel
        if self.task is None or self.task.prompt_logprobs is None:
            return
        while channel.prompt_logprobs is None and channel.finish is None:
            await channel.wait()

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs that arrived since the last call (for the stream chunk being written)."""
        fresh = self._channel.logprobs[self._logprobs_taken :]
        self._logprobs_taken = len(self._channel.logprobs)
        return fresh

    @property
    def done(self) -> bool:
        return self._channel.finish is not None

    def cancel(self) -> None:
        """Ask the scheduler to stop this request; its slot is freed at the next step. Thread-safe."""
        if not self._cancel_requested and self._channel.finish is None:
            self._cancel_requested = True
            self._request_cancel(self.id)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        channel = self._channel
        while True:
            if channel.pending:
                text = "".join(channel.pending)
                channel.pending.clear()
                return text
            if channel.finish is not None:
                if channel.finish.error is not None:
                    raise channel.finish.error
                raise StopAsyncIteration
            await channel.wait()

    async def aclose(self) -> None:
        """Closing the iterator early (e.g. through ``contextlib.aclosing``) cancels the request."""
        self.cancel()

    async def collect(self) -> str:
        """The whole completion text, for callers that do not stream."""
        return "".join([delta async for delta in self])

    def __del__(self) -> None:
        if self._channel.finish is None:
            self.cancel()
