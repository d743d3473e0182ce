"""What can go wrong with the ledger file, and what the provider does about it.

Apart from store.py because the same classification serves the store (opening, reading), the
writer (a full disk while serving) and the recorder (a damaged file moved aside at start): an
error names the file and the fix, and damage ("database disk image is malformed", "file is not a
database") is told apart from every other failure, since no retry or restart mends it.
"""

from __future__ import annotations

import errno
import shlex
import sqlite3
from pathlib import Path

from vramsupply.errors import VramsupplyError


class LedgerError(VramsupplyError):
    """The ledger file cannot be opened or written; the message names the file and what to do."""


DAMAGE = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
"""SQLite's errors of a damaged file (``SQLITE_CORRUPT_INDEX`` and the like start with the first)."""

REMEDIES = (
    ((errno.ENOSPC,), ("SQLITE_FULL",), "free space on its disk"),
    ((errno.EISDIR,), (), "move that directory out of the way"),
    ((errno.EACCES, errno.EPERM, errno.EROFS), ("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CANTOPEN"),
     "make it and its folder writable by the user the agent runs as"),
    ((), ("SQLITE_BUSY", "SQLITE_LOCKED"), "another program holds it locked: end that program"),
    ((), DAMAGE, "it is damaged: restart the agent, which moves it aside and starts a new one"),
)
"""(OS errnos, SQLite error names, what the provider does about them) for the ledger file."""

SQLITE_MESSAGES = {
    "database or disk is full": "SQLITE_FULL",
    "attempt to write a readonly database": "SQLITE_READONLY",
    "unable to open database file": "SQLITE_CANTOPEN",
    "database is locked": "SQLITE_BUSY",
    "database disk image is malformed": "SQLITE_CORRUPT",
    "file is not a database": "SQLITE_NOTADB",
}
"""SQLite's own messages, for Python 3.10, whose ``sqlite3.Error`` has no ``sqlite_errorname``."""


def _sqlite_name(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or SQLITE_MESSAGES.get(str(exc), "")


def damaged(exc: BaseException) -> bool:
    """Whether ``exc`` says the file is damaged (never a locked, read-only or full one)."""
    return isinstance(exc, sqlite3.Error) and _sqlite_name(exc).startswith(DAMAGE)


def remedy(exc: BaseException) -> str:
    """What the provider does when opening or writing the ledger failed with ``exc``."""
    code = exc.errno if isinstance(exc, OSError) else None
    name = _sqlite_name(exc)
    for codes, names, what in REMEDIES:
        if code in codes or name.startswith(names):
            return what
    return "check the file and the disk it is on"


class DamagedLedger(LedgerError):
    """The ledger file is damaged: the agent moves it aside at start; this says so, and how to salvage it."""

    def __init__(self, path: Path, exc: BaseException | str) -> None:
        self.path, self.reason = path, str(exc)
        super().__init__(
            f"the earnings ledger {path} is damaged ({exc}); `vramsupply serve` moves it aside and starts a new one when it next starts. "
            f"To try to salvage its rows: {salvage_command(path)}"
        )


def salvage_command(damaged_path: Path) -> str:
    """The shell command that copies what SQLite can still read of ``damaged_path`` into a new file."""
    recovered = damaged_path.with_name(f"{damaged_path.name.split('.sqlite3')[0]}.recovered.sqlite3")
    return f"sqlite3 {shlex.quote(str(damaged_path))} .recover | sqlite3 {shlex.quote(str(recovered))}"
