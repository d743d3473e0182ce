"""`vramsupply earnings` and the report behind it: the window, totals that match the database, a
table and chart that fit the terminal, and rows it cannot count said apart."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import run_cli
from test_ledger import DAY, NOW, absurd, entry, fill_ledger

from vramsupply.ledger import LedgerError, LedgerStore, default_ledger_path, earned_nanocents, gross_nanocents
from vramsupply.ledger.report import earnings_report, parse_since


def test_since_accepts_hours_and_days_and_refuses_anything_else() -> None:
    assert parse_since("24h").total_seconds() == DAY
    assert parse_since("7d").days == 7 and parse_since("30D").days == 30
    for bad in ("", "0d", "7", "1w", "-1d", "99999d"):
        with pytest.raises(LedgerError, match="--since"):
            parse_since(bad)


def test_a_report_counts_the_window_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = LedgerStore(path)
    store.add([entry(NOW - 2 * DAY), entry(NOW - 3600, "b/model", completion=7), entry(NOW - 600, source="local")])
    store.close()
    day = earnings_report(path, "24h", now=NOW).as_json()
    assert (day["requests"], day["local_requests"], day["completion_tokens"]) == (2, 1, 57)
    assert day["gross_nanocents"] == gross_nanocents(100, 7, 100, 200)
    week = earnings_report(path, "7d", now=NOW).as_json()
    assert week["requests"] == 3
    assert [m["model"] for m in week["by_model"]] == ["b/model", "org/model"]
    assert [d["day"] for d in week["by_day"]] == ["2025-12-30", "2025-12-31"]


def test_no_ledger_yet_reports_nothing_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    report = earnings_report(path, "7d")
    assert report.total.requests == 0 and not path.exists()


def test_earnings_json_matches_the_database(isolated_env: Path) -> None:
    rows = fill_ledger(time.time())
    result = run_cli("earnings", "--since", "30d", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout, parse_float=Decimal)

    store = LedgerStore(default_ledger_path())
    db = store._db
    sums = db.execute("SELECT count(*), sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), sum(gross_nanocents), sum(earned_nanocents) FROM requests").fetchone()
    store.close()
    assert (report["requests"], report["prompt_tokens"], report["cached_tokens"], report["completion_tokens"],
            report["gross_nanocents"], report["earned_nanocents"]) == sums
    assert report["gross_cents"] == Decimal(sums[4]) / 10**9 and report["earned_cents"] == Decimal(sums[5]) / 10**9
    assert report["earned_nanocents"] * 100 == report["gross_nanocents"] * 95
    assert report["cut_requests"] == sum(not r.complete for r in rows)
    assert report["local_requests"] == sum(r.source == "local" for r in rows)
    assert sum(m["requests"] for m in report["by_model"]) == sum(d["requests"] for d in report["by_day"]) == 60
    assert sum(d["earned_nanocents"] for d in report["by_day"]) == sums[5]
    assert set(report) >= {"since", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "gross_cents", "earned_cents", "by_model", "by_day"}


@pytest.mark.parametrize("by", ["model", "day"])
def test_earnings_table_and_chart_fit_80_columns(isolated_env: Path, by: str) -> None:
    fill_ledger(time.time())
    result = run_cli("earnings", "--since", "7d", "--by", by, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert "total" in result.stdout and "Earned per day" in result.stdout and "█" in result.stdout
    if by == "model":
        assert "qwen/qwen3.5-9b" in result.stdout


def test_a_window_longer_than_the_chart_says_which_days_it_shows(isolated_env: Path) -> None:
    """The chart shows a month; a 90-day window's first two months were left out without a word."""
    fill_ledger(time.time())
    result = run_cli("earnings", "--since", "90d", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "Earned per day (95 % of gross): the last 31 of 91 days (the table covers them all)" in " ".join(result.stdout.split())
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_earnings_with_an_empty_ledger_and_bad_flags(isolated_env: Path) -> None:
    empty = run_cli("earnings")
    assert empty.returncode == 0 and "No requests recorded in the last 30d" in empty.stdout
    bad = run_cli("earnings", "--since", "a week")
    assert bad.returncode == 2 and "--since 'a week' is not a window" in bad.stderr and "Traceback" not in bad.stderr
    bad_by = run_cli("earnings", "--by", "hour")
    assert bad_by.returncode == 2 and "choose model or day" in bad_by.stderr


def test_sums_past_what_sqlite_can_add_stay_exact(isolated_env: Path) -> None:
    huge, now = 2**62 + 12345, time.time()
    store = LedgerStore(default_ledger_path())
    store.add([absurd(now - 60 * i, huge, f"r{i}") for i in range(4)])
    store.close()

    result = run_cli("earnings", "--json")
    table = run_cli("earnings", "--by", "day")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout, parse_float=Decimal)
    assert report["gross_nanocents"] == 4 * huge and report["earned_nanocents"] == 4 * earned_nanocents(huge)
    assert report["gross_cents"] == Decimal(4 * huge) / 10**9
    assert table.returncode == 0 and "Traceback" not in table.stderr


def test_rows_stamped_after_now_are_in_no_window_and_are_counted_apart(isolated_env: Path) -> None:
    now = time.time()
    store = LedgerStore(default_ledger_path())
    # an hour ago; tomorrow (the clock was a day ahead, then set right); past year 9999 (a clock gone wild)
    store.add([entry(now - 3600), entry(now + DAY), entry(1e12)])
    store.close()

    as_json = run_cli("earnings", "--json")
    by_day = run_cli("earnings", "--by", "day", env={"COLUMNS": "200"})

    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert (report["requests"], report["later_requests"]) == (1, 2)
    assert [d["day"] for d in report["by_day"]] == [time.strftime("%Y-%m-%d", time.gmtime(now - 3600))]
    assert by_day.returncode == 0 and "Traceback" not in by_day.stderr
    assert "2 request(s) recorded with a time after now (the clock went back?) are not counted" in by_day.stdout


def test_names_from_outside_are_shown_as_written_not_obeyed(isolated_env: Path) -> None:
    """A model name with rich markup or terminal escapes in it: earnings crashed on "[/x]", and
    an ESC sequence reached the terminal; config show crashed on a setting holding "[/docs]"."""
    store = LedgerStore(default_ledger_path())
    store.add([entry(time.time() - 60, "acme/x[/x]\x1b[2J")])
    store.close()
    earnings = run_cli("earnings", "--by", "model", env={"COLUMNS": "200"})
    assert earnings.returncode == 0, earnings.stderr
    assert "acme/x[/x]\\x1b[2J" in earnings.stdout and "\x1b" not in earnings.stdout

    shown = run_cli("config", "show", env={"COLUMNS": "200", "VRAM_SUPPLY_MODEL": "acme/x[/docs]\x1b]0;title\x07"})
    assert shown.returncode == 0, shown.stderr
    assert "acme/x[/docs]\\x1b]0;title\\x07" in shown.stdout and "\x1b" not in shown.stdout


def test_a_window_past_the_limit_says_the_limit_however_many_digits() -> None:
    """100000d was "not a window" (the pattern took four digits at most), without the limit."""
    for long in ("3661d", "100000d", "999999999999h", "87841h"):
        with pytest.raises(LedgerError, match=r"is too long: at most 3660 days"):
            parse_since(long)
    assert parse_since("87840h").days == 3660 and parse_since("3660d").days == 3660
