"""Which served tokens the platform has been told of, so that each reaches it exactly once.

Heartbeats carry deltas without a sequence number (docs/platform-api.md), so the agent keeps the
books: a heartbeat *claims* the tokens no heartbeat has claimed yet as it is built; the claim stands
once the platform took the heartbeat (any 2xx, an answer we cannot read included) and is given back
when it did not (an error status, a request that never reached it), so the next heartbeat carries
those tokens again. Claims, rather than one "reported up to here" mark, let two heartbeats be on
their way at once, as at shutdown: the draining notice goes out while a regular heartbeat still
waits for its answer, and carries only the tokens that one does not.

A heartbeat that may have reached the platform but got no answer (no answer in time, a connection
dropped after the request went out, a gateway's 502/504, a request cancelled on its way) is in
doubt: the platform may have counted it. Its claim is neither given back nor taken as reported: the
heartbeat is kept (``unsettled``) and sent again exactly as it was, with the same
``Idempotency-Key`` (``Beat.key``), before any other tokens go; a platform that took it answers
without counting it again. Giving its tokens to the next heartbeat instead, as the agent once did,
had a platform that answered late count them twice.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from vramsupply.platform import api
from vramsupply.platform.client import PlatformUnavailable, UnexpectedAnswer

if TYPE_CHECKING:
    from vramsupply.platform.heartbeat import ServingStats

T = TypeVar("T")


@dataclass(frozen=True)
class Tokens:
    prompt: int = 0
    completion: int = 0

    def __bool__(self) -> bool:
        return self.prompt > 0 or self.completion > 0

    def __str__(self) -> str:
        return f"{self.prompt} prompt and {self.completion} completion tokens"


@dataclass(frozen=True, eq=False)
class Beat:
    """One heartbeat as sent, with the tokens it claims and its ``Idempotency-Key``: sent again, it
    is this very request."""

    request: api.HeartbeatRequest
    claim: Tokens
    key: str = field(default_factory=lambda: secrets.token_hex(16))


class TokenTally:
    """The engine's token counters, split into those claimed by heartbeats and the rest; and the
    heartbeats in doubt (``unsettled``), whose claims stand until the platform answers them."""

    def __init__(self) -> None:
        self._claimed = Tokens()
        self._unsettled: list[Beat] = []

    def start_at(self, stats: ServingStats) -> None:
        """Tokens served before this lifecycle started are no instance's of ours."""
        self._claimed = Tokens(stats.prompt_tokens_total, stats.completion_tokens_total)

    def rest(self, stats: ServingStats) -> Tokens:
        """Served, and in no heartbeat the platform took or that is on its way."""
        claimed = self._claimed
        return Tokens(max(0, stats.prompt_tokens_total - claimed.prompt), max(0, stats.completion_tokens_total - claimed.completion))

    def claim(self, stats: ServingStats) -> Tokens:
        """The rest, for the heartbeat about to be sent."""
        rest = self.rest(stats)
        self._claimed = Tokens(self._claimed.prompt + rest.prompt, self._claimed.completion + rest.completion)
        return rest

    def unreported(self, stats: ServingStats) -> Tokens:
        """The rest, and the tokens of the heartbeats in doubt: what the platform may not have."""
        rest = self.rest(stats)
        return Tokens(rest.prompt + sum(b.claim.prompt for b in self._unsettled), rest.completion + sum(b.claim.completion for b in self._unsettled))

    @property
    def unsettled(self) -> list[Beat]:
        """The heartbeats that may have reached the platform unanswered, oldest first: to send again."""
        return list(self._unsettled)

    def give_back(self, beat: Beat) -> None:
        """The platform did not take ``beat`` (or it is another instance's): its tokens go in the next heartbeat."""
        if beat in self._unsettled:
            self._unsettled.remove(beat)
        claim = beat.claim
        self._claimed = Tokens(self._claimed.prompt - claim.prompt, self._claimed.completion - claim.completion)

    async def carried_by(self, beat: Beat, answer: Awaitable[T]) -> T:
        """The answer to ``beat``; its claim stands if the platform took it, is given back if it
        refused it or never got it, and stays in doubt while it may have taken it unanswered (a
        heartbeat sent again stays in doubt until the platform answers it)."""
        again = beat in self._unsettled
        try:
            reply = await answer
        except UnexpectedAnswer:  # a 2xx: the platform took the heartbeat, and its tokens
            self._settle(beat)
            raise
        except PlatformUnavailable as exc:
            if exc.reached or again:  # it may have arrived, now or the first time
                self._doubt(beat)
            else:
                self.give_back(beat)
            raise
        except (asyncio.CancelledError, asyncio.TimeoutError):  # cut short on its way: it may have arrived
            self._doubt(beat)
            raise
        except BaseException:  # refused: carried on
            self.give_back(beat)
            raise
        self._settle(beat)
        return reply

    def _settle(self, beat: Beat) -> None:
        if beat in self._unsettled:
            self._unsettled.remove(beat)

    def _doubt(self, beat: Beat) -> None:
        if beat not in self._unsettled:
            self._unsettled.append(beat)
