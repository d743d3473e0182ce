"""How the lifecycle leaves the marketplace: the instances to delete at shutdown, and a
registration whose answer is still on its way.

Apart from ``lifecycle.py`` because leaving has cases of its own, each of which must end in an
honest phase: the current instance, instances retired at an old endpoint URL, a register still
unanswered (waited for, then its instance removed), and one whose outcome stays unknown (recorded
as "may still be listed", never "deregistered").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from vramsupply.platform.client import PlatformClient, PlatformError
from vramsupply.platform.heartbeat import may_have_registered
from vramsupply.platform.state import Phase
from vramsupply.timeouts import within

if TYPE_CHECKING:
    from collections.abc import Callable

    from vramsupply.platform import api
    from vramsupply.platform.offer import Offer
    from vramsupply.platform.state import Leftover

log = logging.getLogger("vramsupply.platform")

LEFTOVER_TIMEOUT = 3.0
"""Seconds the DELETE of the previous run's instance may hold up this run's registration."""


class Departure:
    """Mixed into ``ProviderLifecycle``, whose state these methods read and set."""

    _client: PlatformClient
    _offer: Offer
    provider_id: str | None
    registered: asyncio.Event
    _register_call: asyncio.Future[api.RegisterResponse] | None
    _unconfirmed_register: bool
    # Methods of ProviderLifecycle these call (declared here for readers and type checkers).
    _set_phase: Callable[..., None]
    _adopt: Callable[[api.RegisterResponse], bool]

    async def _remove_leftover(self, leftover: Leftover) -> None:
        """Delete the instance the previous run left listed (a quick tunnel's old URL stays listed
        until health checks fail, and a platform may not replace an instance at the same URL);
        best effort, within ``LEFTOVER_TIMEOUT``: health checks catch it otherwise."""
        was = f"{leftover.provider_id}, which the agent's previous run (process {leftover.pid}) left listed at {leftover.endpoint_url or 'its endpoint'}"
        try:
            await within(self._client.deregister(leftover.provider_id), LEFTOVER_TIMEOUT)
        except (PlatformError, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer within {LEFTOVER_TIMEOUT:g} s"
            log.warning("could not deregister %s: %s; the platform's health checks will mark it offline", was, reason)
            return
        log.info("deregistered %s", was)

    async def _deregister_current(self, timeout: float, settled: bool) -> bool:
        if not settled:
            return self._maybe_still_listed(f"the registration sent to {self._client.base_url} was still unanswered at shutdown")
        if self.provider_id is None:
            if self._unconfirmed_register:
                return self._maybe_still_listed(f"a registration sent to {self._client.base_url} got no usable answer")
            self._set_phase(Phase.deregistered, "not registered; nothing to remove from the platform")
            return True
        return await self._deregister(self.provider_id, timeout)

    async def _remove_retired(self, retired: list[str], timeout: float, *, report: bool = False) -> bool:
        """Delete the retired instances at once, within ``timeout``; True when all are gone.
        ``report``: they are all there was, so the outcome is the phase."""
        gone = await asyncio.gather(*(self._deregister_retired(old, timeout) for old in retired))
        left = [old for old, removed in zip(retired, gone) if not removed]
        if report and left:
            message = f"could not deregister {', '.join(left)}, registered at an endpoint URL no longer used; health checks will mark it offline"
            self._set_phase(Phase.deregister_failed, message, logging.WARNING)
        elif report:
            self._set_phase(Phase.deregistered, f"deregistered {', '.join(retired)}, registered at an endpoint URL no longer used, from {self._client.base_url}")
        return not left

    async def _deregister_retired(self, old: str, timeout: float) -> bool:
        try:
            await within(self._client.deregister(old), timeout)
        except (PlatformError, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer within {timeout:g}s"
            log.warning("could not deregister %s, an instance registered before this one: %s; health checks will mark it offline", old, reason)
            return False
        log.info("deregistered %s, an instance registered before this one", old)
        return True

    async def _deregister(self, provider_id: str, timeout: float) -> bool:
        try:
            await within(self._client.deregister(provider_id), timeout)
        except (PlatformError, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer within {timeout:g}s"
            message = f"could not deregister {provider_id}: {reason}; health checks will mark it offline"
            self._set_phase(Phase.deregister_failed, message, logging.WARNING)
            return False
        self.provider_id = None
        self._set_phase(Phase.deregistered, f"deregistered {provider_id} from {self._client.base_url}")
        self.registered.clear()
        return True

    def _maybe_still_listed(self, why: str) -> bool:
        """No instance id to remove, yet the platform may have made one: say so, never "deregistered"."""
        message = f"{why}: the platform may list {self._offer.model} at {self._offer.endpoint_url} until its health checks fail"
        self._set_phase(Phase.deregister_failed, message, logging.WARNING)
        return False

    async def _settle_register(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a register still on its way and adopt the instance it made;
        False while its outcome is unknown."""
        call = self._register_call
        if call is None:
            return True
        await asyncio.wait({call}, timeout=max(0.0, timeout))
        if not call.done():
            return False
        self._register_call = None
        failure = None if call.cancelled() else call.exception()
        if call.cancelled() or failure is not None:
            self._unconfirmed_register = self._unconfirmed_register or not isinstance(failure, PlatformError) or may_have_registered(failure)
        else:
            self._adopt(call.result())
        return True

    async def _abandon_register(self) -> None:
        call, self._register_call = self._register_call, None
        if call is not None and not call.done():
            call.cancel()
        if call is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
