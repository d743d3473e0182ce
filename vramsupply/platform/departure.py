"""How the lifecycle leaves the marketplace: the instances to delete at shutdown, and a
registration whose answer is still on its way.

Apart from ``lifecycle.py`` because leaving has cases of its own, each of which must end in an
honest phase: the current instance, instances retired at an old endpoint URL, a register still
unanswered (waited for, then its instance removed), and one whose outcome stays unknown (recorded
as "may still be listed", never "deregistered").

Also the instances killed earlier runs left listed (``leftovers``): deleted before registering,
all at once within ``LEFTOVER_TIMEOUT``. One whose DELETE fails stays kept and is tried again
while the agent serves, in a task of its own (a slow platform holds up no heartbeat), only after
the platform answered the loop's last call (an outage costs no extra requests), backing off like
the registration does, and at once when the platform comes back; and at the next start. Said
once when it fails first in a run, once when it is gone, once when it is given up; never per try.
An instance retired at an old endpoint URL whose DELETE fails (once the new URL is registered, or
at shutdown) joins them: kept in the record, retried the same way (``_keep_retired``).

At shutdown there is no later: the DELETE of this run's instance, and of those retired, is tried
again within the budget while the platform fails it in a way that may pass (a 5xx, a 429, a refused
connection: ``retrying``); the phase says how many tries it took, or were made in vain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from vramsupply.platform.backoff import Backoff
from vramsupply.platform.client import PlatformClient, PlatformError, RequestRejected
from vramsupply.platform.heartbeat import may_have_registered
from vramsupply.platform.leftovers import GIVE_UP_SECONDS, PendingLeftovers, days_kept
from vramsupply.platform.retrying import Tries, tries_within
from vramsupply.platform.state import KeptLeftover, Phase
from vramsupply.timeouts import within

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from vramsupply.platform import api
    from vramsupply.platform.offer import Offer

log = logging.getLogger("vramsupply.platform")

LEFTOVER_TIMEOUT = 3.0
"""Seconds the DELETEs of earlier runs' instances may hold up this run's registration (and each retry may take)."""
LEFTOVER_RETRY_CAP = 300.0
"""The longest wait between two retries of those DELETEs while the platform answers all else."""


class Departure:
    """Mixed into ``ProviderLifecycle``, whose state these methods read and set."""

    _client: PlatformClient
    _offer: Offer
    provider_id: str | None
    registered: asyncio.Event
    _register_call: asyncio.Future[api.RegisterResponse] | None
    _unconfirmed_register: bool
    _interval: float
    _retired: list[str]
    _retired_at: dict[str, str]  # the endpoint URL each retired instance was registered at
    _clock: Callable[[], float]
    # Methods of ProviderLifecycle these call (declared here for readers and type checkers).
    _set_phase: Callable[..., None]
    _adopt: Callable[[api.RegisterResponse], bool]

    def _init_leftovers(self, leftovers: PendingLeftovers | None, state_path: Path | None) -> None:
        self._leftovers = leftovers if leftovers is not None else PendingLeftovers(state_path)  # retired instances join it
        self._leftover_task: asyncio.Task[None] | None = None
        self._leftover_misses = 0  # retries in a row that left one listed: the backoff's step
        self._leftover_due = 0.0  # when (``_clock``) the next retry may go
        self._leftover_tries: dict[str, int] = {}  # DELETEs sent per id in this run, for the line that says it is gone

    def _pending_leftovers(self) -> list[KeptLeftover]:
        if self._leftovers is None:
            return []
        ours = self._leftovers.ours(self._client.base_url, self._client.account)
        return [left for left in ours if left.provider_id != self.provider_id and left.provider_id not in self._retired]

    async def _remove_leftovers(self) -> None:
        """At start, before registering: delete each instance earlier runs left listed, all at once
        within ``LEFTOVER_TIMEOUT``; one that stays is said once, and retried while serving."""
        pending = self._pending_leftovers()
        failures = await asyncio.gather(*(self._delete_leftover(left) for left in pending))
        for left, reason in zip(pending, failures):
            if reason is not None and self._leftovers is not None:
                was = self._leftovers.describe(left)
                log.warning("could not deregister %s: %s; retrying while serving and at the next start, and until then the platform's health checks will mark it offline", was, reason)
        if any(reason is not None for reason in failures):
            self._leftover_missed()

    def _retry_leftovers(self, recovered: bool) -> None:
        """After a call the platform answered: retry the DELETEs still failing, in the background,
        when the backoff says so, or at once when the platform has just come back (``recovered``)."""
        if self._leftover_task is not None and not self._leftover_task.done():
            return
        if not (recovered or self._clock() >= self._leftover_due) or not self._pending_leftovers():
            return
        self._leftover_task = asyncio.create_task(self._retry_leftovers_once(), name="leftover-retries")

    async def _retry_leftovers_once(self) -> None:
        try:
            pending = self._pending_leftovers()
            failures = await asyncio.gather(*(self._delete_leftover(left) for left in pending))
        except Exception:  # a fault of ours: serving and heartbeats go on, and so do later retries
            log.exception("unexpected error deleting the instances earlier runs left listed; trying again later")
            failures = [""]
        if any(reason is not None for reason in failures):
            self._leftover_missed()
        else:
            self._leftover_misses = 0

    def _leftover_missed(self) -> None:
        backoff = Backoff(initial=self._interval, cap=max(self._interval, LEFTOVER_RETRY_CAP))
        self._leftover_due = self._clock() + backoff.delay(self._leftover_misses)
        self._leftover_misses += 1

    async def _delete_leftover(self, left: KeptLeftover) -> str | None:
        """One DELETE within ``LEFTOVER_TIMEOUT``: None when the instance is gone (or given up,
        which is said), else why it is still listed."""
        assert self._leftovers is not None
        was = self._leftovers.describe(left)
        tries = self._leftover_tries[left.provider_id] = self._leftover_tries.get(left.provider_id, 0) + 1
        try:
            await within(self._client.deregister(left.provider_id), LEFTOVER_TIMEOUT)
        except RequestRejected as exc:  # the platform will not delete it, however often asked
            self._leftovers.forget(left.provider_id)
            log.warning("giving up deleting %s: the platform refused the DELETE (%s); it lists it offline", was, exc)
            return None
        except (PlatformError, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer within {LEFTOVER_TIMEOUT:g} s"
            log.debug("the DELETE of %s failed again (try %d in this run): %s", left.provider_id, tries, reason)
            if time.time() - left.noted_at < GIVE_UP_SECONDS:
                return reason
            self._leftovers.forget(left.provider_id)
            log.warning("giving up deleting %s: the platform failed every DELETE for %.0f days (last: %s)", was, days_kept(left, time.time()), reason)
            return None
        self._leftovers.forget(left.provider_id)
        log.info("deregistered %s%s", was, f", at try {tries} in this run" if tries > 1 else "")
        return None

    async def _stop_leftover_retries(self) -> None:
        """Shutdown: a retry on its way is dropped; the ids stay kept for the next start."""
        task, self._leftover_task = self._leftover_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _deregister_current(self, timeout: float, settled: bool) -> bool:
        if not settled:
            return self._maybe_still_listed(f"the registration sent to {self._client.base_url} was still unanswered at shutdown")
        if self.provider_id is None:
            if self._unconfirmed_register:
                return self._maybe_still_listed(f"a registration sent to {self._client.base_url} got no usable answer")
            self._set_phase(Phase.deregistered, "not registered; nothing to remove from the platform")
            return True
        return await self._deregister(self.provider_id, timeout)

    async def _retire_old_instances(self) -> None:
        """Once the new URL is registered: delete the instances we registered before (at an old
        endpoint URL, or drained by the platform), each within ``LEFTOVER_TIMEOUT``; one that stays
        is kept and retried while serving (``_keep_retired``). An id the platform gave back is us."""
        while self._retired:
            old = self._retired[-1]
            if old != self.provider_id:
                await self._deregister_retired(old, LEFTOVER_TIMEOUT, then="retrying while serving and at the next start")
            self._retired.remove(old)

    async def _remove_retired(self, retired: list[str], timeout: float, *, report: bool = False) -> bool:
        """Shutdown: delete the retired instances at once, each tried again within ``timeout`` while
        the platform fails it for a moment; True when all are gone (one that stays is kept for the
        next start). ``report``: they are all there was, so the outcome is the phase."""
        tries = await asyncio.gather(*(self._deregister_retired(old, timeout, then="the next start retries", retry=True) for old in retired))
        left = [old for old, made in zip(retired, tries) if made.failure is not None]
        if report and left:
            kept = " the next start retries, and until then" if any(k.provider_id in left for k in self._pending_leftovers()) else ""
            which = ", ".join(f"{old}{made.after_in_brackets}" for old, made in zip(retired, tries) if made.failure is not None)
            message = f"could not deregister {which}, registered at an endpoint URL no longer used;{kept} health checks will mark it offline"
            self._set_phase(Phase.deregister_failed, message, logging.WARNING)
        elif report:
            which = ", ".join(f"{old}{made.at_try_in_brackets}" for old, made in zip(retired, tries))
            self._set_phase(Phase.deregistered, f"deregistered {which}, registered at an endpoint URL no longer used, from {self._client.base_url}")
        return not left

    async def _deregister_retired(self, old: str, timeout: float, *, then: str, retry: bool = False) -> Tries:
        """The DELETE of a retired instance (``retry``: at shutdown, tried again within ``timeout``
        while the platform fails it for a moment); one that fails is kept (``then``: when it is
        retried), unless the platform refused it outright. How it went: ``Tries``."""
        tries = await tries_within(lambda: self._client.deregister(old), timeout, retry=retry)
        if isinstance(tries.failure, RequestRejected):  # however often asked, it will not delete it
            log.warning("could not deregister %s, an instance registered before this one%s: the platform refused the DELETE (%s); health checks will mark it offline", old, tries.after, tries.reason)
            return tries
        if tries.failure is not None:
            self._keep_retired(old)
            log.warning("could not deregister %s, an instance registered before this one%s: %s; %s, and until then the platform's health checks will mark it offline", old, tries.after, tries.reason, then)
            return tries
        log.info("deregistered %s, an instance registered before this one%s", old, tries.at_try)
        return tries

    def _keep_retired(self, old: str) -> None:
        """Keep a retired instance still listed with the leftovers: in the record (a run killed now
        leaves it to the next start), under this platform and account, and retried while serving."""
        assert self._leftovers is not None
        left = KeptLeftover(
            provider_id=old, platform_url=self._client.base_url, account=self._client.account, endpoint_url=self._retired_at.get(old, ""),
            pid=os.getpid(), noted_at=time.time(), retired=True,
        )  # fmt: skip
        self._leftovers.add(left)
        self._leftover_tries[old] = 1  # the line that says it is gone counts this try

    async def _deregister(self, provider_id: str, timeout: float) -> bool:
        """The DELETE of this run's instance at shutdown, tried again within ``timeout`` while the
        platform fails it for a moment (``retrying``)."""
        tries = await tries_within(lambda: self._client.deregister(provider_id), timeout)
        if tries.failure is not None:
            message = f"could not deregister {provider_id}{tries.after}: {tries.reason}; health checks will mark it offline"
            self._set_phase(Phase.deregister_failed, message, logging.WARNING)
            return False
        self.provider_id = None
        self._set_phase(Phase.deregistered, f"deregistered {provider_id} from {self._client.base_url}{tries.at_try}")
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
