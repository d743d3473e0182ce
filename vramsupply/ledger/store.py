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
from dataclasses import dataclass
from pathlib import Path

from vramsupply.config import data_dir, os_reason
from vramsupply.ledger.errors import DamagedLedger, LedgerError, damaged, remedy
from vramsupply.ledger.read_only import connect_read_only, may_write

LEDGER_FILE_NAME = "ledger.sqlite3"
SCHEMA_VERSION = 2
KEEP_RAW_SECONDS = 8 * 86400
"""Raw rows cover `earnings --since 7d` exactly; anything older is read from the daily totals."""
MAX_RAW_ROWS = 200_000
"""A busy agent rolls up sooner: about 40 MB of raw rows at most."""
BUSY_TIMEOUT_SECONDS = 10.0
CONNECTION = {"timeout": BUSY_TIMEOUT_SECONDS, "isolation_level": None, "check_same_thread": False}
"""``sqlite3.connect``'s options for every connection: autocommit (``_Transaction`` begins), any thread."""
MAX_TIME = 253402300799.0
"""9999-12-31T23:59:59Z, the last second SQLite's calendar (and Python's) can name."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    finished_at REAL NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('platform', 'local')),
    complete INTEGER NOT NULL,
    choices INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    input_price INTEGER NOT NULL,
    output_price INTEGER NOT NULL,
    gross_nanocents INTEGER NOT NULL,
    earned_nanocents INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_finished_at ON requests (finished_at);
CREATE TABLE IF NOT EXISTS daily (
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    input_price INTEGER NOT NULL,
    output_price INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    cut_requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    gross_nanocents INTEGER NOT NULL,
    earned_nanocents INTEGER NOT NULL,
    cut_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cut_completion_tokens INTEGER NOT NULL DEFAULT 0,
    cut_gross_nanocents INTEGER NOT NULL DEFAULT 0,
    cut_earned_nanocents INTEGER NOT NULL DEFAULT 0,
    untracked_cut_requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model, source, input_price, output_price)
);
"""

SUMMED = ("prompt_tokens", "cached_tokens", "completion_tokens", "gross_nanocents", "earned_nanocents")
CUT_SUMMED = ("cut_prompt_tokens", "cut_completion_tokens", "cut_gross_nanocents", "cut_earned_nanocents")
"""The sums of the requests that ended early alone: ``cut_X`` is ``X`` of the rows with ``complete`` 0."""
ALL_SUMMED = (*SUMMED, *CUT_SUMMED)

MIGRATE_1_TO_2 = f"""
{"".join(f"ALTER TABLE daily ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0;" for c in (*CUT_SUMMED, "untracked_cut_requests"))}
UPDATE daily SET untracked_cut_requests = cut_requests;
"""
"""Days rolled up by schema 1 did not keep the split: their requests that ended early are untracked."""

INT64_MAX = 2**63 - 1
HALF_BITS = 32
"""Sums are read as two halves, ``sum(x >> 32)`` and ``sum(x & 0xFFFFFFFF)``, joined in Python: SQLite's
``sum`` stops with "integer overflow" past 2⁶³, and neither half can get there."""

DAY_OF_ROW = "coalesce(date(finished_at, 'unixepoch'), CASE WHEN finished_at < 0 THEN '0000-01-01' ELSE '9999-12-31' END)"
"""A time beyond SQLite's calendar (a clock gone wild) still rolls up, on its first or last day."""


def _checked_add(column: str) -> str:
    """``a + b`` turns into an inexact float past 2⁶³ in SQLite; NULL there fails the NOT NULL
    constraint instead, so the roll-up is undone and the rows stay raw and exact."""
    return f"{column} = CASE WHEN excluded.{column} > {INT64_MAX} - {column} THEN NULL ELSE {column} + excluded.{column} END"


def _cut(column: str) -> str:
    """``cut_X`` of one raw row: ``X`` when it ended early, else 0."""
    return f"(1 - complete) * {column.removeprefix('cut_')}"


