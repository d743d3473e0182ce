"""Opening the ledger where this user may only read it: a read-only mount, another user's file.

`vramsupply earnings` and `status` only read the ledger, but opened it as the agent does: created
it, set WAL mode and brought its schema up to date, all of them writes. On a read-only mount (a
backup, a monitoring container's view of the data dir) or a file the user may not write they
failed with "Read-only file system" and showed nothing. Where the file or its folder cannot be
written (``may_write``), they now open it read-only, as below.

A WAL-mode file read with ``mode=ro`` needs a ``-shm`` beside it: where there is none it creates
one (owned by the reader: the agent's user may not write it then), and on a read-only mount it
cannot ("unable to open database file"). No ``-shm`` means no connection has the file open, and
with no ``-wal`` (or an empty one) every row is in the file itself: that is read with
``immutable=1``, without locks and creating nothing; so is a file whose ``-shm`` SQLite cannot use
here while no ``-wal`` holds rows (an agent killed left it). A ``-wal`` that holds rows is read through
its ``-shm``; one left without it where none can be made is said, not left out of the report. A file
this user may not read at all is said as such, not as one to make writable.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from vramsupply.ledger.errors import LedgerError


def may_write(path: Path) -> bool:
    """Whether this user may write ``path`` and create its ``-wal`` and ``-shm`` beside it, as opening
    it read-write does (``os.access`` also says no on a read-only mount, to root too)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def connect_read_only(path: Path, **options: Any) -> sqlite3.Connection:
    """A connection that reads ``path`` and writes neither it nor beside it, but for the ``-shm``
    a ``-wal`` without one needs (``options``: ``sqlite3.connect``'s)."""
    if path.exists() and not os.access(path, os.R_OK):
        raise LedgerError(f"cannot read the earnings ledger {path}: Permission denied; run the command as the user the agent runs as")
    uri = path.absolute().as_uri()  # percent-encoded: a '?' or '#' in a folder's name is no URI parameter
    shm = Path(f"{path}-shm")
    wal_rows = _holds_rows(Path(f"{path}-wal"))
    if not shm.exists() and not wal_rows:
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, **options)
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, **options)
    try:
        db.execute("PRAGMA user_version")  # SQLite opens the -shm at the first read, not at connect
    except sqlite3.Error:
        db.close()
        if not wal_rows:  # a -shm left by an agent killed, its -wal gone or empty: every row is in the file
            return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, **options)
        if shm.exists():
            raise
        raise LedgerError(
            f"cannot read the earnings ledger {path}: its -wal holds rows SQLite reads only with a -shm beside it, which this user "
            "may not create there; copy the ledger and its -wal to a folder you may write, or let the agent that writes it stop once "
            "(it folds the -wal into the ledger)"
        ) from None
    return db


def _holds_rows(wal: Path) -> bool:
    try:
        return wal.stat().st_size > 0
    except FileNotFoundError:
        return False
