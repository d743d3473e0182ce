"""Keeping a serving agent listed on the marketplace: register, heartbeat, deregister.

The lifecycle never stops the agent from serving: when the platform is unreachable or refuses us,
it keeps retrying in the background (capped exponential backoff with jitter, never sooner than a
``Retry-After`` asks: ``retry_wait``) and logs once per state change, not once per try. Every state
change is also written to the registration state file that `vramsupply status` reads.

The platform's word is checked, not assumed: a heartbeat answer that no longer lists this instance
as ours and serving (another id, ``draining`` we did not ask for, an unknown status) registers
again, and a heartbeat the platform accepted (2xx) counts its tokens as reported even when the
answer's body is unreadable. An ``offline`` answer after our heartbeats went missing for about the
platform's silence limit is put down to that silence, not to a failing health check. Shutdown never
claims more than it knows: the draining notice is reported as sent only once the platform took it,
a registration still in flight is waited for and removed again, and one whose outcome stays
unknown is recorded as such. Every token served reaches the platform once, across a shutdown too:
what the drain served goes in one last heartbeat before the DELETE, and a heartbeat on the wire at
SIGTERM is let end rather than sent again (``tokens``, ``draining``); one whose answer never came
(the platform may have counted it) is sent again as it was, with its ``Idempotency-Key``, before
any other tokens go (``sending``); while the platform surely still lists us, such a heartbeat
leaves the phase ``registered`` (or ``offline``) with a note, not ``unreachable`` (``phase_log``).
A state file that cannot be written is logged when that changes.

A tunnel may change the public URL at any moment (``move_endpoint``). The instance at the old URL
is retired: deleted once the new one is registered, or at shutdown at the latest, and while that
DELETE fails kept with the leftovers below and retried like them (``departure``). A register
answer for a URL we no longer have is an instance to retire, never ours. Once shutdown has begun a
move is only logged: registering again then would list an agent that is about to go away.

What outlives one run or changes under a running agent: the instances killed earlier runs left
listed are deleted before the first register (bounded to a few seconds, never fatal), and while
their DELETE fails they are kept in the state file, retried while serving and at the next start
(``leftovers``, ``departure``); a rejected API key from the config file is replaced as soon as
`vramsupply login` stores another, and an outage is recalled every 15 minutes (``phase_log``);
each heartbeat carries the capacity bench.json holds now (``capacity``); and an offline listing
while the agent itself was paused is put down to the pause (``pauses``, ``offline_reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from vramsupply.platform import api
from vramsupply.platform.api_key import ApiKeySource
from vramsupply.platform.backoff import Backoff
from vramsupply.platform.capacity import CapacityWatch
from vramsupply.platform.client import PlatformClient, PlatformError, UnexpectedAnswer, UnknownProvider
from vramsupply.platform.departure import Departure
from vramsupply.platform.draining import Draining
from vramsupply.platform.offline_reason import HEALTH_CHECK_SECONDS, OfflineReason
from vramsupply.platform.heartbeat import HeartbeatStatus, ServingStats, heartbeat_status, may_have_registered, not_listed_as_ours
from vramsupply.platform.leftovers import PendingLeftovers
from vramsupply.platform.pauses import PauseWatch
from vramsupply.platform.phase_log import PhaseLog
from vramsupply.platform.retry_wait import SILENT_OFFLINE_SECONDS, RetryWait, Sleep
from vramsupply.platform.sending import HeartbeatSending
from vramsupply.platform.state import Phase
from vramsupply.platform.tokens import TokenTally

log = logging.getLogger("vramsupply.platform")

REGISTER_BACKOFF = Backoff(initial=1.0, cap=60.0)
"""Between registration attempts: quick at first, then at most once a minute (unless the platform asks for longer)."""

__all__ = ["ProviderLifecycle", "ServingStats", "heartbeat_status"]


class ProviderLifecycle(Departure, Draining, HeartbeatSending, RetryWait, OfflineReason, PhaseLog):
    """Registers ``offer`` and heartbeats with ``stats()`` until ``stop()``; owns ``client``.
    ``sleep``: how the waits the platform asks for are waited (a test passes one that records them).
    ``silence_limit``, ``health_check_every``: the platform's timings (docs/platform-api.md): after
    how long without a heartbeat it lists an instance offline, and how often it checks /health.
    ``api_key_source``: where the key came from (``api_key``); ``capacity``: the measured capacity,
    kept up to date with bench.json; ``leftovers``: the instances killed earlier runs left listed,
    deleted before registering and retried while serving until gone (``departure``); ``clock``: the
    monotonic clock that times pauses, silences and reminders (a test passes one it moves)."""

    def __init__(
        self,
        client: PlatformClient,
        offer: api.RegisterRequest,
        stats: Callable[[], ServingStats],
        *,
        heartbeat_interval: float,
        backoff: Backoff = REGISTER_BACKOFF,
        state_path: Path | None = None,
        local_url: str | None = None,
        tunnel: str | None = None,
        sleep: Sleep = asyncio.sleep,
        silence_limit: float = SILENT_OFFLINE_SECONDS,
        health_check_every: float = HEALTH_CHECK_SECONDS,
        api_key_source: ApiKeySource | None = None,
        capacity: CapacityWatch | None = None,
        leftovers: PendingLeftovers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._clock = clock
        self._api_key_source, self._capacity = api_key_source, capacity
        self._init_leftovers(leftovers, state_path)
        self._pauses = PauseWatch(clock)
        self._listed_at: float | None = None  # when (``clock``) the platform last answered without listing us offline
        self._init_phase_log()
        self._offer = offer
        self._stats = stats
        self._interval = heartbeat_interval
        self._backoff = backoff
        self._state_path = state_path
        self._local_url = local_url
        self._tunnel = tunnel
        self._probe_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sleep = sleep
        self._asked: float | None = None
        """The wait the platform asked for (Retry-After, capped) before the next attempt."""
        self._stopping = False
        self._moves = 0
        self._tally = TokenTally()
        self._silence_limit, self._listed_again_within = silence_limit, 2 * health_check_every
        self._init_registration()
        self._init_heartbeats()
        self._odd_answers: set[str] = set()
        self.registered = asyncio.Event()
        self.provider_id: str | None = None
        self.phase = Phase.registering
        self.message = ""

    def _init_registration(self) -> None:
        self._register_call: asyncio.Task[api.RegisterResponse] | None = None
        """The register request on its way: shutdown cancels the loop around it, never the request."""
        self._register_url: str | None = None
        """The endpoint URL that request registers (its answer is ours only while the URL is current)."""
        self._unconfirmed_register = False
        """A register since the last one that worked may have made an instance we know no id of
        (one that works replaces it: the platform keeps one instance per endpoint URL)."""
        self._forgotten = 0
        """Registrations in a row that the platform forgot (or drained) before listing us."""
        self._retired: list[str] = []
        """Instances of ours at an endpoint URL we no longer use (or drained by the platform), to delete."""
        self._retired_at: dict[str, str] = {}

    def _init_heartbeats(self) -> None:
        self._beat_call: asyncio.Task[api.HeartbeatResponse] | None = None
        """The heartbeat request on its way: shutdown cancels the loop around it, never the request."""
        self._last_heartbeat_at: float | None = None
        self._heard_at: float | None = None  # when (monotonic) the platform last took a heartbeat or registration of ours
        self._silence: tuple[float, str] | None = None  # when an offline answer was put down to missed heartbeats, and why
        self._sent_status: HeartbeatStatus | None = None
        """The status of the last heartbeat tried (registration counts as ``online``)."""
        self._recovering = False
        """We told the platform we were offline, and it has not listed us online again yet."""

    def start(self) -> None:
        """Begin registering in the background; call once the server answers requests."""
        self._tally.start_at(self._stats())
        self._set_phase(Phase.registering, f"registering {self._offer.model} at {self._offer.endpoint_url} with {self._client.base_url}")
        self._task = asyncio.create_task(self._run(), name="provider-lifecycle")
        self._pauses.start()

    @property
    def endpoint_url(self) -> str | None:
        return self._offer.endpoint_url

    def move_endpoint(self, url: str) -> None:
        """The public URL changed (a tunnel restarted): register the new one now, retire the old
        instance. During shutdown the move is only logged."""
        if url == self._offer.endpoint_url:
            return
        if self._stopping:
            log.info("the endpoint moved to %s during shutdown; not registering it", url)
            return
        was, self._offer = self._offer.endpoint_url or "", self._offer.model_copy(update={"endpoint_url": url})
        self._moves += 1
        if self.provider_id is not None:
            self._retire(self.provider_id, was)
            self.provider_id = None
            self.registered.clear()
        self._set_phase(Phase.registering, f"the endpoint moved to {url}; registering it with {self._client.base_url}")
        self._wake.set()

    async def stop(self, timeout: float) -> bool:
        """Deregister within ``timeout`` seconds; True when the platform no longer lists us.

        A register still on its way gets those seconds to answer, and the instance it made is then
        removed (the DELETEs get what is left, at least a quarter of ``timeout``), as are the
        instances retired at an old endpoint URL and not deleted yet. Before the DELETE, the tokens
        served since the platform last took a heartbeat (those of the drain) go in one last
        heartbeat, given at most half the time left, so a platform that does not answer delays
        the exit no longer than the DELETE alone could."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        await self._cancel_loop()
        try:
            settled = await self._settle_register(timeout)
            await self._report_rest(max(deadline - time.monotonic(), 0.0) / 2)
            left = max(round(max(deadline - time.monotonic(), timeout / 4), 1), 0.1)  # in tenths: it is said when it runs out
            retired, self._retired = [old for old in self._retired if old != self.provider_id], []
            if retired and self.provider_id is None and settled and not self._unconfirmed_register:
                return await self._remove_retired(retired, left, report=True)
            current, gone = await asyncio.gather(self._deregister_current(left, settled), self._remove_retired(retired, left))
            return current and gone
        finally:
            await self._abandon_register()
            await self._abandon_beat()
            await self._client.close()

    async def _cancel_loop(self) -> None:
        """Stop registering and heartbeating. A register or heartbeat request on its way goes on
        (``_register_call``, ``_beat_call``): its answer decides what the platform knows."""
        if self._probe_task is not None:
            self._probe_task.cancel()
        self._pauses.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_leftover_retries()  # after the loop, which starts them

    async def _run(self) -> None:
        failures = 0
        try:
            await self._remove_leftovers()
        except Exception:  # a fault of ours: the registration goes on
            log.exception("unexpected error removing the instances earlier runs left listed; registering anyway")
        while True:
            try:
                ok, wait = await self._attempt(failures)
            except Exception:
                # A fault of ours, not the platform's (those are PlatformErrors). Serving goes on
                # whatever happens here, so the listing must too: an ended loop would leave the
                # agent serving while the platform marks it offline for want of heartbeats.
                log.exception("unexpected error talking to the platform; trying again")
                ok, wait = False, self._backoff.delay(failures)
            if ok:  # the platform answers: the DELETEs of earlier runs' instances that failed are due again
                self._retry_leftovers(recovered=failures > 0)
            # None: the platform forgot us: register again, at once unless it keeps forgetting
            failures = 0 if ok or ok is None else failures + 1
            await self._pause(wait)

    async def _attempt(self, failures: int) -> tuple[bool | None, float]:
        """Register or heartbeat once: (whether it worked, or None when the platform forgot us; the
        wait before the next try: none the first time it forgets us, backing off when it keeps forgetting)."""
        moves = self._moves
        self._wake.clear()  # this attempt answers any move asked for until now
        await self._use_new_api_key()
        if self.provider_id is None:
            ok = await self._register()
            if not ok and moves != self._moves:  # the endpoint moved while registering: the new URL at once
                return None, 0.0
            return ok, self._interval if ok else self._backoff.delay(failures)
        ok = await self._heartbeat(self.provider_id)
        if self.provider_id is not None:
            return ok, self._interval
        if moves != self._moves:
            return None, 0.0
        self._forgotten += 1
        return None, 0.0 if self._forgotten == 1 else self._backoff.delay(self._forgotten - 2)

    async def _register(self) -> bool:
        """Register once. The request runs as its own task: cancelling the loop (shutdown) leaves
        it to ``_settle_register``, which learns the id of an instance the platform made meanwhile."""
        self._register_url = self._offer.endpoint_url
        call = self._register_call = asyncio.ensure_future(self._client.register(self._offer))
        try:
            reply = await asyncio.shield(call)
        except PlatformError as exc:
            self._register_call = None
            self._unconfirmed_register = self._unconfirmed_register or may_have_registered(exc)
            self._record_failure(exc)
            return False
        except Exception:
            self._register_call = None
            raise
        self._register_call = None
        if not self._adopt(reply):
            return False
        await self._retire_old_instances()
        return True

    def _adopt(self, reply: api.RegisterResponse) -> bool:
        """Take the instance a register made as ours, unless the endpoint moved while it was on its
        way: then it is at the old URL and is retired (the new URL is registered next)."""
        if self._register_url == self._offer.endpoint_url:
            self._registered_as(reply)
            return True
        log.info("%s was registered at %s, which the endpoint has since left; it will be removed", reply.provider_id, self._register_url)
        self._retire(reply.provider_id, self._register_url or "")
        return False

    def _retire(self, provider_id: str, endpoint_url: str) -> None:
        if provider_id not in self._retired:
            self._retired.append(provider_id)
            self._retired_at[provider_id] = endpoint_url

    def _registered_as(self, reply: api.RegisterResponse) -> None:
        self.provider_id, self._sent_status, self._unconfirmed_register = reply.provider_id, "online", False
        self._heard_at = self._listed_at = self._clock()
        self._set_phase(Phase.registered, f"registered {self._offer.model} as {reply.provider_id} with {self._client.base_url}")
        self.registered.set()
        if self._leftovers is not None:  # kept once, retired at a URL the endpoint has come back to: ours again
            self._leftovers.forget(reply.provider_id)

    async def _heartbeat(self, provider_id: str) -> bool:
        if not await self._send_unsettled(provider_id):  # a heartbeat in doubt goes first, as it was (``sending``)
            return False
        snapshot = self._stats()
        status = self._sent_status = heartbeat_status(snapshot)
        silent_for = 0.0 if self._heard_at is None else self._clock() - self._heard_at
        if self._capacity is not None and self._capacity.refresh():
            self._offer = self._offer.model_copy(update={"capacity": self._capacity.capacity})
        reply: api.HeartbeatResponse | None = None
        call = self._beat_call = self._beat(provider_id, status, snapshot)
        try:
            reply = await asyncio.shield(call)  # cancelled (shutdown), the loop leaves the request to end
        except UnknownProvider:
            self._register_again(f"the platform no longer knows {provider_id}; registering again")
            return False
        except UnexpectedAnswer as exc:  # a 2xx: the platform took the heartbeat, and its tokens
            self._log_odd_answer(str(exc))
        except PlatformError as exc:
            self._record_failure(exc)
            return False
        finally:
            if call.done():
                self._beat_call = None
        self._last_heartbeat_at, self._heard_at = time.time(), self._clock()
        if self.provider_id != provider_id:  # the endpoint moved meanwhile: the next attempt registers
            return False
        if reply is not None and (elsewhere := not_listed_as_ours(provider_id, status, reply)):
            self._retire(provider_id, self._offer.endpoint_url or "")
            self._register_again(f"{elsewhere}; registering again")
            return False
        self._forgotten = 0
        self._heard(provider_id, status, snapshot, None if reply is None else reply.status, silent_for)
        return True

    def _heard(self, provider_id: str, status: HeartbeatStatus, snapshot: ServingStats, listed: str | None, silent_for: float) -> None:
        """Record an accepted heartbeat; ``listed``: the platform's status for us (None: unreadable);
        ``silent_for``: seconds the platform had heard nothing from us when it was sent."""
        self._recovering = status == "offline" or (self._recovering and listed == "offline")
        if listed != "offline":
            self._silence, self._listed_at = None, self._clock()
        if status == "offline":
            message = f"told the platform to route nothing to {provider_id}: {snapshot.unavailable}"
            self._set_phase(Phase.offline, message, logging.WARNING)
        elif listed == "offline" and self._recovering:
            self._set_phase(Phase.offline, f"serving again; the platform lists {provider_id} once its next health check passes")
        elif listed == "offline":
            self._went_offline(provider_id, silent_for)
        elif listed is None:
            self._set_phase(Phase.registered, f"heartbeats accepted for {provider_id}, though the platform's answers are unreadable")
        else:
            self._set_phase(Phase.registered, f"heartbeats accepted for {provider_id}")

    def _register_again(self, message: str) -> None:
        self.provider_id = None
        self.registered.clear()
        self._set_phase(Phase.registering, message, logging.WARNING)

    def _log_odd_answer(self, message: str) -> None:
        """Once per distinct answer: the platform repeats itself every heartbeat."""
        if message not in self._odd_answers and len(self._odd_answers) < 100:
            self._odd_answers.add(message)
            log.warning("%s; the platform accepted the heartbeat (2xx), so its tokens count as reported", message)
