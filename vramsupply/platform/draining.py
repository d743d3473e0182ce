"""How the lifecycle tells the platform it drains, and reports what the drain served.

Apart from ``lifecycle.py`` because shutdown has its own accounting: every token served reaches the
platform exactly once, across the drain. At SIGTERM the ``draining`` notice carries what was served
until then; in-flight and queued requests then finish during the drain, and once it is over one last
``draining`` heartbeat carries what they served, before the DELETE (``ProviderLifecycle.stop``). A
heartbeat already on the wire at SIGTERM is never cancelled (the platform may have counted it): it
ends with its own timeout, and its answer decides whether its tokens were reported; the notice
carries only the tokens it does not (``tokens.TokenTally``). One whose answer never came is sent
again as it was, with its ``Idempotency-Key``, before the last heartbeat (``sending``). A heartbeat
loop that is only waiting for its next beat is cancelled at once.

Every wait is bounded by the deadlines drain and stop already had, so a platform that does not
answer delays the exit no longer than before; tokens that cannot be reported are said in one line,
never retried. Waits go through ``vramsupply.timeouts.within``, which never loses a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from vramsupply.platform.client import PlatformClient, PlatformError, UnexpectedAnswer, UnknownProvider
from vramsupply.platform.state import Phase
from vramsupply.timeouts import within

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from vramsupply.platform import api
    from vramsupply.platform.heartbeat import HeartbeatStatus, ServingStats
    from vramsupply.platform.tokens import TokenTally

log = logging.getLogger("vramsupply.platform")

MIN_LAST_BEAT_SECONDS = 1.0
"""Less time than this left for the last heartbeat after the one on its way went unanswered: it is
not sent (a call with no time to be answered), and the log says why instead of "no answer within 0 s"."""


class Draining:
    """Mixed into ``ProviderLifecycle``, whose state these methods read and set."""

    _client: PlatformClient
    _stats: Callable[[], ServingStats]
    _tally: TokenTally
    _beat_call: asyncio.Task[api.HeartbeatResponse] | None
    _stopping: bool
    provider_id: str | None
    # Methods of ProviderLifecycle these call (declared here for readers and type checkers).
    _set_phase: Callable[..., None]
    _cancel_loop: Callable[[], Awaitable[None]]
    _settle_register: Callable[[float], Awaitable[bool]]
    _beat: Callable[[str, HeartbeatStatus, ServingStats], asyncio.Task[api.HeartbeatResponse]]
    _send_unsettled_within: Callable[[str, float], Awaitable[str | None]]

    async def drain(self, timeout: float) -> None:
        """Stop heartbeating and tell the platform to route nothing new here (best effort, bounded);
        a register on its way is given the time to answer, so that its instance drains too. A
        heartbeat on its way is left to end (``stop`` waits for its answer)."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        await self._cancel_loop()
        await self._settle_register(timeout)
        if self.provider_id is None:
            return
        wait = max(deadline - time.monotonic(), timeout / 2)
        try:  # a 2xx the platform acted on (its body unreadable), or an id it no longer knows: nothing new comes
            with contextlib.suppress(UnexpectedAnswer, UnknownProvider):
                await within(self._beat(self.provider_id, "draining", self._stats()), max(0.0, wait))
        except (PlatformError, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer within {seconds(wait)}"
            self._set_phase(Phase.draining, f"draining, but could not tell the platform ({reason}): it may route requests here until it is deregistered", logging.WARNING)
            return
        self._set_phase(Phase.draining, "draining: the platform routes no new requests here")

    async def _report_rest(self, wait: float) -> None:
        """The drain is over: send the tokens no heartbeat the platform took carries (those served
        during the drain, and those of a heartbeat that failed) in one last ``draining`` heartbeat,
        within ``wait`` seconds, a heartbeat still on its way waited for first, and those whose
        answer did not come sent again before it, as they were (``sending``). Once, never retried."""
        end = time.monotonic() + wait
        try:
            unanswered = not await self._settle_beat(wait)
            if not self._tally.unreported(self._stats()):
                return
            left = end - time.monotonic()
            if self.provider_id is None:
                reason = "not registered"
            elif unanswered and left < MIN_LAST_BEAT_SECONDS:  # the one on its way took the time: no "no answer within 0 s"
                reason = f"the heartbeat on its way got no answer within {seconds(wait)}, so the last one was not sent"
            else:
                reason = await self._send_unsettled_within(self.provider_id, left)
                reason = reason or await self._last_beat(self.provider_id, end - time.monotonic())
            rest = self._tally.unreported(self._stats())
        except Exception:  # a fault of ours: it must not keep the instance listed
            log.exception("unexpected error reporting the last tokens served; deregistering anyway")
            return
        if reason is not None and rest:
            log.warning("could not report the last %s served to %s (%s): the platform's count misses them", rest, self._client.base_url, reason)

    async def _last_beat(self, provider_id: str, wait: float) -> str | None:
        """Send the last heartbeat; why it was not taken (None: it was)."""
        try:
            with contextlib.suppress(UnexpectedAnswer):  # a 2xx: the platform took it, and its tokens
                await within(self._beat(provider_id, "draining", self._stats()), max(0.0, wait))
        except (PlatformError, asyncio.TimeoutError) as exc:
            return str(exc) or f"no answer within {seconds(max(wait, 0.0))}"
        return None

    async def _settle_beat(self, wait: float) -> bool:
        """Let a heartbeat on its way end, within ``wait``: its answer decides whether its tokens
        were reported or go to the last heartbeat; one still unanswered then is cancelled, and in
        doubt is sent again as it was (``tokens``).
        Whether it ended (answered, refused or failed) in time; True when none was on its way."""
        call, self._beat_call = self._beat_call, None
        if call is None:
            return True
        try:
            await within(call, max(0.0, wait))
        except asyncio.TimeoutError:
            return False
        except Exception:
            pass
        return True

    async def _abandon_beat(self) -> None:
        """A stop cut short (cancelled) leaves no heartbeat running, nor its error unread."""
        call, self._beat_call = self._beat_call, None
        if call is None:
            return
        call.cancel()
        await asyncio.wait({call})
        if not call.cancelled():
            call.exception()


def seconds(value: float) -> str:
    """A duration as a person reads it: whole seconds, or tenths below ten."""
    return f"{value:.0f} s" if value >= 10 else f"{round(value, 1):g} s"
