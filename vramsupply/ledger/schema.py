"""The ledger's tables and the SQL that folds and sums them, apart from ``store.py``, which runs it.

Schema 3 adds the requests in flight (``in_flight``, see ``in_flight.py``) and, on finished rows,
``interrupted``: a request the agent was killed in the middle of (SIGKILL, the OOM killer, a power
cut), recorded from its row in flight by the next start or read as such by `earnings`. It is a
request that ended early (``complete`` 0) like any other, so it is in the ``cut_*`` sums too;
``interrupted_*`` tells it apart. A schema-2 ledger is brought to 3 in place (``MIGRATIONS``): its
rows are none of them interrupted, and its days rolled up count none.
"""

from __future__ import annotations

SCHEMA_VERSION = 3

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
    earned_nanocents INTEGER NOT NULL,
    interrupted INTEGER NOT NULL DEFAULT 0
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
    interrupted_requests INTEGER NOT NULL DEFAULT 0,
    interrupted_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    interrupted_completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model, source, input_price, output_price)
);
"""

IN_FLIGHT = """
CREATE TABLE IF NOT EXISTS in_flight (
    run TEXT NOT NULL,
    request_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    choices INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    input_price INTEGER NOT NULL,
    output_price INTEGER NOT NULL,
    PRIMARY KEY (run, request_id)
) WITHOUT ROWID;
"""
"""``run``: the agent process serving it (``in_flight.this_run``); ``updated_at``: when its tokens were last written."""

SUMMED = ("prompt_tokens", "cached_tokens", "completion_tokens", "gross_nanocents", "earned_nanocents")
CUT_SUMMED = ("cut_prompt_tokens", "cut_completion_tokens", "cut_gross_nanocents", "cut_earned_nanocents")
"""The sums of the requests that ended early alone: ``cut_X`` is ``X`` of the rows with ``complete`` 0."""
INTERRUPTED_SUMMED = ("interrupted_prompt_tokens", "interrupted_completion_tokens")
"""The sums of the interrupted requests alone: ``interrupted_X`` is ``X`` of the rows with ``interrupted`` 1."""
ALL_SUMMED = (*SUMMED, *CUT_SUMMED, *INTERRUPTED_SUMMED)
COUNTED = ("requests", "cut_requests", "untracked_cut_requests", "interrupted_requests")

MIGRATE_1_TO_2 = f"""
{"".join(f"ALTER TABLE daily ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0;" for c in (*CUT_SUMMED, "untracked_cut_requests"))}
UPDATE daily SET untracked_cut_requests = cut_requests;
"""
"""Days rolled up by schema 1 did not keep the split: their requests that ended early are untracked."""

MIGRATE_2_TO_3 = f"""
ALTER TABLE requests ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
{"".join(f"ALTER TABLE daily ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0;" for c in ("interrupted_requests", *INTERRUPTED_SUMMED))}
{IN_FLIGHT}
"""

MIGRATIONS = {0: SCHEMA + IN_FLIGHT, 1: MIGRATE_1_TO_2 + MIGRATE_2_TO_3, 2: MIGRATE_2_TO_3}
"""From each older version (0: a new file) to ``SCHEMA_VERSION``."""

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


def _part(column: str) -> str:
    """``cut_X`` (``interrupted_X``) of one raw row: ``X`` when it ended early (was interrupted), else 0."""
    if column.startswith("cut_"):
        return f"(1 - complete) * {column.removeprefix('cut_')}"
    return f"interrupted * {column.removeprefix('interrupted_')}"


PARTS = (*CUT_SUMMED, *INTERRUPTED_SUMMED)

ROLL_UP = f"""
INSERT INTO daily (day, model, source, input_price, output_price, requests, cut_requests, interrupted_requests, {", ".join(ALL_SUMMED)})
SELECT {DAY_OF_ROW}, model, source, input_price, output_price, count(*), sum(1 - complete), sum(interrupted),
       {", ".join(f"sum({c})" for c in SUMMED)}, {", ".join(f"sum({_part(c)})" for c in PARTS)}
FROM requests WHERE finished_at < :cutoff OR id <= :last_id
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (day, model, source, input_price, output_price) DO UPDATE SET
    {", ".join(_checked_add(c) for c in ("requests", "cut_requests", "interrupted_requests", *ALL_SUMMED))}
"""


def grouped(gone_runs: int) -> str:
    """Totals per day, model and source of the raw rows, the daily ones and the rows in flight of
    ``gone_runs`` runs that ended without finishing them (named ``:gone0`` …), read as interrupted."""
    runs = ", ".join(f":gone{i}" for i in range(gone_runs)) or "NULL"
    in_flight = ", ".join(
        ["1", "1", "0", "1", "prompt_tokens", "0", "completion_tokens", "0", "0", "prompt_tokens", "completion_tokens", "0", "0", "prompt_tokens", "completion_tokens"]
    )
    return f"""
SELECT day, model, source, {", ".join(f"sum({c})" for c in COUNTED)},
       {", ".join(f"sum({c} >> {HALF_BITS}), sum({c} & {2**HALF_BITS - 1})" for c in ALL_SUMMED)} FROM (
    SELECT date(finished_at, 'unixepoch') AS day, model, source, 1 AS requests, 1 - complete AS cut_requests,
           0 AS untracked_cut_requests, interrupted AS interrupted_requests, {", ".join(SUMMED)}, {", ".join(f"{_part(c)} AS {c}" for c in PARTS)}
    FROM requests WHERE finished_at >= :since AND finished_at <= :until
    UNION ALL
    SELECT day, model, source, {", ".join(COUNTED)}, {", ".join(ALL_SUMMED)} FROM daily
    WHERE day >= date(:since, 'unixepoch') AND day <= date(:until, 'unixepoch')
    UNION ALL
    SELECT date(updated_at, 'unixepoch'), model, source, {in_flight} FROM in_flight
    WHERE run IN ({runs}) AND updated_at >= :since AND updated_at <= :until
) GROUP BY day, model, source ORDER BY day, model, source
"""


LATER = """
SELECT (SELECT count(*) FROM requests WHERE finished_at > :until)
     + (SELECT coalesce(sum(requests), 0) FROM daily WHERE day > date(:until, 'unixepoch'))
"""
