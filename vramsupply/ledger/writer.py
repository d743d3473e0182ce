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
``/health``. A batch the file cannot take (a full disk) fails with what to do about it; the
recorder reports that on ``/health`` until a batch is written again.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from vramsupply.ledger.store import Entry, LedgerError, LedgerStore, remedy

log = logging.getLogger("vramsupply.ledger")

ROLL_UP_EVERY = 1000
"""Rows written between two roll-ups of old rows into daily totals."""

Item = tuple[Entry, Future[None]]


class LedgerWriter:
    def __init__(self, store: LedgerStore, *, roll_up_every: int = ROLL_UP_EVERY) -> None:
        self.store = store
        self._roll_up_every = roll_up_every
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
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

    def close(self, timeout: float = 10.0) -> None:
        """Write everything already submitted, then close the file."""
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
        stopping = False
        while not stopping:
            batch = self._take()
            stopping = None in batch
            self._in_hand = [item for item in batch if item is not None]
            try:
                if self._in_hand:
                    self._commit(self._in_hand)
                    since_roll_up += len(self._in_hand)
                if since_roll_up >= self._roll_up_every:
                    since_roll_up = 0
                    self._roll_up()
            except Exception as exc:
                log.exception("the earnings ledger writer failed on %d row(s); it goes on", len(self._in_hand))
                _resolve(self._in_hand, self._unwritable(exc))
            self._in_hand = []

    def _take(self) -> list[Item | None]:
        """Everything waiting (at least one item); each future is running from here on, or was cancelled."""
        batch = [self._queue.get()]
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if item is not None:
                item[1].set_running_or_notify_cancel()  # False: the buyer left already; the row is written anyway
        return batch

    def _commit(self, items: list[Item]) -> None:
        try:
            self.store.add(entry for entry, _ in items)
        except sqlite3.Error as exc:
            _resolve(items, self._unwritable(exc))
            return
        except Exception:
            if len(items) == 1:
                raise
            for item in items:  # one row the file cannot hold must not cost the others theirs
                self._commit_alone(item)
            return
        _resolve(items, None)

    def _commit_alone(self, item: Item) -> None:
        try:
            self._commit([item])
        except Exception as exc:
            log.exception("request %s not written to the earnings ledger", item[0].request_id)
            _resolve([item], LedgerError(f"cannot write request {item[0].request_id} to the earnings ledger: {exc}"))

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

    def _take_all(self) -> list[Item]:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
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
