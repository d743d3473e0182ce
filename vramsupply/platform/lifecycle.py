"""Keeping a serving agent listed on the marketplace: register, heartbeat, deregister.

The lifecycle never stops the agent from serving: when the platform is unreachable or refuses us,
it keeps retrying in the background (capped exponential backoff with jitter) and logs once per
state change, not once per try. Every state change is also written to the registration state
file that `vramsupply status` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

from vramsupply.platform import api, reachability
from vramsupply.platform.backoff import Backoff
from vramsupply.platform.client import ApiKeyRejected, PlatformClient, PlatformError, PlatformUnavailable, UnknownProvider
from vramsupply.platform.state import Phase, RegistrationState, write_state

log = logging.getLogger("vramsupply.platform")

REGISTER_BACKOFF = Backoff(initial=1.0, cap=60.0)
"""Between registration attempts: quick at first, then at most once a minute."""


class ServingStats(Protocol):
    """A snapshot of the serving engine (``engine.EngineStats`` satisfies this)."""

    @property
    def slots_total(self) -> int: ...
    @property
    def slots_busy(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def prompt_tokens_total(self) -> int: ...
    @property
    def completion_tokens_total(self) -> int: ...
    @property
    def failure(self) -> str | None: ...
    @property
    def unavailable(self) -> str | None: ...


HeartbeatStatus = Literal["online", "offline", "draining"]
STATUS_POLL_SECONDS = 0.5
"""How often, between heartbeats, the lifecycle looks for a change the platform must hear at once."""


def heartbeat_status(snapshot: ServingStats) -> HeartbeatStatus:
    """What the platform should do with this instance.

    A failed engine is ``draining`` (the agent is about to exit and restart); an engine that is down
    but may come back (an upstream restarting) is ``offline`` until the platform's next health check
    passes; otherwise ``online``.
    """
    if snapshot.failure is not None:
        return "draining"
    return "online" if snapshot.unavailable is None else "offline"


class ProviderLifecycle:
    """Registers ``offer`` and heartbeats with ``stats()`` until ``stop()``; owns ``client``."""

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
    ) -> None:
        self._client = client
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
        self._retired: list[str] = []
        self._reported_prompt = 0
        self._reported_completion = 0
        self._last_heartbeat_at: float | None = None
        self._sent_status: HeartbeatStatus | None = None
        """The status of the last heartbeat tried (registration counts as ``online``)."""
        self._recovering = False
        """We told the platform we were offline, and it has not listed us online again yet."""
        self._logged: tuple[Phase, str] | None = None
        self._state_unwritable = False
        self.registered = asyncio.Event()
        self.provider_id: str | None = None
        self.phase = Phase.registering
        self.message = ""

    def start(self) -> None:
        """Begin registering in the background; call once the server answers requests."""
        stats = self._stats()
        self._reported_prompt, self._reported_completion = stats.prompt_tokens_total, stats.completion_tokens_total
        self._set_phase(Phase.registering, f"registering {self._offer.model} at {self._offer.endpoint_url} with {self._client.base_url}")
        self._task = asyncio.create_task(self._run(), name="provider-lifecycle")

    @property
    def endpoint_url(self) -> str | None:
        return self._offer.endpoint_url

    def move_endpoint(self, url: str) -> None:
        """The public URL changed (a tunnel restarted): register the new one now, retire the old instance."""
        if url == self._offer.endpoint_url:
            return
        self._offer = self._offer.model_copy(update={"endpoint_url": url})
        if self.provider_id is not None:
            self._retired.append(self.provider_id)
            self.provider_id = None
            self.registered.clear()
        self._set_phase(Phase.registering, f"the endpoint moved to {url}; registering it with {self._client.base_url}")
        self._wake.set()

    async def drain(self, timeout: float) -> None:
        """Stop heartbeating and tell the platform to route nothing new here (best effort, bounded)."""
        await self._cancel_loop()
        if self.provider_id is None:
            return
        self._set_phase(Phase.draining, "draining: the platform routes no new requests here")
        with contextlib.suppress(PlatformError, asyncio.TimeoutError):
            await asyncio.wait_for(self._client.heartbeat(self._heartbeat_request(self.provider_id, "draining", self._stats())), timeout)

    async def stop(self, timeout: float) -> bool:
        """Deregister within ``timeout`` seconds; True when the platform no longer lists us."""
        await self._cancel_loop()
        try:
            if self.provider_id is None:
                self._set_phase(Phase.deregistered, "not registered; nothing to remove from the platform")
                return True
            try:
                await asyncio.wait_for(self._client.deregister(self.provider_id), timeout)
            except (PlatformError, asyncio.TimeoutError) as exc:
                reason = str(exc) or f"no answer within {timeout:g}s"
                message = f"could not deregister {self.provider_id}: {reason}; health checks will mark it offline"
                self._set_phase(Phase.deregister_failed, message, logging.WARNING)
                return False
            gone, self.provider_id = self.provider_id, None
            self._set_phase(Phase.deregistered, f"deregistered {gone} from {self._client.base_url}")
            self.registered.clear()
            return True
        finally:
            await self._client.close()

    async def _cancel_loop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                ok, wait = await self._attempt(failures)
            except Exception:
                # A fault of ours, not the platform's (those are PlatformErrors). Serving goes on
                # whatever happens here, so the listing must too: an ended loop would leave the
                # agent serving while the platform marks it offline for want of heartbeats.
                log.exception("unexpected error talking to the platform; trying again")
                ok, wait = False, self._backoff.delay(failures)
            if ok is None:  # the platform forgot us: register again at once
                failures = 0
                continue
            failures = 0 if ok else failures + 1
            await self._pause(wait)

    async def _attempt(self, failures: int) -> tuple[bool | None, float]:
        """Register or heartbeat once: (whether it worked, or None to register again at once; the wait before the next)."""
        if self.provider_id is None:
            ok = await self._register()
            return ok, self._interval if ok else self._backoff.delay(failures)
        ok = await self._heartbeat(self.provider_id)
        return (None, 0.0) if self.provider_id is None else (ok, self._interval)

    async def _pause(self, seconds: float) -> None:
        """Sleep until the next attempt, or until ``move_endpoint`` asks for one at once, or until
        the engine's status changes from what the platform last heard (it then hears at once)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._status_changed():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, STATUS_POLL_SECONDS))
            if self._wake.is_set():
                break
        self._wake.clear()

    def _status_changed(self) -> bool:
        return self.provider_id is not None and self._sent_status is not None and heartbeat_status(self._stats()) != self._sent_status

    async def _register(self) -> bool:
        try:
            reply = await self._client.register(self._offer)
        except PlatformError as exc:
            self._record_failure(exc)
            return False
        self.provider_id, self._sent_status = reply.provider_id, "online"
        self._set_phase(Phase.registered, f"registered {self._offer.model} as {reply.provider_id} with {self._client.base_url}")
        self.registered.set()
        await self._retire_old_instances()
        return True

    async def _retire_old_instances(self) -> None:
        """Deregister instances left at an old endpoint URL (best effort: health checks catch the rest)."""
        while self._retired:
            old = self._retired.pop()
            try:
                await self._client.deregister(old)
                log.info("deregistered %s, the instance at the previous endpoint URL", old)
            except PlatformError as exc:
                log.warning("could not deregister %s at the previous endpoint URL: %s", old, exc)

    async def _heartbeat(self, provider_id: str) -> bool:
        snapshot = self._stats()
        status = self._sent_status = heartbeat_status(snapshot)
        # The totals this heartbeat reports, read now: whatever serves the stats may count on meanwhile.
        totals = snapshot.prompt_tokens_total, snapshot.completion_tokens_total
        try:
            reply = await self._client.heartbeat(self._heartbeat_request(provider_id, status, snapshot))
        except UnknownProvider:
            self.provider_id = None
            self.registered.clear()
            self._set_phase(Phase.registering, f"the platform no longer knows {provider_id}; registering again", logging.WARNING)
            return False
        except PlatformError as exc:
            self._record_failure(exc)
            return False
        self._reported_prompt, self._reported_completion = totals
        self._last_heartbeat_at = time.time()
        self._recovering = status == "offline" or (self._recovering and reply.status == "offline")
        if status == "offline":
            message = f"told the platform to route nothing to {provider_id}: {snapshot.unavailable}"
            self._set_phase(Phase.offline, message, logging.WARNING)
        elif reply.status == "offline" and self._recovering:
            self._set_phase(Phase.offline, f"serving again; the platform lists {provider_id} once its next health check passes")
        elif reply.status == "offline":
            self._went_offline(provider_id)
        else:
            self._set_phase(Phase.registered, f"heartbeats accepted for {provider_id}")
        return True

    def _went_offline(self, provider_id: str) -> None:
        """Name the hop that fails, and once per outage retrace the platform's path from here."""
        url = self._offer.endpoint_url or ""
        local_port = urlsplit(self._local_url).port if self._local_url else None
        message = f"the platform lists {provider_id} as offline: {reachability.offline_message(url, local_port, self._tunnel)}"
        first = self.phase is not Phase.offline
        self._set_phase(Phase.offline, message, logging.WARNING)
        if first and not self._tunnel and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.create_task(self._probe(url))

    async def _probe(self, url: str) -> None:
        result = await reachability.probe(url, self._local_url)
        log.warning("reachability of %s from this machine: %s", url, result.message)

    def _heartbeat_request(self, provider_id: str, status: HeartbeatStatus, snapshot: ServingStats) -> api.HeartbeatRequest:
        """Status plus the tokens served since the last heartbeat the platform acknowledged."""
        return api.HeartbeatRequest(
            provider_id=provider_id,
            status=status,
            slots_total=snapshot.slots_total,
            slots_busy=snapshot.slots_busy,
            queue_depth=snapshot.queue_depth,
            prompt_tokens=max(0, snapshot.prompt_tokens_total - self._reported_prompt),
            completion_tokens=max(0, snapshot.completion_tokens_total - self._reported_completion),
            capacity=self._offer.capacity,
        )

    def _record_failure(self, exc: PlatformError) -> None:
        if isinstance(exc, PlatformUnavailable):
            self._set_phase(Phase.unreachable, f"platform unreachable ({exc}); still serving locally, retrying in the background", logging.WARNING)
        else:
            level = logging.ERROR if isinstance(exc, ApiKeyRejected) else logging.WARNING
            self._set_phase(Phase.rejected, f"{exc}; still serving locally, retrying in the background", level)

    def _set_phase(self, phase: Phase, message: str, level: int = logging.INFO) -> None:
        """Record every change in the state file; log only when the phase (or the refusal, or the
        reason for being offline) changes."""
        self.phase, self.message = phase, message
        key = (phase, message if phase in (Phase.rejected, Phase.offline) else "")
        if key != self._logged:
            self._logged = key
            log.log(level, message)
        if self._state_path is not None:
            self._record_state(self._state_path)

    def _record_state(self, path: Path) -> None:
        """A state file we cannot write costs `vramsupply status` its answer, never the registration."""
        state = RegistrationState(
            phase=self.phase,
            platform_url=self._client.base_url,
            model=self._offer.model,
            endpoint_url=self._offer.endpoint_url or "",
            provider_id=self.provider_id,
            message=self.message,
            pid=os.getpid(),
            updated_at=time.time(),
            last_heartbeat_at=self._last_heartbeat_at,
            local_url=self._local_url,
        )
        try:
            write_state(path, state)
        except OSError as exc:
            if not self._state_unwritable:
                self._state_unwritable = True
                log.warning("cannot record the registration state in %s (%s); `vramsupply status` will not show it", path, exc.strerror or exc)
