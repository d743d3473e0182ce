"""A shutdown DELETE the platform failed for a moment is sent again, within the seconds shutdown has.

Why: the agent's client tries each call once (``attempts=1``: while serving, the lifecycle's loops
retry on schedules of their own), and at shutdown nothing comes after the DELETE. One answered 503
or 429, or refused for the half second a platform restarts, left the instance listed: buyers were
routed to a dead URL until the platform's health checks noticed, or the next start deleted it. So
within the budget ``stop`` computes, a DELETE that failed in a way that may pass is tried again
after a short backoff (``SHUTDOWN_BACKOFF``), each try given only the time left.

Worth another try: ``PlatformUnavailable`` (no connection, a dropped answer, a 429 or 5xx), what
the client itself retries; a DELETE sent twice is harmless (an instance already gone answers 404,
which is success). Never sooner than a ``Retry-After`` asks, and given up at once when that is past
the budget, as the client does. The platform's last word is not asked again: ``ApiKeyRejected``
(401) and ``RequestRejected`` (another 4xx) refuse the DELETE outright; ``UnexpectedAnswer`` is a
2xx that did not confirm the removal (the platform acted, and would answer the same); any other
``PlatformError`` is a redirect (never followed) or an answer not read. A try that runs out of time
(``asyncio.TimeoutError``) has used up the budget. The while-serving retries of the instances left
listed (``departure``) keep their own, slower backoff: this is for the last seconds only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vramsupply.platform.backoff import Backoff
from vramsupply.platform.client import PlatformError, PlatformUnavailable
from vramsupply.timeouts import within

SHUTDOWN_BACKOFF = Backoff(initial=0.25, cap=2.0)
"""Between the tries of one shutdown DELETE: a blip is over by the next, a restart within seconds."""
SHORTEST_TRY = 0.2
"""Seconds a try must have left to be worth sending: less, and the failure before it is the answer."""


@dataclass(frozen=True)
class Tries:
    """How a call went: ``count`` tries; ``failure``: why the last failed (None: it succeeded);
    ``last_had``: the seconds the last try was given."""

    count: int
    failure: PlatformError | asyncio.TimeoutError | None
    last_had: float

    @property
    def after(self) -> str:
        """For the line that says it failed: " after N tries", nothing for one."""
        return f" after {self.count} tries" if self.count > 1 else ""

    @property
    def at_try(self) -> str:
        """For the line that says it worked: ", at try N", nothing for the first."""
        return f", at try {self.count}" if self.count > 1 else ""

    @property
    def after_in_brackets(self) -> str:
        """The same, in a list of several: " (after N tries)", nothing for one."""
        return f" (after {self.count} tries)" if self.count > 1 else ""

    @property
    def at_try_in_brackets(self) -> str:
        """The same, in a list of several: " (at try N)", nothing for the first."""
        return f" (at try {self.count})" if self.count > 1 else ""

    @property
    def reason(self) -> str:
        """Why the last try failed, on one line (a timeout's ``str()`` is empty)."""
        if self.failure is None or str(self.failure):
            return str(self.failure or "")
        return f"no answer within {self.last_had:g}s" if self.count == 1 else f"no answer to the last within {self.last_had:.1f}s"


async def tries_within(call: Callable[[], Awaitable[object]], seconds: float, *, retry: bool = True, backoff: Backoff = SHUTDOWN_BACKOFF) -> Tries:
    """``call()`` within ``seconds``, tried again after a ``PlatformUnavailable`` while time is left
    (``retry``: False tries once); what other ``PlatformError`` or a timeout ends it."""
    deadline = time.monotonic() + seconds
    count, have = 0, seconds  # the first try has the whole budget, exactly (it is said when it runs out)
    while True:
        count += 1
        try:
            await within(call(), have)
            return Tries(count, None, have)
        except PlatformUnavailable as exc:
            failed: PlatformUnavailable = exc
        except (PlatformError, asyncio.TimeoutError) as exc:
            return Tries(count, exc, have)
        pause = max(backoff.delay(count - 1), failed.retry_after or 0.0)
        if not retry or deadline - time.monotonic() - pause < SHORTEST_TRY:
            return Tries(count, failed, have)
        await asyncio.sleep(pause)
        have = deadline - time.monotonic()
