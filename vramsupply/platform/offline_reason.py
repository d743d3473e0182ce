"""Why the platform lists this agent offline, said once per outage, with what to do about it.

Apart from ``lifecycle.py`` because the diagnosis has rules of its own. An ``offline`` answer
usually means the platform's health checks of the endpoint fail (a port not forwarded, a tunnel
down): the message names the hop, and once per outage the agent retraces the platform's path
(``reachability.probe``). But the platform also lists an instance offline after its silence limit
without a heartbeat (docs/platform-api.md), which the agent can tell from its own side: when the
platform last took a heartbeat of ours. Nor is the path to blame when the agent itself was paused
(``kill -STOP``, ``docker pause``, a debugger, a host too busy to run it: ``pauses``) while the
failed health check may have run: between the platform's last answer that did not list it offline
and the one that does. In either case the forwarding advice would be wrong; the message says what
happened instead, and only if the instance is still offline after the platform's next two health
checks (counted from the end of the silence or pause) is the path retraced after all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from vramsupply.platform import api, reachability
from vramsupply.platform.pauses import PauseWatch
from vramsupply.platform.state import Phase

log = logging.getLogger("vramsupply.platform")

HEALTH_CHECK_SECONDS = 60.0  # how often the platform checks every instance's /health (docs/platform-api.md)
SILENCE_SHARE = 0.9
"""Of the platform's silence limit: we count from its last answer, up to a round trip after it began counting."""


class OfflineReason:
    """Mixed into ``ProviderLifecycle``, which owns the attributes read here."""

    _silence: tuple[float, str] | None
    _silence_limit: float
    _listed_again_within: float
    _offer: api.RegisterRequest
    _local_url: str | None
    _tunnel: str | None
    _probe_task: asyncio.Task[None] | None
    _pauses: PauseWatch
    _listed_at: float | None
    _clock: Callable[[], float]
    phase: Phase
    _set_phase: Callable[..., None]  # (phase, message, level): records and logs a change of phase

    def _went_offline(self, provider_id: str, silent_for: float) -> None:
        """Put it down to a pause of the agent, or to our missed heartbeats, while the platform's next
        health checks may not have run yet; otherwise name the hop that fails, and once per outage
        retrace the platform's path."""
        now = self._clock()
        # Already offline for a hop that fails: a later pause or silence did not cause it.
        failing = self.phase is Phase.offline and self._silence is None
        if silent_for >= SILENCE_SHARE * self._silence_limit and not failing:
            missed = f"the platform marked {provider_id} offline after {silent_for:.0f} s without a heartbeat from this agent"
            self._silence = (now, f"{missed}; still serving, it lists it again at its next health check")
        pause = None if failing else self._pauses.overlapping(-math.inf if self._listed_at is None else self._listed_at, now)
        if pause is not None and now - pause.end < self._listed_again_within:
            paused = (
                f"the platform lists {provider_id} as offline: this agent was paused for {pause.seconds:.0f} s until "
                f"{time.strftime('%H:%M:%S', time.localtime(pause.at))} (SIGSTOP, docker pause, a debugger, or a host too busy to run it), "
                "so the platform's health check found it not answering; still serving, it lists it again at its next health check"
            )
            self._silence = (pause.end, paused)
        if self._silence is not None and now - self._silence[0] < self._listed_again_within:
            self._set_phase(Phase.offline, self._silence[1], logging.WARNING)
            return
        explained, self._silence = self._silence is not None, None  # still offline after its health checks: they fail
        url = self._offer.endpoint_url or ""
        local_port = urlsplit(self._local_url).port if self._local_url else None
        message = f"the platform lists {provider_id} as offline: {reachability.offline_message(url, local_port, self._tunnel)}"
        first = self.phase is not Phase.offline or explained
        self._set_phase(Phase.offline, message, logging.WARNING)
        if first and not self._tunnel and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.create_task(self._probe(url))

    async def _probe(self, url: str) -> None:
        result = await reachability.probe(url, self._local_url)
        log.warning("reachability of %s from this machine: %s", url, result.message)
