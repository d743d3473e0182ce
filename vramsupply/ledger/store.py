"""The earnings ledger on disk: one SQLite file in the data dir, private (mode 0600), in WAL mode.

Why SQLite: a row per finished request must survive the agent being killed at any moment, and
`vramsupply earnings` must read it while `serve` writes. WAL gives both: a committed row is in the
WAL file before the buyer gets the last byte, and readers never block the writer.

Size stays bounded: raw rows are kept for ``KEEP_RAW_SECONDS`` (and at most ``MAX_RAW_ROWS``);
older ones are rolled up into one row per UTC day, model, source and prices in ``daily``, which
keeps every count and sum exactly. Reports older than that have a resolution of one day.

Requests that ended early (``complete`` 0: the buyer hung up, the agent cut them) are served but
unpaid, so the daily totals keep their tokens and money apart too (``cut_*``, schema 2). Days a
schema-1 ledger rolled up before that hold no such split: ``untracked_cut_requests`` counts the
requests that ended early in them, whose tokens and money are in the totals as if complete.

Requests in flight have rows of their own (``in_flight``, schema 3): one an agent killed outright
left there is read, and at the next start recorded, as interrupted (``in_flight.py``, ``schema.py``).

A damaged file (SQLite's "database disk image is malformed", "file is not a database") raises
``DamagedLedger`` (errors.py), apart from every other failure: no retry or restart mends it, so the agent moves
it aside at start (``recorder.move_aside``) and starts a new one; `vramsupply earnings` only says so, and
how to salvage its rows. A locked, read-only or full one is never moved: those pass.

One ``LedgerStore`` is one connection; use it from one thread (the writer thread in ``serve``, the
main thread in the CLI).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vramsupply.config import data_dir, make_private_dirs, os_reason
from vramsupply.ledger.errors import DamagedLedger, LedgerError, damaged, remedy
from vramsupply.ledger.in_flight import FORGET, INTERRUPTED, UPSERT, InFlight, this_run
from vramsupply.ledger.read_only import connect_read_only, may_write
from vramsupply.ledger.schema import HALF_BITS, LATER, MIGRATIONS, ROLL_UP, SCHEMA_VERSION, grouped

LEDGER_FILE_NAME = "ledger.sqlite3"
KEEP_RAW_SECONDS = 8 * 86400
"""Raw rows cover `earnings --since 7d` exactly; anything older is read from the daily totals."""
MAX_RAW_ROWS = 200_000
"""A busy agent rolls up sooner: about 40 MB of raw rows at most."""
BUSY_TIMEOUT_SECONDS = 10.0
CONNECTION = {"timeout": BUSY_TIMEOUT_SECONDS, "isolation_level": None, "check_same_thread": False}
"""``sqlite3.connect``'s options for every connection: autocommit (``_Transaction`` begins), any thread."""
MAX_TIME = 253402300799.0
"""9999-12-31T23:59:59Z, the last second SQLite's calendar (and Python's) can name."""

def default_ledger_path() -> Path:
    return data_dir() / LEDGER_FILE_NAME


@dataclass(frozen=True)
class Entry:
    """One finished request, as the ledger records it."""

    finished_at: float
    request_id: str
    model: str
    source: str  # "platform" (it carried the endpoint token of a registered agent) or "local"
    complete: bool  # False: it ended early (the buyer hung up, the agent cut it): unpaid, money 0 since schema 2
    choices: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    input_price: int
    output_price: int
    gross_nanocents: int
    earned_nanocents: int
    interrupted: bool = False  # the agent was killed while serving it (``in_flight.py``): complete False, money 0
    flight_id: str | None = field(default=None, compare=False)
    """The id of its row in flight where that is not ``request_id`` (a relayed request's, ``upstream.exchange``):
    the row this one replaces in its commit. Not stored (``COLUMNS``)."""


COLUMNS = tuple(name for name in Entry.__dataclass_fields__ if name != "flight_id")
"""An ``Entry``'s fields that are columns of ``requests``."""


@dataclass(frozen=True)
class Group:
    """Totals of one UTC day, model and source (``platform`` or ``local``); ``cut_*`` are those of
    the requests that ended early, apart from ``untracked_cut_requests`` (see the module docstring);
    ``interrupted_*`` those of the requests among them that a killed agent left in flight (``schema.py``)."""

    day: str
    model: str
    source: str
    requests: int
    cut_requests: int
    untracked_cut_requests: int
    interrupted_requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    gross_nanocents: int
    earned_nanocents: int
    cut_prompt_tokens: int
    cut_completion_tokens: int
    cut_gross_nanocents: int
    cut_earned_nanocents: int
    interrupted_prompt_tokens: int
    interrupted_completion_tokens: int


