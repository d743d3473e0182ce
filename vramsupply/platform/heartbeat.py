"""What a heartbeat says, both ways: the status we send for the engine's state, and what the
platform's answer means for our listing.

Kept apart from the lifecycle's loop so that the rules (docs/platform-api.md, heartbeat) read in
one place: the status we send follows the engine; an answer that names another instance, a
``draining`` we did not send, or a status the API does not have means the platform no longer lists
us as serving, and the lifecycle registers again.
"""

from __future__ import annotations

from typing import Literal, Protocol

from vramsupply.platform import api
from vramsupply.platform.api import printable
from vramsupply.platform.client import PlatformError, PlatformUnavailable, UnexpectedAnswer


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
PLATFORM_STATUSES = frozenset({"online", "offline", "draining"})


def heartbeat_status(snapshot: ServingStats) -> HeartbeatStatus:
    """What the platform should do with this instance.

    A failed engine is ``draining`` (the agent is about to exit and restart); an engine that is down
    but may come back (an upstream restarting) is ``offline`` until the platform's next health check
    passes; otherwise ``online``.
    """
    if snapshot.failure is not None:
        return "draining"
    return "online" if snapshot.unavailable is None else "offline"


def not_listed_as_ours(provider_id: str, sent: HeartbeatStatus, reply: api.HeartbeatResponse) -> str | None:
    """Why the platform's answer means it no longer lists us as we think (None: it does).

    A ``draining`` we did not send ends our listing for good (no new traffic, no more health
    checks; the agent registers afresh); so does a status the API does not have."""
    if reply.provider_id != provider_id:
        return f"the platform answered the heartbeat of {provider_id} for another instance, {reply.provider_id}"
    if reply.status == "draining" and sent != "draining":
        return f"the platform lists {provider_id} as draining: it routes nothing new there"
    if reply.status not in PLATFORM_STATUSES:
        return f"the platform lists {provider_id} as {printable(reply.status, 40)!r}, not online"
    return None


def may_have_registered(exc: PlatformError) -> bool:
    """A register that failed this way may still have made an instance we know no id of: the
    platform acted on it (a 2xx we cannot read), or the request may have reached it unanswered."""
    return isinstance(exc, UnexpectedAnswer) or (isinstance(exc, PlatformUnavailable) and exc.reached)
