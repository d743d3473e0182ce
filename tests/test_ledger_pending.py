"""Requests served while the earnings ledger cannot be written are held, not lost.

A fault review filled the disk under a serving agent: of 9 requests served while the ledger could
not write, 6 were never recorded anywhere, and nothing counted them. Now the rows the file cannot
take are held in memory, in order, and written once it takes writes again, by the next request or
by a timer; `/health` says how many wait meanwhile; stopping makes a last try and logs, in one
line, how many requests' earnings are lost if even that fails.

The full disk is a real one, as in `test_ledger_health.py`: a 512 KiB tmpfs over the agent's data
dir, in a mount namespace of its own. The in-process tests break the file the way
`test_ledger.py` does: another program renames the table away, and back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from agent_process import AgentProcess
from test_ledger import NOW, entry
from test_ledger_health import agent_on_a_small_disk, buy, can_mount_a_tmpfs, health, ledger_copy, logged
from test_untested_paths import fill_up

from vramsupply.ledger import LedgerStore, LedgerWriter, default_ledger_path, open_recorder
from vramsupply.ledger.recorder import LedgerRecorder
from vramsupply.server.accounting import FinishedRequest


def served(request_id: str) -> FinishedRequest:
    return FinishedRequest(request_id, "org/model", 1, 10, 0, 5, True, True)


def outside(path: Path, statement: str) -> None:
    """Another program changes the ledger file, on a connection of its own."""
    other = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        other.execute(statement)
    finally:
        other.close()


def small_disk(data: Path) -> None:
    data.mkdir(parents=True)
    if not can_mount_a_tmpfs(data):
        pytest.skip("this machine cannot mount a tmpfs in a user and mount namespace of the test's own")


def data_dir_of(agent: AgentProcess, data: Path) -> Path:
    """The agent's data dir (its tmpfs), seen from outside its mount namespace."""
    return Path(f"/proc/{agent.process.pid}/root") / str(data).lstrip("/")


def test_requests_served_on_a_full_disk_are_written_in_order_once_it_has_room(tmp_path: Path) -> None:
    data = default_ledger_path().parent
    small_disk(data)
    with agent_on_a_small_disk(data) as agent:
        agent.wait_ready()
        seen = data_dir_of(agent, data)
        first = buy(agent)

        fill_up(seen)
        while_full = [buy(agent) for _ in range(3)]
        full = health(agent)

        os.unlink(seen / "filler")  # the provider frees space, and no buyer comes for a while
        agent.wait_for(lambda: health(agent)["status"] == "ok", "the held rows written without a new request")
        after = health(agent)
        last = buy(agent)
        rows = [e.request_id for e in ledger_copy(seen, tmp_path)]
        assert agent.stop() == 0

    assert full["status"] == "degraded"
    assert full["warnings"] == [
        f"the earnings ledger {default_ledger_path()} cannot be written: database or disk is full; free space on its disk; "
        "3 requests served since are not recorded yet: held in memory, written by themselves once it can write "
        "(stopping the agent before then loses them)"
    ]
    assert not after.get("warnings")
    assert rows == [first, *while_full, last], "every request, in the order served, each once"
    assert logged(agent, "database or disk is full") == 1, "logged once, not per request or per try"
    assert logged(agent, f"the earnings ledger {default_ledger_path()} is written again: the 3 requests held in memory are recorded") == 1
    assert logged(agent, "are lost") == 0


def test_buyers_arriving_faster_than_the_retries_do_not_put_them_off(tmp_path: Path) -> None:
    data = default_ledger_path().parent
    small_disk(data)
    with agent_on_a_small_disk(data) as agent:
        agent.wait_ready()
        seen = data_dir_of(agent, data)
        fill_up(seen)
        while_full = [buy(agent) for _ in range(2)]

        os.unlink(seen / "filler")
        after: list[str] = []
        agent.wait_for(lambda: after.append(buy(agent)) or health(agent)["status"] == "ok", "the held rows written under steady traffic")
        rows = [e.request_id for e in ledger_copy(seen, tmp_path)]
        assert agent.stop() == 0

    assert rows == [*while_full, *after]


