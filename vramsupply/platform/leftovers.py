"""The instances killed runs left listed, kept until the platform confirms them gone.

A run killed with SIGKILL (or a crash, or a power cut) leaves its instance listed, and the next
run's first record replaces the one that named it. The DELETE that run sends may fail (the
platform down, answering 5xx, too slow), and buyers would then be routed to a dead URL until the
platform's health checks catch it. So the id is kept in the registration record itself, in its
``leftovers`` list, until a DELETE succeeds or answers 404: every later record carries the list on
(``state.write_state``), also one a ``--no-register`` run writes, so a run killed again keeps them
and `vramsupply status --json` shows them. Several ids accumulate when several runs are killed
during one outage.

An instance the running agent retires because its endpoint URL moved (a quick tunnel restarted
with a new URL) joins the same list when its DELETE fails (``PendingLeftovers.add``), while serving
or at shutdown: it is as dead as a killed run's, and retried, guarded and given up the same way.

Each id keeps the platform URL and the account (the API key's fingerprint) it was registered
with: only an agent of that account on that platform ever deletes it, since a DELETE sent with
another key or to another platform could only remove a stranger's instance. An id is given up
(said once) when the platform refuses its DELETE outright, after ``GIVE_UP_SECONDS`` of failures,
or when more than ``MAX_KEPT`` wait (the oldest goes): the platform lists it offline meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from vramsupply.platform.state import KeptLeftover, Phase, RegistrationState, earlier_run, read_state, write_state

log = logging.getLogger("vramsupply.platform")

MAX_KEPT = 16
"""Ids kept at most: one per run killed while the platform could not delete the one before."""
GIVE_UP_SECONDS = 7 * 86_400.0
"""After a week of failed DELETEs the platform is not coming back for this id; say so and stop."""


def owned_by(left: KeptLeftover, platform_url: str, account: str) -> bool:
    return left.platform_url.rstrip("/") == platform_url.rstrip("/") and left.account in (None, account)


def days_kept(left: KeptLeftover, now: float) -> float:
    return max(now - left.noted_at, 0.0) / 86_400.0


def keep(path: Path, record: RegistrationState, kept: list[KeptLeftover]) -> None:
    """Rewrite ``record`` at ``path`` with ``kept``, everything else as it was; a file that cannot
    be written keeps the ids in this run only (the writers of the record say so)."""
    try:
        write_state(path, record.model_copy(update={"leftovers": kept}))
    except OSError as exc:
        log.debug("cannot rewrite %s with the instances killed runs left listed: %s", path, exc)


def left_by(record: RegistrationState | None) -> KeptLeftover | None:
    """The instance ``record`` names, when the run that wrote it ended without deregistering it."""
    if record is None or record.provider_id is None or record.phase is Phase.deregistered:
        return None
    if earlier_run(record) is None:  # its process still runs: the instance is that agent's, not a leftover
        return None
    return KeptLeftover(
        provider_id=record.provider_id, platform_url=record.platform_url, account=record.account, endpoint_url=record.endpoint_url,
        pid=record.pid, noted_at=time.time(),
    )  # fmt: skip


def keep_leftover(state_path: Path) -> list[KeptLeftover]:
    """Before this run's first record replaces the one at ``state_path``: add the instance it names,
    if a run that ended left it listed, to the ids it keeps (whatever its platform or account: the
    guard is at deletion time), give up the ones kept too long or too many, and return them."""
    record = read_state(state_path)
    if record is None:
        return []
    kept, left = list(record.leftovers), left_by(record)
    if left is not None and all(k.provider_id != left.provider_id for k in kept):
        kept.append(left)
    now = time.time()
    for old in [k for k in kept if now - k.noted_at >= GIVE_UP_SECONDS]:
        kept.remove(old)
        log.warning("giving up deleting %s: not deleted within %.0f days; the platform lists it offline", described(old), days_kept(old, now))
    _keep_newest(kept)
    if kept != record.leftovers:
        keep(state_path, record, kept)
    return kept


def _keep_newest(kept: list[KeptLeftover]) -> None:
    """At most ``MAX_KEPT``: the oldest go, each said."""
    while len(kept) > MAX_KEPT:
        oldest = kept.pop(0)
        log.warning("giving up deleting %s: more than %d instances the agent left listed wait to be deleted, and it is the oldest", described(oldest), MAX_KEPT)


def described(left: KeptLeftover, *, previous: bool = False) -> str:
    if left.retired:
        return f"{left.provider_id}, which the agent (process {left.pid}) registered at {left.endpoint_url or 'its endpoint'} and then replaced"
    run = "the agent's previous run" if previous else "an earlier run of the agent"
    return f"{left.provider_id}, which {run} (process {left.pid}) left listed at {left.endpoint_url or 'its endpoint'}"


@dataclass
class PendingLeftovers:
    """The running agent's view of the kept ids: read at start; an id gone (or given up) leaves the
    record at once. ``fresh``: the id the previous run's record named (its log says "previous run")."""

    state_path: Path | None  # None: kept in this run only (a lifecycle that writes no record)
    fresh: str | None = None
    _kept: list[KeptLeftover] = field(default_factory=list)

    @classmethod
    def at_start(cls, state_path: Path) -> PendingLeftovers:
        left = left_by(read_state(state_path))
        return cls(state_path, None if left is None else left.provider_id, keep_leftover(state_path))

    def ours(self, platform_url: str, account: str) -> list[KeptLeftover]:
        """The ids this agent may delete: registered on its platform, with its account."""
        return [k for k in self._kept if owned_by(k, platform_url, account)]

    def describe(self, left: KeptLeftover) -> str:
        return described(left, previous=left.provider_id == self.fresh)

    def add(self, left: KeptLeftover) -> None:
        """An instance of this run whose DELETE failed (retired at an old endpoint URL): kept in the
        record at once, so a run killed from now on leaves it to the next start too."""
        if any(k.provider_id == left.provider_id for k in self._kept):
            return
        self._kept.append(left)
        _keep_newest(self._kept)
        record = None if self.state_path is None else read_state(self.state_path)
        if self.state_path is not None and record is not None:
            keep(self.state_path, record, list(self._kept))

    def forget(self, provider_id: str) -> None:
        """Gone (deleted, or already unknown to the platform) or given up: never tried again."""
        if all(k.provider_id != provider_id for k in self._kept):
            return
        self._kept = [k for k in self._kept if k.provider_id != provider_id]
        if self.state_path is None:
            return
        record = read_state(self.state_path)
        if record is not None and any(k.provider_id == provider_id for k in record.leftovers):
            keep(self.state_path, record, [k for k in record.leftovers if k.provider_id != provider_id])
