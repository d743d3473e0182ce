"""How long the lifecycle waits before asking the platform again, and what may cut that short.

Apart from ``lifecycle.py`` because the wait now has rules of its own, which read best in one place:

- the lifecycle's own wait (the heartbeat interval, or the backoff after a failed register) ends
  early when ``move_endpoint`` asks for a register at once, when the engine's status changes
  from what the platform last heard (it then hears at once), or when the config file of a rejected
  API key is written (`vramsupply login`: ``phase_log``);
- a 429 or 503 that says when to ask again (``Retry-After``) is a floor under that wait: the
  lifecycle waits at least that long, capped at ``RETRY_AFTER_CAP``, and only shutdown (which
  cancels the loop) cuts it short. A move or a status change during it is acted on the moment it
  ends: asking sooner would only meet the same refusal and tell a rate limiter we do not listen,
  while the platform's own health checks see a down engine meanwhile;
- a heartbeat is held back as asked even past the platform's offline threshold
  (``SILENT_OFFLINE_SECONDS``), with a warning that says so. A refused heartbeat keeps nothing
  listed, so asking sooner helps only if the platform misjudged its own recovery; it knows its
  threshold, and when the wait ends the agent recovers by itself (an ``offline`` answer is listed
  again by the next health check, a 404 registers again at once).

``RETRY_AFTER_CAP`` is ten minutes: long enough to honour any rate limit or short outage a
platform announces, short enough that an absurd or mistaken header (a maintenance page's
"come back in an hour") costs a serving agent at most ten minutes unlisted once the platform is
back. Values past a day are not read at all (``backoff.RETRY_AFTER_MAX_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from vramsupply.platform.heartbeat import heartbeat_status
from vramsupply.timeouts import event_within

if TYPE_CHECKING:
    from vramsupply.platform.heartbeat import HeartbeatStatus, ServingStats

log = logging.getLogger("vramsupply.platform")

RETRY_AFTER_CAP = 600.0
"""The longest the lifecycle waits because the platform asked (``Retry-After``)."""
SILENT_OFFLINE_SECONDS = 180.0
"""After this long without a heartbeat the platform lists an instance offline (docs/platform-api.md)."""
STATUS_POLL_SECONDS = 0.5
"""How often, between heartbeats, the lifecycle looks for a change the platform must hear at once."""

Sleep = Callable[[float], Awaitable[None]]


class RetryWait:
    """Mixed into ``ProviderLifecycle``, whose state these methods read and set."""

    provider_id: str | None
    _wake: asyncio.Event
    _sleep: Sleep
    _asked: float | None
    _sent_status: HeartbeatStatus | None
    _stats: Callable[[], ServingStats]
    _key_file_changed: Callable[[], bool]

    def _platform_asks(self, seconds: float | None) -> str:
        """Hold the next attempt back ``seconds`` (capped), as the platform asked (None or 0: it
        did not); the few words that say when the lifecycle tries again."""
        if not seconds:
            self._asked = None
            return "retrying in the background"
        self._asked = min(seconds, RETRY_AFTER_CAP)
        longest = f" (it asked for {math.ceil(seconds)} s; {RETRY_AFTER_CAP:g} s is the most the agent waits)" if seconds > RETRY_AFTER_CAP else ""
        return f"trying again in {math.ceil(self._asked)} s as the platform asks{longest}"

    async def _pause(self, seconds: float) -> None:
        """Wait what the platform asked (only shutdown cuts that short), then the rest of
        ``seconds``, ended early by ``move_endpoint`` or a change of the engine's status."""
        asked, self._asked = self._asked, None
        if asked:
            self._warn_if_listed_offline_meanwhile(asked)
            await self._sleep(asked)
            seconds -= asked
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._status_changed() and not self._key_file_changed():
            if await event_within(self._wake, min(left, STATUS_POLL_SECONDS)):
                break
        self._wake.clear()

    def _warn_if_listed_offline_meanwhile(self, seconds: float) -> None:
        if self.provider_id is not None and seconds > SILENT_OFFLINE_SECONDS:
            log.warning(
                "holding heartbeats for %s back %d s as the platform asks, longer than the %d s after which it lists a silent "
                "instance offline: it may list it offline meanwhile (still serving locally; the next heartbeat says)",
                self.provider_id, math.ceil(seconds), SILENT_OFFLINE_SECONDS,
            )  # fmt: skip

    def _status_changed(self) -> bool:
        return self.provider_id is not None and self._sent_status is not None and heartbeat_status(self._stats()) != self._sent_status