def test_stopping_while_the_disk_is_still_full_says_how_many_requests_were_not_recorded(tmp_path: Path) -> None:
    data = default_ledger_path().parent
    small_disk(data)
    with agent_on_a_small_disk(data) as agent:
        agent.wait_ready()
        seen = data_dir_of(agent, data)
        fill_up(seen)
        buy(agent)
        buy(agent)
        assert agent.stop() == 0

    lost = [line for line in agent.stderr if "are lost" in line]
    assert len(lost) == 1, agent.log
    assert "the earnings of 2 requests are lost, not in the earnings ledger: " in lost[0]
    assert "database or disk is full; free space on its disk; the agent stopped before it could write them" in lost[0]


async def test_stopping_makes_a_last_try_that_writes_the_held_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path), retry_every=3600)  # no timer, no retry on a new request: only the last try
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    await recorder.record(served("before"))
    outside(path, "ALTER TABLE requests RENAME TO moved")  # every insert now fails
    for i in range(3):
        await recorder.record(served(f"held{i}"))
    held = recorder.failure
    outside(path, "ALTER TABLE moved RENAME TO requests")
    await asyncio.to_thread(writer.close)

    assert held is not None and "3 requests served since are not recorded yet" in held
    assert [e.request_id for e in LedgerStore(path).entries()] == ["before", "held0", "held1", "held2"]
    assert not any("are lost" in r.getMessage() for r in caplog.records)


async def test_beyond_the_rows_it_holds_requests_are_counted_and_health_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vramsupply.ledger")
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path), max_held=3, retry_every=3600)
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    outside(path, "ALTER TABLE requests RENAME TO moved")
    for i in range(5):
        await recorder.record(served(f"r{i}"))
    over = recorder.failure
    await asyncio.to_thread(writer.close)  # the file still cannot be written

    assert over == (
        f"the earnings ledger {path} cannot be written: no such table: requests; check the file and the disk it is on; "
        "3 requests served since are not recorded yet: held in memory, written by themselves once it can write "
        "(stopping the agent before then loses them); 2 requests more were dropped beyond the 3 held: their earnings are not recorded"
    )
    lost = [r.getMessage() for r in caplog.records if "are lost" in r.getMessage()]
    assert lost == [
        f"the earnings of 5 requests are lost, not in the earnings ledger: the earnings ledger {path} cannot be written: "
        "no such table: requests; check the file and the disk it is on; the agent stopped before it could write them"
    ]


async def test_once_it_can_write_again_it_says_how_many_requests_were_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path), max_held=3, retry_every=0)
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    outside(path, "ALTER TABLE requests RENAME TO moved")
    for i in range(5):
        await recorder.record(served(f"r{i}"))
    outside(path, "ALTER TABLE moved RENAME TO requests")
    await recorder.record(served("after"))
    recovered = recorder.failure
    writer.close()

    assert recovered is None, "degraded no more: the ledger is written again"
    assert [e.request_id for e in LedgerStore(path).entries()] == ["r0", "r1", "r2", "after"]
    assert [r.getMessage() for r in caplog.records if "dropped beyond" in r.getMessage()] == [
        f"the earnings of 2 requests are not recorded: dropped beyond the 3 held in memory while the earnings ledger {path} could not be written"
    ]


async def test_a_held_row_tried_many_times_is_written_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vramsupply.ledger")
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path), retry_every=0)  # every new request tries the held rows again
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    outside(path, "ALTER TABLE requests RENAME TO moved")
    for i in range(4):
        await recorder.record(served(f"r{i}"))
    outside(path, "ALTER TABLE moved RENAME TO requests")
    await recorder.record(served("r4"))  # the next request writes them all
    recovered = recorder.failure
    writer.close()

    assert recovered is None
    assert [e.request_id for e in LedgerStore(path).entries()] == ["r0", "r1", "r2", "r3", "r4"]
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1, "logged once, not per try"
    assert sum(f"the earnings ledger {path} is written again" in r.getMessage() for r in caplog.records) == 1


