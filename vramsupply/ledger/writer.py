"""Writing ledger rows off the event loop, with group commit.

The HTTP server hands each finished request to ``LedgerWriter.submit`` and may await the returned
future before it sends the buyer the last byte. One thread owns the SQLite connection: it takes
every entry waiting in its queue, writes them in one transaction and then resolves their futures,
so a burst of requests finishing together costs one commit, and the event loop never waits on disk.

A buyer may hang up while its row waits for the commit, which cancels the awaiting handler and,
through ``asyncio.wrap_future``, tries to cancel the future. The row is written all the same (the
tokens were served); its future is marked running when taken, so it can no longer be cancelled
under the writer, and one cancelled before that is left alone. No batch may end the thread: an
unexpected error is logged with its traceback and the writer goes on. Should the thread die anyway,
every waiting and later future fails at once (nobody waits forever) and ``failure`` says why, for
``/health``.

A batch the file cannot take (a full disk) is not lost: its rows are held in memory, in order, and
their futures fail with ``Unwritten`` (the buyer is answered all the same). So does one another
program holds a lock on for more than ``WRITE_BUSY_SECONDS``: buyers do not wait on that program.
The held rows are tried again, ahead of any new ones, when a batch comes at least ``retry_every``
seconds after the last try, and by a timer when none comes; rows arriving in between join them
untried, so buyers do not wait on a disk that is full. Once a try succeeds every held row is
written, in the order served, and ``unrecorded`` (what ``/health`` shows meanwhile) is None again.
A retry never writes a row twice (``LedgerStore.add(once=True)``). At most ``max_held`` rows are
held, about 500 bytes each; later ones are dropped and counted. Closing makes a last try, and logs
one line with what it could not write.

A ledger file deleted or moved away while the agent runs is noticed at the next batch, which goes
to a new file at the path (``_reopen_if_replaced``), not on into the file nobody reads any more.

Requests in flight (``in_flight.py``) come as ``Marks``, which nobody waits for: the batch writes
them first, in a transaction of their own, and a file that cannot take them (or that holds rows
already) drops them: the finished rows that follow are what is held. Starting, the thread records
the rows in flight of agents that ended without finishing them as interrupted, in one line.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from vramsupply.ledger.errors import LedgerError, remedy
from vramsupply.ledger.in_flight import InFlight, run_gone
from vramsupply.ledger.store import Entry, LedgerStore

log = logging.getLogger("vramsupply.ledger")

ROLL_UP_EVERY = 1000
"""Rows written between two roll-ups of old rows into daily totals."""
MAX_HELD_ROWS = 50_000
"""Rows held in memory while the file cannot be written: about 25 MB, over an hour of a busy agent."""
RETRY_SECONDS = 2.0
"""Time between two tries of the held rows: each try rewrites all of them, so not one per request."""
WRITE_BUSY_SECONDS = 1.0
"""How long a write waits for another program's lock on the file (``LedgerStore`` opens with 10 s,
for the CLI): past it the rows are held like a full disk's, since buyers wait for the commit."""


class Unwritten(LedgerError):
    """The file cannot take the row now: it is held in memory and written once it can (or, beyond
    ``max_held``, dropped and counted). The writer reports this itself, on ``/health`` and in the log."""

Item = tuple[Entry, Future[None]]


@dataclass(frozen=True)
class Marks:
    """Requests in flight to write (new ones, or their tokens now) and ones ended with nothing to record."""

    rows: tuple[InFlight, ...] = ()
    ended: tuple[str, ...] = ()


SETTLED: Future[None] = Future()
"""The future of every held row: its own was resolved when it was held."""
SETTLED.set_result(None)


