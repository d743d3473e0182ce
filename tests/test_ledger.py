"""The earnings ledger on its own: exact money, the SQLite file, roll-ups, and the writer that records each request."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from vramsupply.ledger import Entry, LedgerError, LedgerStore, LedgerWriter, cents, default_ledger_path, earned_nanocents, gross_nanocents
from vramsupply.ledger.money import dollars_text
from vramsupply.ledger import recorder as recorder_module
from vramsupply.ledger.recorder import LedgerRecorder, open_recorder
from vramsupply.server.accounting import FinishedRequest

DAY = 86400.0
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def entry(finished_at: float, model: str = "org/model", *, prompt: int = 100, cached: int = 0, completion: int = 50,
          source: str = "platform", complete: bool = True, prices: tuple[int, int] = (100, 200)) -> Entry:
    gross = gross_nanocents(prompt, completion, *prices) if source == "platform" else 0
    return Entry(finished_at, f"chatcmpl-{finished_at}", model, source, complete, 1, prompt, cached, completion, *prices, gross, earned_nanocents(gross))


def fill_ledger(now: float) -> list[Entry]:
    rows = []
    for i in range(60):
        model = ("qwen/qwen3.5-9b", "meta-llama/llama-3.1-8b-instruct-with-a-very-long-name")[i % 2]
        rows.append(entry(now - i * 7200, model, prompt=1000 + 17 * i, cached=i * 3, completion=300 + i, complete=i % 7 != 0,
                          source="local" if i % 11 == 0 else "platform", prices=(100 + i % 3, 200)))
    store = LedgerStore(default_ledger_path())
    store.add(rows)
    store.close()
    return rows


def test_money_is_exact_integers_of_nanocents() -> None:
    # 1,000 prompt tokens at 100 ¢/M and 500 completion tokens at 200 ¢/M: 0.1 ¢ + 0.1 ¢ = 0.2 ¢
    gross = gross_nanocents(1000, 500, 100, 200)
    assert gross == 200_000_000
    assert earned_nanocents(gross) == 190_000_000
    assert cents(gross) == Decimal("0.2") and cents(earned_nanocents(gross)) == Decimal("0.19")
    # one token at 1 ¢/M is a micro-cent, and 95 % of it is still a whole number of nanocents
    assert gross_nanocents(1, 0, 1, 0) == 1000 and earned_nanocents(1000) == 950
    assert cents(950) == Decimal("0.00000095")
    assert cents(12 * 10**9) == Decimal("12")
    assert dollars_text(123_456 * 10**9) == "$1,234.56"
    assert dollars_text(190_000_000) == "$0.0019"
    assert dollars_text(0) == "$0.00"
    assert dollars_text(1_000_500_000) == "$0.01001"  # $0.010005: a half rounds up (it was rounded to even: $0.01)
    assert dollars_text(1_234_500_000_000) == "$12.35"  # $12.345


def test_the_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "data" / "ledger.sqlite3"
    store = LedgerStore(path)
    store.add([entry(NOW)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_the_ledger_lives_in_the_data_dir(isolated_env: Path) -> None:
    assert default_ledger_path() == isolated_env / ".local" / "share" / "vramsupply" / "ledger.sqlite3"


def test_a_ledger_that_cannot_be_created_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LedgerError, match="cannot open the earnings ledger"):
        LedgerStore(blocker / "ledger.sqlite3")


def test_old_rows_roll_up_into_daily_totals_without_changing_any_sum(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    rows = [entry(NOW - 20 * DAY + i * 3600, prompt=10 + i, completion=i, cached=i % 3, complete=i % 5 != 0) for i in range(48)]
    rows += [entry(NOW - 20 * DAY, "other/model", source="local"), entry(NOW - 3600)]
    store.add(rows)
    before = store.groups(NOW - 30 * DAY)

    folded = store.roll_up(now=NOW)

    assert folded == 49  # all but the row of the last hour are older than 8 days
    assert len(store.entries()) == 1
    assert store.groups(NOW - 30 * DAY) == before  # per day, model and source: identical totals
    daily = store._db.execute("SELECT count(*) FROM daily").fetchone()[0]
    assert daily == 3  # two days of org/model, one of other/model
    store.add([entry(NOW - 19 * DAY)])  # a late row for a day already rolled up is added to it
    store.roll_up(now=NOW)
    assert store._db.execute("SELECT requests FROM daily WHERE day = '2025-12-13' AND model = 'org/model'").fetchone()[0] == 24 + 1
    store.close()


def test_only_rows_old_by_their_own_time_roll_up_whatever_order_they_were_written_in(tmp_path: Path) -> None:
    """A row dated 12 days ago written after newer ones (a clock set right again) folded every row
    written before it, yesterday's, today's and one dated after now, into daily totals: a 24 h
    window then counted all of yesterday, and the row in the future too."""
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    store.add([entry(NOW - 36 * 3600), entry(NOW - 3600), entry(NOW + 600), entry(NOW - 12 * DAY)])

    assert store.roll_up(now=NOW) == 1
    assert [row.finished_at for row in store.entries()] == [NOW - 36 * 3600, NOW - 3600, NOW + 600]
    assert sum(g.requests for g in store.groups(NOW - DAY, NOW)) == 1 and store.later(NOW) == 1
    store.close()


def test_the_row_count_is_bounded(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    store.add([entry(NOW - i) for i in range(100)])
    assert store.roll_up(now=NOW, max_rows=30) == 70
    assert len(store.entries()) == 30
    total = sum(g.requests for g in store.groups(0))
    assert total == 100
    store.close()


async def test_the_writer_commits_before_the_future_resolves(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter.open(path)
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    finished = [FinishedRequest(f"cmpl-{i}", "org/model", 1, 10, 2, 5, True, True) for i in range(20)]
    await asyncio.gather(*(recorder.record(f) for f in finished))
    reader = LedgerStore(path)  # a second connection, as `vramsupply earnings` has, sees every row already
    assert [e.request_id for e in reader.entries()] == [f"cmpl-{i}" for i in range(20)]
    assert all(e.gross_nanocents == (10 * 100 + 5 * 200) * 1000 for e in reader.entries())
    reader.close()
    writer.close()


async def test_requests_without_a_registered_endpoint_token_are_local_and_earn_nothing(tmp_path: Path) -> None:
    writer = LedgerWriter.open(tmp_path / "ledger.sqlite3")
    selling = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    not_selling = LedgerRecorder(writer, input_price=100, output_price=200, selling=False)
    with_token = FinishedRequest("a", "m", 1, 10, 0, 5, True, True)
    without_token = FinishedRequest("b", "m", 1, 10, 0, 5, True, False)
    assert selling.entry(with_token).source == "platform" and selling.entry(with_token).gross_nanocents == 2_000_000
    for recorder, finished in ((selling, without_token), (not_selling, with_token)):
        local = recorder.entry(finished)
        assert (local.source, local.gross_nanocents, local.earned_nanocents) == ("local", 0, 0)
        assert (local.input_price, local.output_price) == (100, 200)
    writer.close()


async def test_a_failing_disk_is_logged_once_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = LedgerWriter.open(tmp_path / "ledger.sqlite3")
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    writer.store._db.execute("DROP TABLE requests")  # every insert now fails
    for i in range(3):
        await recorder.record(FinishedRequest(f"r{i}", "m", 1, 1, 0, 1, True, True))
    assert sum("not recorded until it can write" in r.getMessage() for r in caplog.records) == 1
    writer.close()


async def test_a_ledger_that_cannot_be_written_is_reported_until_a_write_succeeds_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vramsupply.ledger")
    path = tmp_path / "ledger.sqlite3"

    def outside(statement: str) -> None:
        """Another program changes the file, on a connection of its own (on the writer's own, the
        statement joined whatever transaction the writer thread had open, and its rollback undid it)."""
        other = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            other.execute(statement)
        finally:
            other.close()

    writer = LedgerWriter(LedgerStore(path), retry_every=0)  # every request tries the held rows again
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    await recorder.record(FinishedRequest("before", "m", 1, 1, 0, 1, True, True))
    assert recorder.failure is None
    outside("ALTER TABLE requests RENAME TO moved")  # every insert now fails

    for i in range(2):
        await recorder.record(FinishedRequest(f"held{i}", "m", 1, 1, 0, 1, True, True))
    failing = recorder.failure  # what /health shows, as "degraded"
    outside("ALTER TABLE moved RENAME TO requests")  # fixed: the next write goes through
    await recorder.record(FinishedRequest("after", "m", 1, 1, 0, 1, True, True))

    assert failing == (
        f"the earnings ledger {path} cannot be written: no such table: requests; check the file and the disk it is on; "
        "2 requests served since are not recorded yet: held in memory, written by themselves once it can write "
        "(stopping the agent before then loses them)"
    )
    assert recorder.failure is None
    assert sum(f"the earnings ledger {path} is written again" in r.getMessage() for r in caplog.records) == 1
    assert [e.request_id for e in LedgerStore(path).entries()] == ["before", "held0", "held1", "after"]
    writer.close()


async def test_a_ledger_that_cannot_be_opened_holds_the_rows_says_why_and_opens_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It was reported for the whole run and its requests lost until a restart, which under systemd
    nobody does: now they are held, and written once the provider moves the directory away."""
    monkeypatch.setattr(recorder_module, "REOPEN_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="vramsupply.ledger")
    path = tmp_path / "ledger.sqlite3"
    path.mkdir()
    recorder = open_recorder(path, input_price=100, output_price=200, selling=True)
    await recorder.record(FinishedRequest("r1", "m", 1, 1, 0, 1, True, True))
    assert recorder.failure == (
        f"cannot open the earnings ledger {path}: Is a directory; move that directory out of the way; "
        "the agent tries again every 0 s while requests come (a restart tries at once), and until then requests are served and held in memory; "
        "1 request not recorded so far"
    )
    assert not any(path.iterdir())
    path.rmdir()  # the provider moves it away
    await recorder.record(FinishedRequest("r2", "m", 1, 1, 0, 1, True, True))
    assert recorder.failure is None
    await recorder.record(FinishedRequest("r3", "m", 1, 1, 0, 1, True, True))
    recorder.close()
    assert [(e.request_id, e.gross_nanocents > 0) for e in LedgerStore(path).entries()] == [("r1", True), ("r2", True), ("r3", True)]
    assert f"the earnings ledger {path} is open now: 2 requests held in memory recorded" in caplog.text


class HeldWriteLock:
    """Another program (a backup tool, `sqlite3` in a shell) holding the ledger's write lock: commits wait."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> HeldWriteLock:
        self._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._db.execute("COMMIT")
        self._db.close()


async def test_a_buyer_who_hangs_up_while_the_commit_waits_still_gets_a_row_and_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(LedgerStore(path), lock_wait=60)  # the commit waits for the lock as long as the test holds it
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)
    with HeldWriteLock(path):
        first = asyncio.create_task(recorder.record(FinishedRequest("r-first", "m", 1, 10, 0, 5, True, True)))
        for _ in range(200):  # until the writer took it (and waits for the lock)
            await asyncio.sleep(0.05)
            if writer._queue.empty():
                break
        queued = writer.submit(recorder.entry(FinishedRequest("r-queued", "m", 1, 10, 0, 5, True, True)))
        left = asyncio.create_task(recorder.record(FinishedRequest("r-left", "m", 1, 10, 0, 5, True, True)))
        await asyncio.sleep(0.1)
        first.cancel()  # this buyer hangs up while its row is being committed
        left.cancel()  # and this one while its row still waits in the queue
        assert queued.cancel(), "a row still waiting in the queue can be cancelled by its caller"
    await asyncio.wait_for(recorder.record(FinishedRequest("r-after", "m", 1, 10, 0, 5, True, True)), 15)

    assert [e.request_id for e in LedgerStore(path).entries()] == ["r-first", "r-queued", "r-left", "r-after"]
    assert writer.failure is None
    writer.close()


async def test_a_row_the_file_cannot_hold_fails_alone_and_the_writer_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.sqlite3"
    now = time.time()  # recent: the writer's first roll-up folds rows older than 8 days into daily totals
    writer = LedgerWriter.open(path)
    with HeldWriteLock(path):  # so the three rows are written in one batch
        await asyncio.sleep(0.2)
        futures = [writer.submit(entry(now + i)) for i in range(3)]
        futures.insert(1, writer.submit(replace(entry(now + 9), request_id="too-big", gross_nanocents=2**70)))
    results = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True), 15)

    assert [type(r).__name__ for r in results] == ["NoneType", "LedgerError", "NoneType", "NoneType"]
    assert "too-big" in str(results[1])
    assert [e.finished_at for e in LedgerStore(path).entries()] == [now, now + 1, now + 2]
    assert any("too-big" in r.getMessage() and r.exc_info for r in caplog.records), "logged with its traceback"
    await asyncio.wait_for(asyncio.wrap_future(writer.submit(entry(now + 5))), 15)
    assert writer.failure is None
    writer.close()


async def test_a_row_the_file_cannot_hold_written_alone_is_named_not_blamed_on_the_disk(tmp_path: Path) -> None:
    """A batch of one such row said "the earnings ledger cannot be written ... check the file and the
    disk it is on", where the disk was fine and the row was at fault; the writer goes on."""
    writer = LedgerWriter.open(tmp_path / "ledger.sqlite3")
    now = time.time()
    bad = writer.submit(replace(entry(now), request_id="too-big", gross_nanocents=2**70))
    with pytest.raises(LedgerError, match="cannot write request too-big"):
        await asyncio.wait_for(asyncio.wrap_future(bad), 15)
    await asyncio.wait_for(asyncio.wrap_future(writer.submit(entry(now + 1))), 15)
    assert writer.failure is None and [e.finished_at for e in LedgerStore(writer.store.path).entries()] == [now + 1]
    writer.close()


class WriterBug(BaseException):
    """Something no batch guard catches: the writer thread ends."""


async def test_if_the_writer_thread_dies_nobody_waits_and_it_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = LedgerWriter.open(tmp_path / "ledger.sqlite3")
    recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=True)

    def broken(entries: object) -> None:
        raise WriterBug("simulated")

    writer.store.add = broken  # type: ignore[method-assign]
    for i in range(3):  # neither the row in hand nor later ones wait
        await asyncio.wait_for(recorder.record(FinishedRequest(f"r{i}", "m", 1, 1, 0, 1, True, True)), 5)

    assert recorder.failure is not None and "the earnings ledger writer stopped (WriterBug: simulated)" in recorder.failure
    assert sum("not recorded until it can write" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(LedgerError, match="writer stopped"):
        writer.submit(entry(NOW)).result(timeout=1)
    writer.close()


def absurd(finished_at: float, gross: int, request_id: str) -> Entry:
    """A row written before prices had a ceiling: one request worth ``gross`` nanocents."""
    return replace(entry(finished_at), request_id=request_id, gross_nanocents=gross, earned_nanocents=earned_nanocents(gross))


def test_a_roll_up_that_would_overflow_is_undone_and_the_rows_stay_raw(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    store.add([absurd(NOW - 20 * DAY, 2**61, "a"), absurd(NOW - 20 * DAY + 1, 2**61, "b")])
    assert store.roll_up(now=NOW) == 2  # the day's total is 2**62: still an exact integer
    store.add([absurd(NOW - 20 * DAY + 2, 2**61, "c"), absurd(NOW - 20 * DAY + 3, 2**61, "d")])

    with pytest.raises(sqlite3.IntegrityError):  # 2**62 more would pass 2**63: the writer logs it and goes on
        store.roll_up(now=NOW)

    assert [e.request_id for e in store.entries()] == ["c", "d"]
    assert [g.gross_nanocents for g in store.groups(NOW - 30 * DAY)] == [2**63]
    store.close()


def test_rows_beyond_the_calendar_still_roll_up(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite3")
    store.add([entry(NOW - 3600), entry(1e12), entry(-1e12)])

    assert store.roll_up(now=NOW, max_rows=0) == 3

    assert [(g.day, g.requests) for g in store.groups(NOW - DAY, until=NOW)] == [("2025-12-31", 1)]
    assert store.later(NOW) == 1
    store.close()


async def test_rows_held_for_a_ledger_that_could_not_be_opened_are_written_at_stop_once_it_can_be(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening was tried again only at a request: a provider who freed the path and then stopped
    (or restarted, as the warning says) lost every row held meanwhile."""
    caplog.set_level(logging.INFO, logger="vramsupply.ledger")
    path = tmp_path / "ledger.sqlite3"
    path.mkdir()
    recorder = open_recorder(path, input_price=100, output_price=200, selling=True)
    for request_id in ("r1", "r2"):
        await recorder.record(FinishedRequest(request_id, "m", 1, 1, 0, 1, True, True))
    path.rmdir()  # freed, and no request comes before the stop
    recorder.close()
    assert [e.request_id for e in LedgerStore(path).entries()] == ["r1", "r2"]
    assert "are not recorded" not in caplog.text


def test_a_wal_file_that_is_a_directory_is_named_not_the_permissions(tmp_path: Path) -> None:
    """SQLite says "unable to open database file", and the advice was to make the ledger writable."""
    path = tmp_path / "ledger.sqlite3"
    LedgerStore(path).close()
    Path(f"{path}-wal").mkdir()
    with pytest.raises(LedgerError) as raised:
        LedgerStore(path)
    assert str(raised.value).endswith(f"; {path}-wal is not a file: move it out of the way"), raised.value
