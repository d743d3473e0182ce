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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vramsupply.ledger.money import earned_nanocents, gross_nanocents
from vramsupply.ledger.store import Entry, LedgerError
from vramsupply.ledger.writer import LedgerWriter, Unwritten

log = logging.getLogger("vramsupply.ledger")


class Finished(Protocol):
    """A finished request as the server reports it (``server.accounting.FinishedRequest``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def choices(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    @property
    def token_presented(self) -> bool: ...


class LedgerRecorder:
    def __init__(
        self, writer: LedgerWriter, *, input_price: int, output_price: int, selling: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self.writer = writer
        self.input_price = input_price
        self.output_price = output_price
        self.selling = selling
        self._clock = clock
        self._unwritable: str | None = None
        """Why the last write failed, until one succeeds again."""

    def entry(self, finished: Finished) -> Entry:
        platform = self.selling and finished.token_presented
        paid = platform and finished.complete
        gross = gross_nanocents(finished.prompt_tokens, finished.completion_tokens, self.input_price, self.output_price) if paid else 0
        return Entry(
            finished_at=self._clock(),
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
        )

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
    records nothing, and ``failure`` (what ``/health`` shows) says why for the whole run."""

    def __init__(self, failure: str) -> None:
        self.failure = failure
        self.missed = 0

    async def record(self, finished: Finished) -> None:
        self.missed += 1

    def close(self) -> None:
        if self.missed:
            requests = f"{self.missed:,} request{'' if self.missed == 1 else 's'}"
            log.error("the earnings of %s served in this run are not recorded: the earnings ledger could not be opened", requests)


def open_recorder(path: Path, *, input_price: int, output_price: int, selling: bool) -> LedgerRecorder | UnopenedLedger:
    """The recorder `serve` plugs into the server; when the ledger cannot be opened, one that
    records nothing and says why (logged now, on ``/health`` all along): the agent serves on
    without a ledger rather than not at all."""
    try:
        writer = LedgerWriter.open(path)
    except LedgerError as exc:
        failure = f"{exc}, then restart the agent; until then requests are served but not recorded"
        log.warning("%s", failure)
        return UnopenedLedger(failure)
    return LedgerRecorder(writer, input_price=input_price, output_price=output_price, selling=selling)
