"""Telling whoever keeps accounts (the earnings ledger) that a request finished, and with what usage.

The server knows the exact moment a request is done and the usage the buyer receives; it does not
know prices, payouts or where the records go. ``serve`` plugs a ``RequestRecorder`` into the
server state; without one (tests, a bare app) nothing is recorded.

A finished request is recorded before the buyer gets its last byte (the usage chunk and
``[DONE]``, or the whole non-streaming body), so a crash can never lose a request the buyer has
received in full. A request that ends early (the buyer hung up, the drain deadline or an engine
failure cut it) is recorded as not complete once its generations have stopped and their usage is
known: served, but unpaid (``ledger.recorder``). One that ended while still queued is not recorded:
no token of it was computed.

The ledger holds the usage buyers received, so a request the engine failed before it generated a
single token is not recorded at all: its buyer got an error answer (an error status, or a stream
whose only content was the error event) and no usage, and pays nothing. One that failed after
tokens went out is a stream cut short, recorded with what it generated, as a hang-up is.

A recorder that keeps requests in flight (``TracksInFlight``: the earnings ledger) is told of a
request at its first generated text (``Tracked.serving``) and of the tokens each has so far every
``IN_FLIGHT_EVERY_SECONDS``, all of them at once, by one task that runs only while requests are in
flight: an agent killed outright then leaves a row of each, which the next start records as
interrupted (``ledger.in_flight``). Nothing is done per token, and nothing here waits for a disk.
Our own engine's requests (``Bill``) and those relayed to an upstream (``upstream.exchange``) are
tracked alike; each says how it counts its tokens so far (``Counts``): exactly, for our engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vramsupply.engine import EngineError, Generation
from vramsupply.server.batch import batch_usage
from vramsupply.server.responses import UsageOut

log = logging.getLogger("vramsupply.server")

UNFINISHED_WAIT_SECONDS = 60.0
"""How long an abandoned request's generations may take to report their final usage."""
IN_FLIGHT_EVERY_SECONDS = 2.0
"""How often the completion tokens of the requests in flight are handed to the recorder."""


@dataclass(frozen=True)
class FinishedRequest:
    request_id: str
    model: str
    choices: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    complete: bool
    token_presented: bool  # the request carried the endpoint token (the server enforces it when one is set)
    flight_id: str | None = None
    """The id of its row in flight where that is not ``request_id`` (a relayed request's,
    ``upstream.exchange.Exchange.flight_id``): the ledger deletes that row in the finished row's commit."""


@dataclass(frozen=True)
class Serving:
    """A request in flight: its prompt tokens (each prompt once) and the completion tokens so far."""

    request_id: str
    model: str
    choices: int
    prompt_tokens: int
    completion_tokens: int
    token_presented: bool


Counts = Callable[[], tuple[int, int]]
"""A request's prompt tokens and completion tokens so far, as best known: what its row in flight holds."""


class RequestRecorder(Protocol):
    async def record(self, finished: FinishedRequest) -> None: ...
    @property
    def failure(self) -> str | None: ...  # why it can record nothing any more (/health then says "degraded")


@runtime_checkable
class TracksInFlight(Protocol):
    """A recorder that keeps requests in flight too; both calls return at once (they queue)."""

    def serving(self, requests: list[Serving]) -> None: ...
    def ended(self, request_ids: list[str]) -> None: ...


