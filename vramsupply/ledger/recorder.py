"""What `serve` plugs into the HTTP server: finished requests become priced ledger rows.

A request counts as sold through the platform when it carried the endpoint token and this agent
offers itself on the marketplace; everything else (``--no-register``, no token) is local and earns
nothing, though its tokens are still recorded. Prices are the ones in force when it finished.

Only a complete request is paid for: one that ended early (its buyer hung up, the drain deadline
or an engine failure cut it) never delivered the usage the platform bills by, so the platform
charges nothing for it. Its row keeps the tokens it served, with ``complete`` 0 and no money.

The agent serves buyers whether or not the ledger can record them, but never silently: ``failure``
is what ``/health`` shows (status "degraded", the reason in ``warnings``) while nothing is recorded.
A ledger that cannot be written (a full disk) loses nothing: the writer holds the rows in memory and
writes them once it can, and ``failure`` says why and how many wait, from the first failed write
until they are all written. One that could not be opened at start (``UnopenedLedger``) is reported
for the whole run, since only a restart opens it again; stopping, it logs how many requests it missed.

A damaged ledger is the exception: no restart mends it, and under systemd nobody would read a
warning that asks for one. At start the agent reads the whole file (``LedgerStore.check``); a
damaged one is renamed ``ledger.sqlite3.damaged-<UTC time>`` (with its ``-wal`` and ``-shm``), a
new one is started, and one warning says where the old one is and how to salvage its rows. Only
the agent moves it: `vramsupply earnings` says the same in one line and leaves the file alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vramsupply.ledger.money import earned_nanocents, gross_nanocents
from vramsupply.ledger.errors import DamagedLedger, LedgerError, salvage_command
from vramsupply.ledger.in_flight import InFlight
from vramsupply.ledger.store import Entry, LedgerStore
from vramsupply.ledger.writer import MAX_HELD_ROWS, LedgerWriter, Marks, Unwritten

log = logging.getLogger("vramsupply.ledger")

REOPEN_SECONDS = 30.0
"""Between two tries to open a ledger that could not be opened at start."""


class Serving(Protocol):
    """A request in flight as the server reports it (``server.accounting.Serving``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def choices(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def token_presented(self) -> bool: ...


class Finished(Serving, Protocol):
    """A finished request as the server reports it (``server.accounting.FinishedRequest``): a
    request in flight's fields, and what is known only at its end."""

    @property
    def cached_tokens(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    @property
    def flight_id(self) -> str | None: ...  # its row in flight's id, where not request_id (``store.Entry.flight_id``)


@dataclass(frozen=True)
class Pricing:
    """What a finished request's row says it earned, at the prices in force when it finished."""

    input_price: int
    output_price: int
    selling: bool
    clock: Callable[[], float] = time.time

    def entry(self, finished: Finished) -> Entry:
        platform = self.selling and finished.token_presented
        paid = platform and finished.complete
        gross = gross_nanocents(finished.prompt_tokens, finished.completion_tokens, self.input_price, self.output_price) if paid else 0
        return Entry(
            finished_at=self.clock(),
            request_id=finished.request_id,
            model=finished.model,
            source="platform" if platform else "local",
            complete=finished.complete,
            choices=finished.choices,
            prompt_tokens=finished.prompt_tokens,
            cached_tokens=finished.cached_tokens,
            completion_tokens=finished.completion_tokens,
            input_price=self.input_price,
            output_price=self.output_price,
            gross_nanocents=gross,
            earned_nanocents=earned_nanocents(gross),
            flight_id=finished.flight_id,
        )

    def in_flight(self, serving: Serving) -> InFlight:
        source = "platform" if self.selling and serving.token_presented else "local"
        return InFlight(
            serving.request_id, serving.model, source, serving.choices, serving.prompt_tokens, serving.completion_tokens,
            self.input_price, self.output_price, self.clock(),
        )


class LedgerRecorder:
    def __init__(
        self, writer: LedgerWriter, *, input_price: int, output_price: int, selling: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self.writer = writer
        self.pricing = Pricing(input_price, output_price, selling, clock)
        self._unwritable: str | None = None
        """Why the last write failed, until one succeeds again."""

    def entry(self, finished: Finished) -> Entry:
        return self.pricing.entry(finished)

    async def record(self, finished: Finished) -> None:
        """Write the row and wait for its commit; a failing disk is logged once, never raised."""
        try:
            await asyncio.wrap_future(self.writer.submit(self.entry(finished)))
        except Unwritten:
            return  # held (or counted) by the writer, which says so itself
        except LedgerError as exc:
            if self._unwritable is None:
                log.warning("%s; serving continues, but earnings are not recorded until it can write", exc)
            self._unwritable = str(exc)
            return
        if self._unwritable is not None:
            self._unwritable = None
            log.info("the earnings ledger %s is written again", self.writer.store.path)

    def serving(self, requests: list[Serving]) -> None:
        """Write these requests in flight (``in_flight.py``), waiting for nothing."""
        self.writer.mark(Marks(rows=tuple(self.pricing.in_flight(r) for r in requests)))

    def ended(self, request_ids: list[str]) -> None:
        """These requests in flight ended with nothing to record: their rows go, waiting for nothing."""
        self.writer.mark(Marks(ended=tuple(request_ids)))

    @property
    def failure(self) -> str | None:
        """Why requests are not recorded now, for ``/health``: the writer stopped for good, or the
        file cannot be written (until the rows held meanwhile are written); None while rows are written."""
        if self.writer.failure is not None:
            return self.writer.failure
        if (unrecorded := self.writer.unrecorded) is not None:
            return unrecorded
        if self._unwritable is not None:
            return f"{self._unwritable}; until then requests are served but not recorded (recording resumes by itself)"
        return None

    def close(self) -> None:
        self.writer.close()


class UnopenedLedger:
    """Stands in for the recorder when the ledger could not be opened at start: the agent serves on,
    and ``failure`` (what ``/health`` shows) says why. Its rows are held in memory (up to
    ``MAX_HELD_ROWS``, priced when served), and opening is tried again at a request at least
    ``retry_every`` seconds after the last try: once the provider frees the disk or moves the
    directory away, the held rows are written and the ``LedgerRecorder`` takes over, no restart
    needed (under systemd nobody restarts it)."""

    def __init__(self, failure: str, path: Path, pricing: Pricing, *, retry_every: float = REOPEN_SECONDS) -> None:
        self._failure = failure
        self._path = path
        self._pricing = pricing
        self._recorder: LedgerRecorder | None = None
        """Once the ledger opened: what records every row."""
        self._retry_every = retry_every
        self._next_try = time.monotonic() + retry_every
        self._held: list[Entry] = []
        self.missed = 0
        """Requests not held, beyond ``MAX_HELD_ROWS``."""

    @property
    def failure(self) -> str | None:
        """The reason and the fix, and how many requests wait unrecorded (README: /health says it)."""
        if self._recorder is not None:
            return self._recorder.failure
        waiting = len(self._held) + self.missed
        return f"{self._failure}; {_requests(waiting)} not recorded so far" if waiting else self._failure

    def serving(self, requests: list[Serving]) -> None:
        """Requests in flight are written once the ledger is open, not held: only finished ones are."""
        if self._recorder is not None:
            self._recorder.serving(requests)

    def ended(self, request_ids: list[str]) -> None:
        if self._recorder is not None:
            self._recorder.ended(request_ids)

    async def record(self, finished: Finished) -> None:
        if self._recorder is not None:
            return await self._recorder.record(finished)
        if len(self._held) < MAX_HELD_ROWS:
            self._held.append(self._pricing.entry(finished))
        else:
            self.missed += 1
        if time.monotonic() >= self._next_try:
            await self._try_open()

    async def _try_open(self) -> None:
        self._next_try = time.monotonic() + self._retry_every
        try:
            writer = await asyncio.to_thread(_open_writer, self._path)
        except LedgerError:
            return
        held, self._held = self._held, []
        written = [asyncio.wrap_future(writer.submit(entry)) for entry in held]  # queued ahead of any later row
        pricing = self._pricing
        self._recorder = LedgerRecorder(writer, input_price=pricing.input_price, output_price=pricing.output_price, selling=pricing.selling, clock=pricing.clock)
        results = await asyncio.gather(*written, return_exceptions=True)
        log.info("the earnings ledger %s is open now: %s held in memory recorded", self._path, _requests(sum(r is None for r in results)))

    def close(self) -> None:
        """Stopping makes a last try to open it (the provider may have freed it since the last
        request, or restarts as ``failure`` says): the held rows are written then, not lost."""
        if self._recorder is not None:
            return self._recorder.close()
        if self._held:
            try:
                writer = _open_writer(self._path)
            except LedgerError:
                pass
            else:
                held, self._held = self._held, []
                for entry in held:
                    writer.submit(entry)
                writer.close()
                log.info("the earnings ledger %s is open now: the %s held in memory are recorded", self._path, _requests(len(held)))
        if lost := len(self._held) + self.missed:
            log.error("the earnings of %s served in this run are not recorded: the earnings ledger could not be opened", _requests(lost))


def _requests(count: int) -> str:
    return f"{count:,} request{'' if count == 1 else 's'}"


def open_recorder(path: Path, *, input_price: int, output_price: int, selling: bool) -> LedgerRecorder | UnopenedLedger:
    """The recorder `serve` plugs into the server; when the ledger cannot be opened, one that holds
    the rows, says why (logged now, on ``/health`` all along) and tries again: the agent serves on
    without a ledger rather than not at all."""
    try:
        writer = _open_writer(path)
    except LedgerError as exc:
        failure = (
            f"{exc}; the agent tries again every {REOPEN_SECONDS:g} s while requests come (a restart tries at once), "
            "and until then requests are served and held in memory"
        )
        log.warning("%s", failure)
        return UnopenedLedger(failure, path, Pricing(input_price, output_price, selling), retry_every=REOPEN_SECONDS)
    return LedgerRecorder(writer, input_price=input_price, output_price=output_price, selling=selling)


def _open_writer(path: Path) -> LedgerWriter:
    """The writer of the ledger at ``path``; a damaged one is moved aside first, and a new one started."""
    try:
        return LedgerWriter(_checked_store(path))
    except DamagedLedger as exc:
        _set_aside(path, exc)
    return LedgerWriter(_checked_store(path))


def _checked_store(path: Path) -> LedgerStore:
    store = LedgerStore(path)
    try:
        store.check()
    except LedgerError:
        store.close()
        raise
    return store


def _set_aside(path: Path, damage: DamagedLedger) -> None:
    """Rename the damaged ledger and say so, once; raises ``LedgerError`` when it cannot be renamed."""
    try:
        aside = move_aside(path)
    except OSError as exc:
        raise LedgerError(
            f"the earnings ledger {path} is damaged ({damage.reason}) and cannot be moved aside: {exc.strerror or exc}; "
            "move it (and its -wal and -shm files) away yourself"
        ) from None
    log.warning(
        "the earnings ledger %s was damaged (%s): moved it to %s and started a new one; the earnings recorded in it are "
        "not in `vramsupply earnings` now. To try to salvage them: %s", path, damage.reason, aside, salvage_command(aside),
    )


def move_aside(path: Path, now: float | None = None) -> Path:
    """Rename the damaged ledger at ``path`` to ``<name>.damaged-<UTC time>``, its ``-wal`` and ``-shm``
    with it (its last commits may be in the WAL, which ``.recover`` reads too); returns the new path.
    The WAL goes first: a crash in between must not leave it beside the new ledger, which would read it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    tries = 1
    while any(Path(f"{aside}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        tries += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{tries}")
    for suffix in ("-wal", "-shm", ""):
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside
