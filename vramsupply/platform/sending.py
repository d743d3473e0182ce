"""Sending a heartbeat, and sending again, as it was, one whose answer did not come.

Apart from ``lifecycle.py`` because both the heartbeat loop and shutdown (``draining``) send a
heartbeat in doubt again (``tokens``), and the same way: the very request, with its
``Idempotency-Key``, before any heartbeat that carries other tokens. In the loop that happens at the
next beat: once the platform answers it, the regular heartbeat follows at once, and only that one's
answer says how the platform lists us (the one sent again may be a beat old). While it fails, the
failure is recorded as any heartbeat's, and no other heartbeat goes: they would carry tokens the
platform may count twice. A heartbeat in doubt for an instance we no longer have (registered again)
cannot be asked about: its tokens go to the next heartbeat, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vramsupply.platform import api
from vramsupply.platform.client import PlatformClient, PlatformError, UnexpectedAnswer, UnknownProvider
from vramsupply.platform.draining import seconds as seconds_text
from vramsupply.platform.tokens import Beat, TokenTally
from vramsupply.timeouts import within

if TYPE_CHECKING:
    from vramsupply.platform.heartbeat import HeartbeatStatus, ServingStats

log = logging.getLogger("vramsupply.platform")


class HeartbeatSending:
    """Mixed into ``ProviderLifecycle``, whose state these methods read and set."""

    _client: PlatformClient
    _tally: TokenTally
    _offer: api.RegisterRequest
    _beat_call: asyncio.Task[api.HeartbeatResponse] | None
    _last_heartbeat_at: float | None
    _heard_at: float | None
    _clock: Callable[[], float]
    _record_failure: Callable[[PlatformError], None]
    _register_again: Callable[[str], None]

    def _beat(self, provider_id: str, status: HeartbeatStatus, snapshot: ServingStats) -> asyncio.Task[api.HeartbeatResponse]:
        """One heartbeat, sent as its own task: status plus the tokens served that no heartbeat the
        platform took (or still on its way, or in doubt) carries (``tokens.TokenTally``)."""
        claim = self._tally.claim(snapshot)
        request = api.HeartbeatRequest(
            provider_id=provider_id,
            status=status,
            slots_total=snapshot.slots_total,
            slots_busy=snapshot.slots_busy,
            queue_depth=snapshot.queue_depth,
            prompt_tokens=claim.prompt,
            completion_tokens=claim.completion,
            capacity=self._offer.capacity,
        )
        return self._send(Beat(request, claim))

    def _send(self, beat: Beat) -> asyncio.Task[api.HeartbeatResponse]:
        return asyncio.ensure_future(self._tally.carried_by(beat, self._client.heartbeat(beat.request, key=beat.key)))

    async def _send_unsettled(self, provider_id: str) -> bool:
        """In the loop: send the heartbeats in doubt again; whether the platform answered them all
        (False: the failure is recorded, or it forgot us and the next attempt registers again). The
        request runs as its own task, as a regular heartbeat's does: shutdown leaves it to end."""
        for beat in self._tally.unsettled:
            if beat.request.provider_id != provider_id:
                self._tally.give_back(beat)
                continue
            call = self._beat_call = self._send(beat)
            try:
                with contextlib.suppress(UnexpectedAnswer):  # a 2xx: taken
                    await asyncio.shield(call)
            except UnknownProvider:
                self._register_again(f"the platform no longer knows {provider_id}; registering again")
                return False
            except PlatformError as exc:
                self._record_failure(exc)
                return False
            finally:
                if call.done():
                    self._beat_call = None
            self._last_heartbeat_at, self._heard_at = time.time(), self._clock()
            log.info("the heartbeat whose answer had not come (%s) was sent again with its Idempotency-Key, and answered", beat.claim)
        return True

    async def _send_unsettled_within(self, provider_id: str, wait: float) -> str | None:
        """At shutdown: send the heartbeats in doubt again within ``wait`` seconds; why one was not
        answered (None: all were). Once each, never retried."""
        end = time.monotonic() + wait
        for beat in self._tally.unsettled:
            if beat.request.provider_id != provider_id:
                self._tally.give_back(beat)
                continue
            left = max(0.0, end - time.monotonic())
            try:
                with contextlib.suppress(UnexpectedAnswer):
                    await within(self._send(beat), left)
            except (PlatformError, asyncio.TimeoutError) as exc:
                return str(exc) or f"no answer within {seconds_text(left)}"
        return None