ROLL_UP = f"""
INSERT INTO daily (day, model, source, input_price, output_price, requests, cut_requests, {", ".join(ALL_SUMMED)})
SELECT {DAY_OF_ROW}, model, source, input_price, output_price, count(*), sum(1 - complete),
       {", ".join(f"sum({c})" for c in SUMMED)}, {", ".join(f"sum({_cut(c)})" for c in CUT_SUMMED)}
FROM requests WHERE finished_at < :cutoff OR id <= :last_id
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (day, model, source, input_price, output_price) DO UPDATE SET
    {", ".join(_checked_add(c) for c in ("requests", "cut_requests", *ALL_SUMMED))}
"""

GROUPED = f"""
SELECT day, model, source, sum(requests), sum(cut_requests), sum(untracked_cut_requests),
       {", ".join(f"sum({c} >> {HALF_BITS}), sum({c} & {2**HALF_BITS - 1})" for c in ALL_SUMMED)} FROM (
    SELECT date(finished_at, 'unixepoch') AS day, model, source, 1 AS requests, 1 - complete AS cut_requests,
           0 AS untracked_cut_requests, {", ".join(SUMMED)}, {", ".join(f"{_cut(c)} AS {c}" for c in CUT_SUMMED)}
    FROM requests WHERE finished_at >= :since AND finished_at <= :until
    UNION ALL
    SELECT day, model, source, requests, cut_requests, untracked_cut_requests, {", ".join(ALL_SUMMED)} FROM daily
    WHERE day >= date(:since, 'unixepoch') AND day <= date(:until, 'unixepoch')
) GROUP BY day, model, source ORDER BY day, model, source
"""

LATER = """
SELECT (SELECT count(*) FROM requests WHERE finished_at > :until)
     + (SELECT coalesce(sum(requests), 0) FROM daily WHERE day > date(:until, 'unixepoch'))
"""


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


@dataclass(frozen=True)
class Group:
    """Totals of one UTC day, model and source (``platform`` or ``local``); ``cut_*`` are those of
    the requests that ended early, apart from ``untracked_cut_requests`` (see the module docstring)."""

    day: str
    model: str
    source: str
    requests: int
    cut_requests: int
    untracked_cut_requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    gross_nanocents: int
    earned_nanocents: int
    cut_prompt_tokens: int
    cut_completion_tokens: int
    cut_gross_nanocents: int
    cut_earned_nanocents: int


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
        """Create the tables, or bring a schema-1 ledger to schema 2, in one transaction: the agent
        and `vramsupply earnings` may open the same old file at once, and only one migrates it."""
        if self._version() == SCHEMA_VERSION:
            return
        with self._transaction():
            version = self._version()
            # statement by statement: executescript would commit the transaction first
            for statement in (SCHEMA if version == 0 else MIGRATE_1_TO_2 if version == 1 else "").split(";"):
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
        rows = [
            (
                e.finished_at, e.request_id, e.model, e.source, int(e.complete), e.choices, e.prompt_tokens, e.cached_tokens,
                e.completion_tokens, e.input_price, e.output_price, e.gross_nanocents, e.earned_nanocents,
            )
            for e in entries
        ]
        insert = f"INSERT INTO requests ({', '.join(Entry.__dataclass_fields__)}) "
        with self._transaction():
            if once:
                # finished_at is indexed: one index lookup per row
                unseen = "SELECT 1 FROM requests WHERE finished_at = ? AND request_id = ?"
                self._db.executemany(f"{insert}SELECT {', '.join('?' * 13)} WHERE NOT EXISTS ({unseen})", [(*r, r[0], r[1]) for r in rows])
            else:
                self._db.executemany(f"{insert}VALUES ({', '.join('?' * 13)})", rows)

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

    def groups(self, since: float, until: float = MAX_TIME) -> list[Group]:
        """Totals per UTC day, model and source from ``since`` to ``until`` (days already rolled up count whole)."""
        try:
            rows = self._db.execute(GROUPED, {"since": since, "until": until}).fetchall()
        except sqlite3.Error as exc:
            raise self._unreadable(exc) from None
        return [Group(*row[:6], *((high << HALF_BITS) + low for high, low in zip(row[6::2], row[7::2]))) for row in rows]

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
        return [Entry(*row[:4], bool(row[4]), *row[5:]) for row in self._db.execute(f"SELECT {', '.join(Entry.__dataclass_fields__)} FROM requests ORDER BY id")]

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
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