class LedgerStore:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """``read_only``: read it as it is and write nothing, neither in the file nor beside it
        (read_only.py); ``for_reading`` picks that where this user may not write it."""
        self.path = path
        db = None
        try:
            if read_only:
                self._db = db = connect_read_only(path, **CONNECTION)
                self._read_as_it_is()
            else:
                _create_private(path)
                self._db = db = sqlite3.connect(path, **CONNECTION)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit is written to the WAL before it returns, so it survives the
                # process being killed; only a power cut can lose the last moments before a checkpoint.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
            self._identity = _identity(path)
            self.run = this_run()
        except BaseException as exc:
            if db is not None:
                db.close()
            if not isinstance(exc, (sqlite3.Error, OSError)):
                raise
            if damaged(exc):
                raise DamagedLedger(path, exc) from None
            reason = os_reason(exc, path) if isinstance(exc, OSError) else exc
            raise LedgerError(f"cannot open the earnings ledger {path}: {reason}; {_in_the_way(path) or remedy(exc)}") from None

    @classmethod
    def for_reading(cls, path: Path) -> LedgerStore:
        """The ledger for a command that only reads it (`earnings`, `status`): as the agent opens it
        where this user may write it (an older schema is brought up to date), else read-only (a
        read-only mount, another user's file), where an older schema is said, not read wrong."""
        return cls(path, read_only=not may_write(path))

    def replaced(self) -> bool:
        """Whether the path no longer names the file this store has open: deleted, or moved away
        (its rows would go on to a file nobody reads, or to one moved elsewhere)."""
        try:
            return _identity(self.path) != self._identity
        except FileNotFoundError:
            return True
        except OSError:
            return False  # a folder we may no longer enter: the write says why

    def wait_for_locks(self, seconds: float) -> None:
        """How long a statement waits for another connection's lock before it fails (SQLITE_BUSY)."""
        self._db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    def check(self) -> None:
        """Read every page (``PRAGMA quick_check``, well under a second for the largest ledger):
        damage past the first pages, which opening does not read, raises ``DamagedLedger`` at the
        agent's start rather than at some later write."""
        try:
            rows = self._db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as exc:
            if damaged(exc):
                raise DamagedLedger(self.path, exc) from None
            raise LedgerError(f"cannot read the earnings ledger {self.path}: {exc}; {remedy(exc)}") from None
        if rows != [("ok",)]:
            raise DamagedLedger(self.path, "; ".join(str(row[0]) for row in rows[:3]))

    def _migrate(self) -> None:
        """Create the tables, or bring an older ledger to this schema, in one transaction: the agent
        and `vramsupply earnings` may open the same old file at once, and only one migrates it."""
        if self._version() == SCHEMA_VERSION:
            return
        with self._transaction():
            version = self._version()
            # statement by statement: executescript would commit the transaction first
            for statement in MIGRATIONS.get(version, "").split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _read_as_it_is(self) -> None:
        version = self._version()
        if version != SCHEMA_VERSION:
            raise LedgerError(
                f"the earnings ledger {self.path} is of an older vramsupply (schema {version}; this one reads {SCHEMA_VERSION}) and cannot be "
                "brought up to date here, as this user may not write it (a read-only mount, or another user's file): run `vramsupply earnings` "
                "once as the user the agent runs as, where it can be written, or start the agent on it"
            )

    def _version(self) -> int:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(f"the earnings ledger {self.path} was written by a newer vramsupply (schema {version}); upgrade vramsupply, or move the file away")
        return version

    def close(self) -> None:
        self._db.close()

    def add(self, entries: Iterable[Entry], *, once: bool = False) -> None:
        """Write ``entries`` in one transaction: all of them are on disk when this returns.

        ``once``: the rows were tried before (the writer held them through a full disk), so skip any
        already in the file, known by its request id and finish time: a commit SQLite reported as
        failed may still have reached the WAL, and a request must not be counted twice."""
        entries = list(entries)
        rows = [
            (
                e.finished_at, e.request_id, e.model, e.source, int(e.complete), e.choices, e.prompt_tokens, e.cached_tokens,
                e.completion_tokens, e.input_price, e.output_price, e.gross_nanocents, e.earned_nanocents, int(e.interrupted),
            )
            for e in entries
        ]
        insert = f"INSERT INTO requests ({', '.join(COLUMNS)}) "
        values = ", ".join("?" * len(COLUMNS))
        with self._transaction():
            if once:
                # finished_at is indexed: one index lookup per row
                unseen = "SELECT 1 FROM requests WHERE finished_at = ? AND request_id = ?"
                self._db.executemany(f"{insert}SELECT {values} WHERE NOT EXISTS ({unseen})", [(*r, r[0], r[1]) for r in rows])
            else:
                self._db.executemany(f"{insert}VALUES ({values})", rows)
            # its row in flight, if any, in the same commit: no instant holds both (a kill then would count it twice)
            self._db.executemany(FORGET, [(self.run, e.flight_id or e.request_id) for e in entries])

    def roll_up(self, now: float | None = None, keep_seconds: float = KEEP_RAW_SECONDS, max_rows: int = MAX_RAW_ROWS) -> int:
        """Fold raw rows older than ``keep_seconds`` (and any beyond the newest ``max_rows``) into
        the daily totals; returns how many rows were folded."""
        now = time.time() if now is None else now
        with self._transaction():
            # by age, the row's own time (rows are not written in time order: a clock set right
            # again writes older times after newer ones); by count, the order they were written
            by_count = self._db.execute("SELECT id FROM requests ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)).fetchone()
            folded = {"cutoff": now - keep_seconds, "last_id": by_count[0] if by_count else 0}
            self._db.execute(ROLL_UP, folded)
            return self._db.execute("DELETE FROM requests WHERE finished_at < :cutoff OR id <= :last_id", folded).rowcount

    def groups(self, since: float, until: float = MAX_TIME, gone: tuple[str, ...] = ()) -> list[Group]:
        """Totals per UTC day, model and source from ``since`` to ``until`` (days already rolled up count
        whole); the rows in flight of the ``gone`` runs count as interrupted (``in_flight.py``)."""
        named = {"since": since, "until": until, **{f"gone{i}": run for i, run in enumerate(gone)}}
        try:
            rows = self._db.execute(grouped(len(gone)), named).fetchall()
        except sqlite3.Error as exc:
            raise self._unreadable(exc) from None
        return [Group(*row[:7], *((high << HALF_BITS) + low for high, low in zip(row[7::2], row[8::2]))) for row in rows]

    def runs_in_flight(self) -> dict[str, int]:
        """Each run with requests in flight in the file, and how many."""
        try:
            return dict(self._db.execute("SELECT run, count(*) FROM in_flight GROUP BY run").fetchall())
        except sqlite3.Error as exc:
            raise self._unreadable(exc) from None

    def in_flight(self, rows: Iterable[InFlight]) -> None:
        """Write the requests this process has in flight, new ones or their tokens now, in one transaction."""
        with self._transaction():
            self._db.executemany(UPSERT, [row.row(self.run) for row in rows])

    def forget(self, request_ids: Iterable[str]) -> None:
        """Requests of this process no longer in flight that will have no finished row (nothing was sold)."""
        with self._transaction():
            self._db.executemany(FORGET, [(self.run, request_id) for request_id in request_ids])

    def interrupt(self, runs: Iterable[str]) -> tuple[int, int, int]:
        """Move the rows in flight of ``runs``, ended without finishing them, to ``requests`` as
        interrupted; returns how many, their prompt and their completion tokens."""
        moved = (0, 0, 0)
        with self._transaction():
            for run in runs:
                count = self._db.execute("SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM in_flight WHERE run = ?", (run,)).fetchone()
                self._db.execute(INTERRUPTED, (run,))
                self._db.execute("DELETE FROM in_flight WHERE run = ?", (run,))
                moved = (moved[0] + count[0], moved[1] + count[1], moved[2] + count[2])
        return moved

    def later(self, until: float) -> int:
        """Requests recorded after ``until``: in the future, when the clock went back since."""
        try:
            return self._db.execute(LATER, {"until": until}).fetchone()[0]
        except sqlite3.Error as exc:
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: sqlite3.Error) -> LedgerError:
        return DamagedLedger(self.path, exc) if damaged(exc) else LedgerError(f"cannot read the earnings ledger {self.path}: {exc}")

    def entries(self) -> list[Entry]:
        """Every raw row, oldest first (tests and audits)."""
        return [Entry(*row[:4], bool(row[4]), *row[5:13], bool(row[13])) for row in self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id")]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error (sqlite3's own context manager does not begin).

    A COMMIT that fails (a full disk) is rolled back too: left open, the transaction would make
    every later BEGIN fail, and the ledger would never be written again once the disk has room."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._undo()  # one an earlier failure left open
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self._undo()
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._undo()
            raise

    def _undo(self) -> None:
        """ROLLBACK, unless SQLite rolled back already (it may, on a full disk): the error that got
        here is the one to report, not "cannot rollback - no transaction is active"."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def _in_the_way(path: Path) -> str | None:
    """SQLite's "unable to open database file" when its ``-wal`` or ``-shm`` is no file: that, by name
    (the permissions it would send the provider to are fine)."""
    for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        if side.is_dir() or (side.exists() and not side.is_file()):
            return f"{side} is not a file: move it out of the way"
    return None


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _create_private(path: Path) -> None:
    """Create the file with mode 0600 before SQLite opens it: SQLite gives its WAL the same mode."""
    make_private_dirs(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