class Accounts:
    """The server state's side of recording: the recorder, if any, and records still pending."""

    def __init__(self) -> None:
        self.recorder: RequestRecorder | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, Tracked] = {}
        self._ticker: asyncio.Task[None] | None = None

    def bill(
        self, request_id: str, model: str, choices: int, *, token_presented: bool, per_prompt: int | None = None,
        generations: Sequence[Generation] = (), prompt_tokens: int = 0,
    ) -> Bill:
        """``per_prompt``: choices to a prompt, when a request holds several prompts (``batch.py``);
        ``generations`` and ``prompt_tokens``: what its row in flight is counted from."""
        return Bill(self, request_id, model, choices, token_presented, per_prompt or choices, generations=generations, prompt_tokens=prompt_tokens)

    def track(self, request_id: str, model: str, choices: int, *, token_presented: bool, counts: Counts) -> Tracked:
        """A request to keep in flight from its first text (``Tracked.serving``), counted by ``counts``."""
        return Tracked(self, Serving(request_id, model, choices, 0, 0, token_presented), counts)

    def _tracker(self) -> TracksInFlight | None:
        return self.recorder if isinstance(self.recorder, TracksInFlight) else None

    def begin(self, tracked: Tracked) -> None:
        """``tracked``'s request generated its first text: it is in flight from now on."""
        tracker = self._tracker()
        if tracker is None:
            return
        self._in_flight[tracked.request_id] = tracked
        tracker.serving([tracked.now()])
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())

    def end(self, tracked: Tracked, *, recorded: bool) -> None:
        """``tracked``'s request is no longer in flight; ``recorded``: its finished row replaces its row in flight."""
        if self._in_flight.get(tracked.request_id) is not tracked:
            return  # never in flight (no recorder keeps them), or another request under the same id (an upstream's) took its place
        del self._in_flight[tracked.request_id]
        if not recorded and (tracker := self._tracker()) is not None:
            tracker.ended([tracked.request_id])

    async def _tick(self) -> None:
        """Every ``IN_FLIGHT_EVERY_SECONDS`` while requests are in flight: the tokens of those that changed."""
        try:
            while self._in_flight:
                await asyncio.sleep(IN_FLIGHT_EVERY_SECONDS)
                changed = [serving for tracked in list(self._in_flight.values()) if (serving := tracked.progress()) is not None]
                if changed and (tracker := self._tracker()) is not None:
                    tracker.serving(changed)
        finally:
            self._ticker = None

    @property
    def failure(self) -> str | None:
        return None if self.recorder is None else self.recorder.failure

    async def record(self, finished: FinishedRequest) -> None:
        """Never fails the request: the buyer's answer matters more than our bookkeeping."""
        if self.recorder is None:
            return
        try:
            await self.recorder.record(finished)
        except Exception as exc:
            log.warning("request %s not recorded in the earnings ledger: %s", finished.request_id, exc)

    def record_later(self, bill: Bill, generations: Sequence[Generation]) -> None:
        if self.recorder is None or not generations:
            bill.tracked.end(recorded=False)
            return
        self.keep(asyncio.create_task(self._record_abandoned(bill, generations)))

    def keep(self, task: asyncio.Task[None]) -> None:
        """A record still being made (an abandoned request's, or one counted again once an
        upstream answers): kept alive, and waited for by ``flush``."""
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record_abandoned(self, bill: Bill, generations: Sequence[Generation]) -> None:
        # asyncio.wait, not wait_for(gather): cancelled at shutdown (a stalled engine never ends
        # them), a gather's CancelledError would be logged as "never retrieved", with a traceback.
        ending = [asyncio.ensure_future(_ended(g)) for g in generations]
        try:
            await asyncio.wait(ending, timeout=UNFINISHED_WAIT_SECONDS)
        finally:
            for task in ending:
                task.cancel()
        usage = batch_usage([g.usage for g in generations], bill.per_prompt)  # each prompt of a batch counted once
        if usage is None:
            log.warning("request %s not recorded in the earnings ledger: its usage never arrived", bill.request_id)
        elif usage.prompt_tokens == 0 and usage.completion_tokens == 0:
            log.debug("request %s not recorded in the earnings ledger: it ended while still queued", bill.request_id)
        elif usage.completion_tokens == 0 and any(task.done() and not task.cancelled() and task.result() for task in ending):
            log.debug("request %s not recorded in the earnings ledger: it failed before its first token", bill.request_id)
        else:
            bill.tracked.end(recorded=True)
            return await self.record(bill.finished(usage, complete=False))
        bill.tracked.end(recorded=False)

    async def flush(self, timeout: float = UNFINISHED_WAIT_SECONDS) -> None:
        """Wait for abandoned requests to be recorded (on shutdown, after the engine has stopped)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        if self._ticker is not None:
            self._ticker.cancel()


class Tracked:
    """One request's row in flight (see the module docstring): handed to the recorder at its first
    text, then each time the ticker finds its counts changed, until it ends."""

    def __init__(self, accounts: Accounts, request: Serving, counts: Counts) -> None:
        self._accounts = accounts
        self._request = request
        self._counts = counts
        self._begun = False
        self.ended = False
        self._written: tuple[int, int] | None = None
        """The counts last handed over."""

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def serving(self) -> None:
        """Its first text came (called at each; only the first does anything): it is in flight."""
        if not self._begun and not self.ended:
            self._begun = True
            self._accounts.begin(self)

    def end(self, *, recorded: bool) -> None:
        """It is no longer in flight; ``recorded``: its finished row replaces its row in flight."""
        if not self.ended:
            self.ended = True
            self._accounts.end(self, recorded=recorded)

    def now(self) -> Serving:
        """The request in flight as it is now."""
        return self._handed(self._counts())

    def progress(self) -> Serving | None:
        """The request now, if its counts changed since they were last handed over."""
        counts = self._counts()
        return self._handed(counts) if counts != self._written else None

    def _handed(self, counts: tuple[int, int]) -> Serving:
        self._written = prompt, completion = counts
        return dataclasses.replace(self._request, prompt_tokens=prompt, completion_tokens=completion)


class Bill:
    """One request of our engine's: settled with its final usage, or, if it ends early, abandoned."""

    def __init__(
        self, accounts: Accounts, request_id: str, model: str, choices: int, token_presented: bool, per_prompt: int = 0,
        *, generations: Sequence[Generation] = (), prompt_tokens: int = 0,
    ) -> None:
        self._accounts = accounts
        self.per_prompt = per_prompt or choices
        self.request_id = request_id
        self._model = model
        self._choices = choices
        self._token_presented = token_presented
        self.settled = False
        self.generations = generations
        self.tracked = accounts.track(request_id, model, choices, token_presented=token_presented, counts=self._counts)
        self._prompt_tokens = prompt_tokens

    def _counts(self) -> tuple[int, int]:
        """Exact: each prompt's tokens, and every generation's completion tokens so far."""
        return self._prompt_tokens, sum(g.completion_tokens_so_far for g in self.generations)

    def finished(self, usage: UsageOut, *, complete: bool) -> FinishedRequest:
        return FinishedRequest(
            self.request_id, self._model, self._choices, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
            usage.completion_tokens, complete, self._token_presented,
        )

    def serving(self) -> None:
        """Its first text came (called at each; only the first does anything): it is in flight."""
        if not self.settled and self.generations:
            self.tracked.serving()

    async def settle(self, usage: UsageOut) -> None:
        """Record the request with the usage the buyer is about to receive; call before the last byte."""
        self.settled = True
        self.tracked.end(recorded=True)
        await self._accounts.record(self.finished(usage, complete=True))

    def void(self) -> None:
        """The buyer is answered with an error and no usage (a whole answer the engine failed part
        way): nothing was sold, so nothing is recorded."""
        self.settled = True
        self.tracked.end(recorded=False)

    def abandon(self, generations: Sequence[Generation]) -> None:
        """The request ended without settling: record it once its cancelled generations stop."""
        if not self.settled:
            self.settled = True
            self._accounts.record_later(self, generations)


async def _ended(generation: Generation) -> bool:
    """Wait until ``generation`` has ended; True when the engine failed it (its buyer got the error)."""
    try:
        async for _ in generation:
            pass
    except EngineError:
        return True
    return False
