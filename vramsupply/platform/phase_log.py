"""What the lifecycle says about its phase: in the log, once per change, and in the state file always.

Apart from ``lifecycle.py`` because saying it has rules of its own:

- a phase is logged when it changes (for a refusal or an offline listing: when its reason
  changes), never once per try; the state file that `vramsupply status` reads is rewritten at
  every change and heartbeat, and a file that cannot be written is said when that changes;
- one heartbeat whose answer did not come in time (it may have reached the platform: a timeout, a
  connection dropped after sending, a gateway's 502 or 504) leaves a listed instance in its phase,
  ``registered``, or ``offline`` (listed, routed nothing) with why it is offline kept, and adds a
  note that it is sent again (``sending``): the platform lists an instance offline only after
  its silence limit (180 s, docs/platform-api.md) without a heartbeat, and that one most likely
  arrived. Saying ``unreachable`` then, as the agent did, showed a listed provider as down (and
  `vramsupply status` exit 3) for a heartbeat interval over one slow answer, and lost why an
  offline one was offline. The note is logged once per run of such beats; an offline instance
  answered again, offline for the same reason, is not said offline again. The phase turns
  ``unreachable`` once no heartbeat has been answered for ``UNANSWERED_SHARE`` of that limit (90 s):
  by then the instance may be dropped within the next beats (interval plus the answer's timeout, 40 s
  by default), so the provider hears of it before the listing may lapse, not after. Counted in time
  rather than in failures, the margin holds for any heartbeat interval (with one past 90 s, one
  missed beat is already too many). An instance listed offline keeps why in that message until a
  heartbeat is answered: the reason most likely still holds, and reaching the platform again will
  not mend it. A heartbeat that surely did not reach the platform or was
  refused (connection refused, a name that does not resolve, a 429, a 5xx other than a gateway's)
  is ``unreachable`` at once: no doubt there, and a broken path rarely mends by the next beat; so is
  a failed register (nothing is listed yet);
- a platform that stays unreachable is said again every ``UNREACHABLE_REMINDER_SECONDS`` (15 min),
  with since when (since the first heartbeat left unanswered, when it began that way), so that an
  operator reading the last screen of a long log still sees it, never more often;
- a rejected API key is said with what works for where the key came from (``api_key``): while it is
  rejected, a key from the config file is read again before each retry (and whenever the file is
  written), and the lifecycle registers with a new one as soon as `vramsupply login` stores it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from vramsupply.logging import register_secret
from vramsupply.platform import api
from vramsupply.platform.api_key import ApiKeySource
from vramsupply.platform.client import API_KEY_REJECTED, ApiKeyRejected, PlatformClient, PlatformError, PlatformUnavailable
from vramsupply.platform.state import Phase, RegistrationState, write_state

log = logging.getLogger("vramsupply.platform")

UNREACHABLE_REMINDER_SECONDS = 15 * 60.0
UNANSWERED_SHARE = 0.5
"""Of the platform's silence limit: how long a listed instance's heartbeats may go unanswered
(counted from the last one answered) before the agent says the platform is unreachable."""


class PhaseLog:
    """Mixed into ``ProviderLifecycle``, which owns the attributes read here."""

    _client: PlatformClient
    _offer: api.RegisterRequest
    _state_path: Path | None
    _local_url: str | None
    _interval: float
    _last_heartbeat_at: float | None
    _heard_at: float | None
    _silence_limit: float
    _clock: Callable[[], float]
    _api_key_source: ApiKeySource | None
    provider_id: str | None
    phase: Phase
    message: str
    _platform_asks: Callable[[float | None], str]

    def _init_phase_log(self) -> None:
        self._logged: tuple[Phase, str] | None = None
        self._state_unwritable = False
        self._key_rejected = False
        self._unreachable: tuple[float, float, float] | None = None
        """Since when (wall clock, and ``_clock``) the platform is unreachable, and when that was last said (``_clock``)."""
        self._unanswered: tuple[float, float] | None = None
        """Since when (wall clock, and ``_clock``) the heartbeats of a listed instance go unanswered."""
        self._before_unanswered = ""
        """Why an instance listed ``offline`` was offline when those heartbeats began to go unanswered ("" for one listed ``registered``)."""

    def _record_failure(self, exc: PlatformError) -> None:
        self._key_rejected = isinstance(exc, ApiKeyRejected)
        if isinstance(exc, PlatformUnavailable):
            self._record_unavailable(exc)
        elif isinstance(exc, ApiKeyRejected):
            said = API_KEY_REJECTED if self._api_key_source is None else self._api_key_source.rejected()
            self._set_phase(Phase.rejected, f"{said}; still serving locally, retrying in the background", logging.ERROR)
        else:
            self._set_phase(Phase.rejected, f"{exc}; still serving locally, retrying in the background", logging.WARNING)

    def _record_unavailable(self, exc: PlatformUnavailable) -> None:
        """A heartbeat in doubt while the platform surely still lists us: ``registered`` (or
        ``offline``), with a note; otherwise ``unreachable`` (see the module's docstring)."""
        when = self._platform_asks(exc.retry_after)
        listed = exc.reached and self.provider_id is not None and self.phase in (Phase.registered, Phase.offline)  # in doubt
        heard = self._heard_at if listed else None
        silent_for = None if heard is None else self._clock() - heard
        if silent_for is not None and silent_for < UNANSWERED_SHARE * self._silence_limit:
            self._unanswered_beat(exc, silent_for)
            return
        overdue = "" if silent_for is None else f"; no heartbeat answered for {silent_for:.0f} s"
        message = f"platform unreachable ({exc}){overdue}; still serving locally, {when}{self._offline_before()}"
        self._set_phase(Phase.unreachable, message, logging.WARNING)
        self._remind_unreachable(exc)

    def _offline_before(self) -> str:
        """Why the instance was listed offline when its heartbeats began to go unanswered, kept through
        the outage that follows: the platform routes it nothing once it answers again, until that is
        mended too."""
        if self._unanswered is None or not self._before_unanswered:
            return ""
        return f"; listed offline before that: {self._before_unanswered}"

    def _unanswered_beat(self, exc: PlatformUnavailable, silent_for: float) -> None:
        """Still listed, in the phase it had (an ``offline`` one also says why it is offline): said in
        the state file, and logged once per run of unanswered heartbeats."""
        since, now = self._unanswered, self._clock()
        if since is None:
            log.info("the heartbeat for %s got no answer (%s); it is sent again with its Idempotency-Key at the next beat", self.provider_id, exc)
            self._before_unanswered = self.message if self.phase is Phase.offline else ""
        resending = f"the last heartbeat went unanswered ({exc}), resending it"
        if self.phase is Phase.offline:  # logged as its reason: the note is in the info line above
            note = f"{self._before_unanswered}; {resending} (none answered for {silent_for:.0f} s)"
            self._set_phase(Phase.offline, note, logged_as=self._before_unanswered)
        else:
            note = (
                f"listed as {self.provider_id}; {resending} (the platform lists an instance offline only after "
                f"{self._silence_limit:.0f} s without heartbeats; none answered for {silent_for:.0f} s)"
            )
            self._set_phase(Phase.registered, note)
        self._unanswered = since or (time.time(), now)

    def _remind_unreachable(self, exc: PlatformError) -> None:
        """Every ``UNREACHABLE_REMINDER_SECONDS`` of one outage, one line that it goes on."""
        assert self._unreachable is not None  # set by _set_phase(unreachable)
        since_wall, _, said_at = self._unreachable
        now = self._clock()
        if now - said_at < UNREACHABLE_REMINDER_SECONDS:
            return
        self._unreachable = (since_wall, self._unreachable[1], now)
        log.warning("the platform is still unreachable since %s: %s, serving continues", _clock_time(since_wall), exc)

    async def _use_new_api_key(self) -> None:
        """While the key is rejected: register (or heartbeat) with the config file's key once it differs."""
        source = self._api_key_source
        if not self._key_rejected or source is None:
            return
        key = source.new_key()
        if key is None:
            return
        register_secret(key)
        await self._client.use_api_key(key)
        self._key_rejected = False
        log.info("the API key in %s changed: trying the new key", source.where)

    def _key_file_changed(self) -> bool:
        """The wait before the next retry ends when a rejected key's config file is written (``retry_wait``)."""
        return self._key_rejected and self._api_key_source is not None and self._api_key_source.file_changed()

    def _set_phase(self, phase: Phase, message: str, level: int = logging.INFO, *, logged_as: str | None = None) -> None:
        """Record every change in the state file; log only when the phase (or the refusal, or the
        reason for being offline: ``logged_as`` when the message adds a passing note) changes."""
        self.phase, self.message = phase, message
        self._key_rejected = self._key_rejected and phase is Phase.rejected  # a key that works is kept, whatever the file says
        if phase is not Phase.unreachable:
            self._unreachable = self._unanswered = None  # an unanswered heartbeat sets it again (``_unanswered_beat``)
        elif self._unreachable is None:
            now = self._clock()
            since = self._unanswered or (time.time(), now)  # the outage began with the first heartbeat left unanswered
            self._unreachable = (since[0], since[1], now)
        said = message if logged_as is None else logged_as
        key = (phase, said if phase in (Phase.rejected, Phase.offline) else "")
        if key != self._logged:
            self._logged = key
            log.log(level, message)
        if self._state_path is not None:
            self._record_state(self._state_path)

    def _record_state(self, path: Path) -> None:
        """A state file we cannot write costs `vramsupply status` its answer, never the registration."""
        state = RegistrationState(
            phase=self.phase, platform_url=self._client.base_url, model=self._offer.model, endpoint_url=self._offer.endpoint_url or "",
            provider_id=self.provider_id, message=self.message, pid=os.getpid(), updated_at=time.time(),
            last_heartbeat_at=self._last_heartbeat_at, local_url=self._local_url, heartbeat_interval=self._interval,
            output_price=self._offer.output_price_per_million, input_price=self._offer.input_price_per_million,
            account=self._client.account,
        )  # fmt: skip
        try:
            write_state(path, state)
        except OSError as exc:
            if not self._state_unwritable:  # logged when that changes, not at every heartbeat
                self._state_unwritable = True
                log.warning("cannot record the registration state in %s (%s); `vramsupply status` cannot show it until it is written again", path, exc.strerror or exc)
            return
        if self._state_unwritable:
            self._state_unwritable = False
            log.info("the registration state is written again in %s", path)


def _clock_time(wall: float) -> str:
    """HH:MM, with the date when it was not today."""
    then = time.localtime(wall)
    return time.strftime("%H:%M" if then[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", then)
