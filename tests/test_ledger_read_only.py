"""`vramsupply earnings` and `status` read a ledger this user may not write.

A provider checks earnings from a backup, or from a monitoring container that mounts the agent's
data dir read-only, or as a user who may read the agent's ledger but not write it. Both commands
opened the ledger as the agent does, creating it, setting WAL mode and bringing its schema up to
date, and stopped with "Read-only file system" without showing any numbers. They now read it as it
is. A ledger of an older schema, which they cannot bring up to date there, is one line and exit 1.

The test machines run as root, whom permission bits do not stop: the data dir is made read-only
with a bind mount in a user and mount namespace of the command's own (``read_only``), and a user
who may only read with a user namespace that maps no one, where root's files are the command's
own but it may not override their permission bits (``without_privileges``).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from test_ledger import entry, fill_ledger
from test_ledger_unpaid import SCHEMA_1

from vramsupply.ledger import LedgerStore, default_ledger_path

CANNOT_REMOUNT = 97


def read_only(folder: Path) -> list[str]:
    """The command line that runs `vramsupply` with ``folder`` mounted read-only."""
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" || exit {CANNOT_REMOUNT}\nexec "{sys.executable}" -m vramsupply "$@"\n'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]


def without_privileges() -> list[str]:
    """The command line that runs `vramsupply` held to permission bits (no CAP_DAC_OVERRIDE)."""
    return ["unshare", "--user", sys.executable, "-m", "vramsupply"]


def run_as(program: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vramsupply ARGS` run by ``program``, as conftest's ``run_cli`` runs it; skips where this machine cannot."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    result = subprocess.run([*program, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=120)
    if result.returncode == CANNOT_REMOUNT or "unshare: " in result.stderr:
        pytest.skip(f"this machine cannot run a command in a user namespace of its own: {result.stderr.strip()}")
    return result


def sidecars(ledger: Path) -> list[str]:
    return sorted(p.name for p in ledger.parent.iterdir() if p.name != ledger.name)


@pytest.mark.parametrize("agent", ["stopped", "serving"])
def test_earnings_and_status_show_the_numbers_of_a_ledger_on_a_read_only_mount(agent: str) -> None:
    """Stopped: the agent folded its -wal into the file and removed it. Serving: it writes on, and
    the read-only view sees its -wal and -shm, its latest rows only in the -wal."""
    now = time.time()
    rows = fill_ledger(now)
    ledger = default_ledger_path()
    writer = LedgerStore(ledger) if agent == "serving" else None
    if writer is not None:
        writer.add([entry(now - 30, "qwen/qwen3.5-9b")])  # in the -wal: the agent keeps it open
    try:
        report = run_as(read_only(ledger.parent), "earnings", "--since", "30d", "--json")
        table = run_as(read_only(ledger.parent), "earnings", "--since", "7d")
        status = run_as(read_only(ledger.parent), "status", "--json")
    finally:
        if writer is not None:
            writer.close()

    recorded = len(rows) + (writer is not None)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout, parse_float=Decimal)["requests"] == recorded
    assert table.returncode == 0 and "Earned per day" in table.stdout and "qwen/qwen3.5-9b" in table.stdout, table.stderr
    earnings = json.loads(status.stdout)["earnings"]
    assert earnings["ledger_error"] is None and earnings["last_24h"]["requests"] == 12 + (writer is not None)
    assert "Traceback" not in report.stderr + table.stderr + status.stderr


def test_an_older_ledger_on_a_read_only_mount_is_one_line_and_exit_1_and_stays_as_it_was() -> None:
    ledger = default_ledger_path()
    ledger.parent.mkdir(parents=True)
    old = sqlite3.connect(ledger)
    old.executescript(SCHEMA_1)
    old.close()

    earnings = run_as(read_only(ledger.parent), "earnings")
    status = run_as(read_only(ledger.parent), "status", "--json")

    assert earnings.returncode == 1 and earnings.stdout == ""
    assert earnings.stderr.strip() == (
        f"error: the earnings ledger {ledger} is of an older vramsupply (schema 1; this one reads 3) and cannot be brought up to "
        "date here, as this user may not write it (a read-only mount, or another user's file): run `vramsupply earnings` once as "
        "the user the agent runs as, where it can be written, or start the agent on it"
    )
    day = json.loads(status.stdout)["earnings"]
    assert day["last_24h"] is None and "is of an older vramsupply (schema 1" in day["ledger_error"], "status goes on, its exit code unchanged"
    assert status.returncode == 1 and "Traceback" not in earnings.stderr + status.stderr
    assert sqlite3.connect(ledger).execute("PRAGMA user_version").fetchone() == (1,)


def test_earnings_reads_a_ledger_this_user_may_read_but_not_write_and_leaves_nothing_beside_it() -> None:
    """A ledger file of the agent's that this user may only read (a shared group, a backup copy), in
    a folder it may write: SQLite's mode=ro would leave a -wal and -shm of the reader's own there."""
    rows = fill_ledger(time.time())
    ledger = default_ledger_path()
    ledger.chmod(0o400)

    report = run_as(without_privileges(), "earnings", "--json")

    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["requests"] == len(rows)
    assert sidecars(ledger) == [], "nothing beside it that the agent's user might not be able to write"


def test_a_ledger_an_agent_killed_left_a_shm_beside_but_no_wal_is_read_on_a_read_only_mount() -> None:
    """Every row is in the file then; SQLite's mode=ro would need to rebuild the -shm it cannot write."""
    rows = fill_ledger(time.time())
    ledger = default_ledger_path()
    Path(f"{ledger}-shm").write_bytes(bytes(32768))

    report = run_as(read_only(ledger.parent), "earnings", "--json")

    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["requests"] == len(rows)


def test_a_ledger_this_user_may_not_read_is_one_line_that_says_so() -> None:
    fill_ledger(time.time())
    ledger = default_ledger_path()
    ledger.chmod(0o000)

    report = run_as(without_privileges(), "earnings")

    assert report.returncode == 1 and report.stdout == ""
    assert report.stderr.strip() == (
        f"error: cannot read the earnings ledger {ledger}: Permission denied; run the command as the user the agent runs as"
    )