class LedgerWriter:
    def __init__(
        self,
        store: LedgerStore,
        *,
        roll_up_every: int = ROLL_UP_EVERY,
        max_held: int = MAX_HELD_ROWS,
        retry_every: float = RETRY_SECONDS,
        lock_wait: float = WRITE_BUSY_SECONDS,
    ) -> None:
        self.store = store
        self._lock_wait = lock_wait
        store.wait_for_locks(lock_wait)
        self._roll_up_every = roll_up_every
        self._max_held = max_held
        self._retry_every = retry_every
        self._held: list[Item] = []
        """Rows the file could not take yet, oldest first; their futures are done."""
        self._dropped = 0
        """Rows not held, beyond ``max_held``, since the file last took a write."""
        self._cannot_write: str | None = None
        """Why the file takes no write, while rows are held."""
        self._next_try = 0.0
        self._written: list[Item] = []  # of the try under way: rows written; rows the file did not take, and why
        self._failed: list[Item] = []
        self._failure: str | None = None
        self._queue: queue.SimpleQueue[Item | Marks | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # between submit and a dying thread: no entry is queued after it drained the queue
        self._in_hand: list[Item] = []
        self.failure: str | None = None
        """Why the writer thread stopped for good (a bug, not a disk); None while it runs."""
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._closed = False
        self._thread.start()

    @classmethod
    def open(cls, path: Path) -> LedgerWriter:
        """Open (or create) the ledger at ``path``; raises ``LedgerError`` with the reason."""
        return cls(LedgerStore(path))

    def submit(self, entry: Entry) -> Future[None]:
        """Queue ``entry``; the future completes once it is committed (or fails with ``LedgerError``)."""
        future: Future[None] = Future()
        with self._lock:
            refusal = "the earnings ledger is closed" if self._closed else self.failure
            if refusal is None:
                self._queue.put((entry, future))
                return future
        future.set_exception(LedgerError(refusal))
        return future

    def mark(self, marks: Marks) -> None:
        """Queue ``marks``, waiting for nothing (dropped once the writer is closed or stopped)."""
        with self._lock:
            if not self._closed and self.failure is None:
                self._queue.put(marks)

    @property
    def unrecorded(self) -> str | None:
        """Why requests are not in the file yet and how many, while rows are held (for ``/health``)."""
        reason, held, dropped = self._cannot_write, len(self._held), self._dropped
        if reason is None:
            return None
        words = (
            f"{reason}; {_requests(held)} served since {'is' if held == 1 else 'are'} not recorded yet: held in memory, "
            "written by themselves once it can write (stopping the agent before then loses them)"
        )
        if dropped:
            words += f"; {_requests(dropped)} more {'was' if dropped == 1 else 'were'} dropped beyond the {self._max_held:,} held: their earnings are not recorded"
        return words

    def close(self, timeout: float = 10.0) -> None:
        """Write everything already submitted and held (a last try), then close the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._write_until_closed()
        except BaseException as exc:
            log.critical("the earnings ledger writer stopped: earnings are no longer recorded", exc_info=True)
            self._stop_taking(f"the earnings ledger writer stopped ({type(exc).__name__}: {exc}); restart the agent to record earnings again")
        finally:
            self.store.close()

    def _write_until_closed(self) -> None:
        since_roll_up = self._roll_up_every  # roll up once at start: an agent may have been off for weeks
        self._interrupt_gone()
        stopping = False
        while not stopping:
            batch = self._take()
            stopping = None in batch
            self._write_marks([item for item in batch if isinstance(item, Marks)])
            self._in_hand = [item for item in batch if isinstance(item, tuple)]
            try:
                since_roll_up += self._write(self._in_hand, now=stopping or not batch)
                if since_roll_up >= self._roll_up_every and not self._held:
                    since_roll_up = 0
                    self._roll_up()
            except Exception as exc:
                log.exception("the earnings ledger writer failed on %d row(s); it goes on", len(self._in_hand))
                _resolve(self._in_hand, self._unwritable(exc))
            self._in_hand = []
        self._lose_held("the agent stopped before it could write them")

    def _write(self, new: list[Item], *, now: bool) -> int:
        """Write the held rows, then ``new``, in one transaction; whatever the file cannot take is
        held. ``now``: try even if the last try was less than ``retry_every`` ago. Returns rows written."""
        batch = [*self._held, *new]
        if not batch:
            return 0
        if self._held and not now and time.monotonic() < self._next_try:
            self._hold(batch, self._cannot_write)  # not tried: buyers do not wait on a full disk
            return 0
        held, self._written, self._failed, self._failure = len(self._held), [], [], None
        try:
            if (unopened := self._reopen_if_replaced()) is not None:
                self._failed, self._failure = list(batch), unopened
            elif len(batch) == 1:  # a row alone: one the file can never take is said by its request, not as the disk's fault
                self._commit_alone(batch[0], once=held > 0)
            else:
                self._commit(batch, once=held > 0)
        finally:
            self._hold(self._failed, self._failure)
            self._next_try = time.monotonic() + self._retry_every  # from the end of this try, however many come meanwhile
            if not self._held and self._cannot_write is not None and (self._written or held):
                self._written_again(min(held, len(self._written)))  # held rows come first; one never writable was said
            _resolve(self._written, None)  # last: a buyer's handler then reads /health's state as it is now
        return len(self._written)

    def _reopen_if_replaced(self) -> str | None:
        """The ledger file was deleted or moved away while the agent ran (a "reset" by hand, an
        uninstall): later rows go to a new ledger at its path, said once, rather than into a file
        nobody reads. Why a new one cannot be opened, if so: the rows are then held, as on a full disk."""
        if not self.store.replaced():
            return None
        try:
            store = LedgerStore(self.store.path)
        except LedgerError as exc:
            return str(exc)
        log.warning("the earnings ledger %s was deleted or moved away while the agent ran: later requests are recorded in a new one there", store.path)
        store.wait_for_locks(self._lock_wait)
        self.store.close()
        self.store = store
        return None

    def _write_marks(self, marks: list[Marks]) -> None:
        """Every request's latest tokens, then the ended ones: a request's marks come in the order made."""
        rows = {row.request_id: row for m in marks for row in m.rows}
        ended = [request_id for m in marks for request_id in m.ended]
        if self._cannot_write is not None:
            return  # rows are held: a try of these would only keep buyers waiting longer on a locked file
        try:
            if rows:
                self.store.in_flight(rows.values())
            if ended:
                self.store.forget(ended)
        except sqlite3.Error as exc:
            log.debug("requests in flight not written to the earnings ledger: %s", exc)

    def _interrupt_gone(self) -> None:
        """The rows in flight of agents gone (killed) are interrupted requests: record them so, once."""
        try:
            gone = [run for run in self.store.runs_in_flight() if run_gone(run)]
            count, prompt, completion = self.store.interrupt(gone) if gone else (0, 0, 0)
        except LedgerError as exc:
            log.warning("cannot record the requests an earlier agent left in flight: %s", exc)
            return
        except sqlite3.Error as exc:
            log.warning("cannot record the requests an earlier agent left in flight: %s", self._unwritable(exc))
            return
        if count:
            log.warning(
                "the earnings ledger: %s in flight when an earlier agent process ended without finishing (killed?) recorded as "
                "interrupted, unpaid: %s prompt + %s completion tokens served, as last written", _requests(count), f"{prompt:,}", f"{completion:,}",
            )

    def _take(self) -> list[Item | Marks | None]:
        """Everything waiting: at least one item, or none when it is time to try the held rows again;
        each future is running from here on, or was cancelled."""
        try:
            batch = [self._queue.get(timeout=max(0.0, self._next_try - time.monotonic()) if self._held else None)]
        except queue.Empty:
            return []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if isinstance(item, tuple):
                item[1].set_running_or_notify_cancel()  # False: the buyer left already; the row is written anyway
        return batch

    def _commit(self, items: list[Item], *, once: bool) -> None:
        """Write ``items``: to ``_written`` they go, or to ``_failed`` when the file cannot take them."""
        try:
            entries = (entry for entry, _ in items)
            self.store.add(entries, once=True) if once else self.store.add(entries)
        except sqlite3.Error as exc:
            self._failed += items
            self._failure = str(self._unwritable(exc))
            return
        except Exception:
            if len(items) == 1:
                raise
            for item in items:  # one row the file cannot hold must not cost the others theirs
                self._commit_alone(item, once=once)
            return
        self._written += items

    def _commit_alone(self, item: Item, *, once: bool) -> None:
        try:
            self._commit([item], once=once)
        except Exception as exc:
            log.exception("request %s not written to the earnings ledger", item[0].request_id)
            _resolve([item], LedgerError(f"cannot write request {item[0].request_id} to the earnings ledger: {exc}"))

    def _hold(self, items: list[Item], reason: str | None) -> None:
        """Keep ``items`` (oldest first) for the next try, up to ``max_held``; drop and count the rest.
        The state ``/health`` reads is set before any buyer's future is resolved."""
        kept, dropped = items[: self._max_held], items[self._max_held :]
        # only the rows: their buyers are answered, and a future weighs three times a row.
        # Before the reason: /health never says "0 requests not recorded".
        self._held = [(entry, SETTLED) for entry, _ in kept]
        if not items or reason is None:
            return
        if self._cannot_write is None:
            log.warning("%s; serving continues, but earnings are not recorded until it can write; meanwhile up to %s rows are held in memory",
                        reason, f"{self._max_held:,}")
        if dropped and not self._dropped:
            log.warning("%s rows are held in memory, the most it holds: the earnings of later requests are not recorded", f"{self._max_held:,}")
        self._cannot_write = reason
        self._dropped += len(dropped)
        _resolve(kept, Unwritten(f"{reason}; the row is held in memory until it can be written"))
        _resolve(dropped, Unwritten(f"{reason}; the row is dropped: {self._max_held:,} are held in memory already"))

    def _written_again(self, recorded: int) -> None:
        """No row is held any more: ``recorded`` of them were written (the others could never be, and were said)."""
        if recorded:
            log.info("the earnings ledger %s is written again: the %s held in memory are recorded", self.store.path, _requests(recorded))
        if self._dropped:
            log.warning("the earnings of %s are not recorded: dropped beyond the %s held in memory while the earnings ledger %s could not be written",
                        _requests(self._dropped), f"{self._max_held:,}", self.store.path)
        self._cannot_write, self._dropped = None, 0

    def _lose_held(self, why: str) -> None:
        """The writer ends with rows held: one line says how many requests are lost, and why."""
        lost = len(self._held) + self._dropped
        if lost:
            log.error("the earnings of %s are lost, not in the earnings ledger: %s; %s", _requests(lost), self._cannot_write, why)
        self._held, self._dropped = [], 0

    def _unwritable(self, exc: BaseException) -> LedgerError:
        return LedgerError(f"the earnings ledger {self.store.path} cannot be written: {exc}; {remedy(exc)}")

    def _roll_up(self) -> None:
        try:
            folded = self.store.roll_up()
        except sqlite3.Error as exc:
            log.warning("cannot roll up old rows of the earnings ledger %s: %s", self.store.path, exc)
            return
        if folded:
            log.debug("earnings ledger: %d old rows rolled up into daily totals", folded)

    def _stop_taking(self, reason: str) -> None:
        """The thread is dying: fail what it held and what waits, and refuse what comes (under the lock)."""
        with self._lock:
            self.failure = reason
            waiting = self._take_all()
        error = LedgerError(reason)
        _resolve(self._in_hand, error)
        _resolve(waiting, error)
        self._lose_held("the writer stopped")

    def _take_all(self) -> list[Item]:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if isinstance(item, tuple):
                item[1].set_running_or_notify_cancel()
                items.append(item)


def _resolve(items: Iterable[Item], error: LedgerError | None) -> None:
    """Complete every future not done yet; a cancelled one (its buyer hung up) is left as it is.
    Each is running or cancelled by now, so no cancel can slip in between the check and the set."""
    for _, future in items:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _requests(count: int) -> str:
    return f"{count:,} request{'' if count == 1 else 's'}"