def test_a_row_already_in_the_file_is_not_added_again_by_a_retry(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    row, other = entry(NOW), entry(NOW + 1)
    store.add([row])  # a commit SQLite reported as failed, that reached the file all the same
    store.add([row, other], once=True)
    assert store.entries() == [row, other]
    store.close()


async def test_stopping_an_agent_whose_ledger_never_opened_says_how_many_requests_it_missed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.mkdir()
    recorder = open_recorder(path, input_price=100, output_price=200, selling=True)
    for i in range(2):
        await recorder.record(served(f"r{i}"))
    recorder.close()
    assert [r.getMessage() for r in caplog.records if "not recorded:" in r.getMessage()] == [
        "the earnings of 2 requests served in this run are not recorded: the earnings ledger could not be opened"
    ]


async def test_a_held_row_the_file_can_never_take_is_said_and_health_is_not_left_degraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A review found it: retried alone by the timer, a held row that then failed for another
    reason than the disk was dropped without a word, and /health kept saying "degraded: 0
    requests not recorded". The store here fails as a full disk first, then as no disk does."""

    class FullThenBroken(LedgerStore):
        tries = 0

        def add(self, entries, *, once=False):  # type: ignore[no-untyped-def]
            FullThenBroken.tries += 1
            if FullThenBroken.tries == 1:
                raise sqlite3.OperationalError("database or disk is full")
            raise RuntimeError("a row no file can take")

    writer = LedgerWriter(FullThenBroken(tmp_path / "ledger.sqlite3"), retry_every=0.01)
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    await recorder.record(served("doomed"))
    assert recorder.failure is not None and "1 request served since is not recorded yet" in recorder.failure

    for _ in range(1000):  # the timer tries it again, alone
        if recorder.failure is None:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(writer.close)

    assert recorder.failure is None
    assert any("request doomed not written to the earnings ledger" in r.getMessage() for r in caplog.records)


async def test_a_ledger_another_program_holds_locked_puts_no_buyer_off_for_long(tmp_path: Path) -> None:
    """A write waited the connection's 10 s for the lock while the buyer waited for the commit: with
    a lock held for long, buyers' answers came 10 s late. Now the row is held as on a full disk."""
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path), retry_every=0.05)
    recorder = LedgerRecorder(writer, input_price=0, output_price=0, selling=False)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        await asyncio.wait_for(recorder.record(served("held")), 5)
        assert recorder.failure is not None and "database is locked" in recorder.failure
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await asyncio.wait_for(recorder.record(served("after")), 5)
    for _ in range(100):  # the held row is tried again by the writer's timer
        if recorder.failure is None:
            break
        await asyncio.sleep(0.05)
    writer.close()
    assert [e.request_id for e in LedgerStore(path).entries()] == ["held", "after"]


@pytest.mark.parametrize("how", ["deleted", "moved away"])
async def test_a_ledger_deleted_or_moved_away_while_serving_is_begun_anew_at_its_path(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A provider "resets" the agent by deleting its data dir, or moves the ledger aside by hand:
    every later request went on into the deleted (or moved) file, nobody told, /health ok."""
    path = tmp_path / "data" / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path))
    recorder = LedgerRecorder(writer, input_price=0, output_price=0, selling=False)
    await recorder.record(served("before"))
    if how == "deleted":
        shutil.rmtree(path.parent)
    else:
        for suffix in ("", "-wal", "-shm"):
            os.rename(f"{path}{suffix}", tmp_path / f"aside{suffix}")
    await recorder.record(served("after"))
    await recorder.record(served("later"))
    writer.close()
    assert recorder.failure is None
    assert [e.request_id for e in LedgerStore(path).entries()] == ["after", "later"]
    assert caplog.text.count("was deleted or moved away while the agent ran: later requests are recorded in a new one there") == 1
