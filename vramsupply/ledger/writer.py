"""Writing ledger rows off the event loop, with group commit.

The HTTP server hands each finished request to ``LedgerWriter.submit`` and may await the returned
future before it sends the buyer the last byte. One thread owns the SQLite connection: it takes
every entry waiting in its queue, writes them in one transaction and then resolves their futures,
so a burst of requests finishing together costs one commit, and the event loop never waits on disk.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path

from vramsupply.ledger.store import Entry, LedgerError, LedgerStore

log = logging.getLogger("vramsupply.ledger")

ROLL_UP_EVERY = 1000
"""Rows written between two roll-ups of old rows into daily totals."""


class LedgerWriter:
    def __init__(self, store: LedgerStore, *, roll_up_every: int = ROLL_UP_EVERY) -> None:
        self.store = store
        self._roll_up_every = roll_up_every
        self._queue: queue.SimpleQueue[tuple[Entry, Future[None]] | None] = queue.SimpleQueue()
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
        if self._closed:
            future.set_exception(LedgerError("the earnings ledger is closed"))
        else:
            self._queue.put((entry, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Write everything already submitted, then close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        since_roll_up = self._roll_up_every  # roll up once at start: an agent may have been off for weeks
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            items = [item for item in batch if item is not None]
            if items:
                self._commit(items)
                since_roll_up += len(items)
            if since_roll_up >= self._roll_up_every:
                since_roll_up = 0
                self._roll_up()
        self.store.close()

    def _commit(self, items: list[tuple[Entry, Future[None]]]) -> None:
        try:
            self.store.add(entry for entry, _ in items)
        except sqlite3.Error as exc:
            error = LedgerError(f"cannot write to the earnings ledger {self.store.path}: {exc}")
            for _, future in items:
                future.set_exception(error)
            return
        for _, future in items:
            future.set_result(None)

    def _roll_up(self) -> None:
        try:
            folded = self.store.roll_up()
        except sqlite3.Error as exc:
            log.warning("cannot roll up old rows of the earnings ledger %s: %s", self.store.path, exc)
            return
        if folded:
            log.debug("earnings ledger: %d old rows rolled up into daily totals", folded)
