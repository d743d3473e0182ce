"""Which served tokens the platform has been told of, so that each reaches it exactly once.

Heartbeats carry deltas without a sequence number (docs/platform-api.md), so the agent keeps the
books: a heartbeat *claims* the tokens no heartbeat has claimed yet as it is built; the claim stands
once the platform took the heartbeat (any 2xx, an answer we cannot read included) and is given back
when it did not (an error status, no answer, a request cancelled), so the next heartbeat carries
those tokens again. Claims, rather than one "reported up to here" mark, let two heartbeats be on
their way at once, as at shutdown: the draining notice goes out while a regular heartbeat still
waits for its answer, and carries only the tokens that one does not; whichever fails, its tokens
go to the last heartbeat sent once the drain is over.

A heartbeat the platform took but answered after our timeout is given back and sent again: a known
limit of a protocol without sequence numbers (the platform then counts those tokens twice).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from vramsupply.platform.client import UnexpectedAnswer

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


class TokenTally:
    """The engine's token counters, split into those claimed by heartbeats and the rest."""

    def __init__(self) -> None:
        self._claimed = Tokens()

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

    def give_back(self, claim: Tokens) -> None:
        self._claimed = Tokens(self._claimed.prompt - claim.prompt, self._claimed.completion - claim.completion)

    async def carried_by(self, claim: Tokens, answer: Awaitable[T]) -> T:
        """The heartbeat's answer; its claim stands only if the platform took it."""
        try:
            return await answer
        except UnexpectedAnswer:  # a 2xx: the platform took the heartbeat, and its tokens
            raise
        except BaseException:  # refused, unanswered, or cancelled before its answer: carried on
            self.give_back(claim)
            raise
