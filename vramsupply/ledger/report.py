"""`vramsupply earnings`: totals over a window, by model and by UTC day, as JSON or a table and a bar chart.

Money in the JSON is exact: ``gross_cents``/``earned_cents`` are decimal numbers written digit for
digit (parse them with ``json.loads(..., parse_float=Decimal)`` to keep every digit), and
``gross_nanocents``/``earned_nanocents`` carry the same amounts as integers.

Requests that ended early (``cut_requests``: the buyer hung up, or the agent cut them at the drain
deadline or on an engine failure) are served but unpaid: their tokens are in the token totals and
apart in ``cut_prompt_tokens``/``cut_completion_tokens``, and no money of theirs is in the money
totals. Money is always summed as recorded, never priced again from tokens: rows written by
versions that still priced such requests keep that money, shown apart in ``cut_gross_*`` /
``cut_earned_*`` so it can be told from what buyers paid. Days rolled up by those versions hold no
such split (``untracked_cut_requests``: counted in the totals as if complete).

Requests interrupted (``interrupted_requests``: in flight when the agent was killed outright,
SIGKILL, the OOM killer, a power cut) are among those that ended early, with the tokens last
written for them (``in_flight.py`` says what is lost); ``interrupted_prompt_tokens`` /
``interrupted_completion_tokens`` tell them apart. Those the agent has in flight now are in no
total: ``in_flight_requests`` counts them.

A window ends now: rows stamped later (the clock was ahead, then set back) are not in it, as they
are in no day yet; the report counts them apart (``later_requests``) so they are not lost from view.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Group as RenderGroup
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from vramsupply.config import file_in_the_way, os_reason
from vramsupply.display import FitTable, plain
from vramsupply.ledger.in_flight import run_gone
from vramsupply.ledger.money import cents, dollars_text
from vramsupply.ledger.store import Group, LedgerError, LedgerStore

SINCE_PATTERN = re.compile(r"^\s*(\d{1,12})\s*([hd])\s*$", re.IGNORECASE)
MAX_SINCE_DAYS = 3660
BAR_WIDTH = 40


class By(str, Enum):
    model = "model"
    day = "day"


def parse_since(text: str) -> timedelta:
    """``24h``, ``7d``, ``30d`` (any number of hours or days): the window to report."""
    match = SINCE_PATTERN.match(text)
    if not match or int(match.group(1)) == 0:
        raise LedgerError(f"--since {text!r} is not a window: use a number of hours or days such as 24h, 7d or 30d")
    amount, unit = int(match.group(1)), match.group(2).lower()
    if (amount / 24 if unit == "h" else amount) > MAX_SINCE_DAYS:  # before timedelta, which overflows
        raise LedgerError(f"--since {text!r} is too long: at most {MAX_SINCE_DAYS} days")
    return timedelta(hours=amount) if unit == "h" else timedelta(days=amount)


@dataclass
class Totals:
    requests: int = 0
    cut_requests: int = 0
    untracked_cut_requests: int = 0
    local_requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    gross_nanocents: int = 0
    earned_nanocents: int = 0
    cut_prompt_tokens: int = 0
    cut_completion_tokens: int = 0
    cut_gross_nanocents: int = 0
    cut_earned_nanocents: int = 0
    interrupted_requests: int = 0
    interrupted_prompt_tokens: int = 0
    interrupted_completion_tokens: int = 0

    def add(self, group: Group) -> None:
        self.local_requests += group.requests if group.source == "local" else 0
        for name in (f.name for f in fields(self)):
            if name != "local_requests":
                setattr(self, name, getattr(self, name) + getattr(group, name))

    def as_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("gross", "earned", "cut_gross", "cut_earned"):
            values[f"{name}_cents"] = cents(values[f"{name}_nanocents"])
        return values


@dataclass
class Report:
    window: str
    since: datetime
    total: Totals = field(default_factory=Totals)
    by_model: dict[str, Totals] = field(default_factory=dict)
    by_day: dict[str, Totals] = field(default_factory=dict)
    later_requests: int = 0
    """Requests recorded with a time after now (the clock went back since): in no window yet."""
    in_flight_requests: int = 0
    """Requests a running agent serves now: in no total until they end."""

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(timespec="seconds"),
            "window": self.window,
            **self.total.as_json(),
            "later_requests": self.later_requests,
            "in_flight_requests": self.in_flight_requests,
            "by_model": [{"model": model, **totals.as_json()} for model, totals in sorted(self.by_model.items())],
            "by_day": [{"day": day, **totals.as_json()} for day, totals in sorted(self.by_day.items())],
        }

    def days(self, today: datetime) -> list[str]:
        """Every UTC day of the window, oldest first, for the chart (days without traffic included)."""
        first, last = self.since.date(), today.date()
        return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def earnings_report(path: Path, window_text: str, now: float | None = None) -> Report:
    """Totals from the ledger at ``path`` (an absent ledger reports nothing earned, and is not created)."""
    window = parse_since(window_text)
    now = time.time() if now is None else now
    since = now - window.total_seconds()
    report = Report(window_text.strip().lower(), datetime.fromtimestamp(since, timezone.utc))
    if not _recorded(path):
        blocking = file_in_the_way(path)
        if blocking is not None:  # not "no requests recorded": an agent could record none there
            raise LedgerError(f"cannot read the earnings ledger {path}: {blocking} is a file, not a directory")
        return report
    store = LedgerStore.for_reading(path)  # `earnings` and `status` write nothing where they may not (a read-only mount)
    try:
        runs = store.runs_in_flight()
        gone = tuple(run for run in runs if run_gone(run))  # killed: read as interrupted (the next start records them so)
        groups = store.groups(since, until=now, gone=gone)
        report.later_requests = store.later(now)
        report.in_flight_requests = sum(count for run, count in runs.items() if run not in gone)
    finally:
        store.close()
    for group in groups:
        report.total.add(group)
        report.by_model.setdefault(group.model, Totals()).add(group)
        report.by_day.setdefault(group.day, Totals()).add(group)
    return report


def _recorded(path: Path) -> bool:
    """Whether the ledger file is there; a folder on its way that this user may not enter is no
    "nothing earned", and `status` says it beside what it could read (it stopped with "Permission denied")."""
    try:
        return path.exists()
    except OSError as exc:
        raise LedgerError(f"cannot read the earnings ledger {path}: {os_reason(exc, path)}") from None


def dumps(value: Any) -> str:
    """JSON with every ``Decimal`` written as an exact number (the ``json`` module would need a float)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def render(report: Report, by: By, ledger: Path, now: float | None = None) -> RenderableType:
    """A table (by model or by day) and a bar chart of the earnings per UTC day, for 80 columns."""
    today = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    if not report.total.requests:
        return Text(f"No requests recorded in the last {report.window} (ledger: {ledger}).{_later_note(report, ' ')}")
    return RenderGroup(_table(report, by), Text(""), _Chart(report, today), _footnote(report, ledger))


def _table(report: Report, by: By) -> Table:
    table = FitTable(title=f"Earnings, last {report.window} (tokens; UTC days)", show_footer=True, title_justify="left")
    rows = sorted((report.by_model if by is By.model else report.by_day).items())
    table.add_column(by.value, footer="total", overflow="fold", min_width=15)
    t = report.total
    for name, footer in (("req", t.requests), ("prompt", t.prompt_tokens), ("cached", t.cached_tokens), ("output", t.completion_tokens)):
        table.add_column(name, justify="right", footer=f"{footer:,}")
    table.add_column("gross", justify="right", footer=dollars_text(t.gross_nanocents))
    table.add_column("earned", justify="right", footer=dollars_text(t.earned_nanocents), style="green")
    for name, totals in rows:
        table.add_row(
            plain(name), f"{totals.requests:,}", f"{totals.prompt_tokens:,}", f"{totals.cached_tokens:,}", f"{totals.completion_tokens:,}",
            dollars_text(totals.gross_nanocents), dollars_text(totals.earned_nanocents),
        )
    return table


CHART_DAYS = 31
"""The most days the chart shows, the newest: a bar a line, a month fits a screen."""


@dataclass(frozen=True)
class _Chart:
    """The bar chart, its bars as long as the terminal has room for (``BAR_WIDTH`` at most), so that
    each day, its bar and its amount stay on one line."""

    report: Report
    today: datetime

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        window = self.report.days(self.today)
        days = window[-CHART_DAYS:]
        earned = {day: self.report.by_day[day].earned_nanocents if day in self.report.by_day else 0 for day in days}
        longest = max(len(f"{day}  {dollars_text(amount)}") for day, amount in earned.items())
        title = "Earned per day (95 % of gross)"
        if len(window) > len(days):  # a longer window: said, so that no one reads its start as days without traffic
            title += f": the last {len(days)} of {len(window)} days (the table covers them all)"
        yield _chart(earned, max(1, min(BAR_WIDTH, options.max_width - longest - 1)), title)


def _chart(earned: dict[str, int], bar_width: int, title: str) -> Text:
    top = max(earned.values())
    chart = Text(f"{title}\n", style="bold")
    for day, amount in earned.items():
        width = 0 if not top else max(1 if amount else 0, round(bar_width * amount / top))
        chart.append(f"{day} ")
        chart.append("█" * width, style="green")
        chart.append(f"{' ' * (bar_width - width)} {dollars_text(amount)}\n")
    return chart


def _footnote(report: Report, ledger: Path) -> Text:
    t = report.total
    notes = [f"ledger: {ledger}"]
    if report.in_flight_requests:
        notes.insert(0, f"{report.in_flight_requests:,} request(s) in flight now are not counted until they end")
    if report.later_requests:
        notes.insert(0, _later_note(report))
    if t.local_requests:
        notes.insert(0, f"{t.local_requests:,} local request(s) (no endpoint token or not registered) earn nothing")
    notes[:0] = _cut_notes(t)
    return Text("\n".join(notes), style="dim")


def _cut_notes(t: Totals) -> list[str]:
    """The requests that ended early: served, so in the token columns; unpaid, so in no money column,
    but for money that older versions recorded on them, told apart here."""
    if not t.cut_requests:
        return []
    notes = [
        f"ended early, unpaid: {t.cut_requests:,} request(s) (the buyer hung up, or the agent cut them: drain deadline, "
        f"engine failure), {t.cut_prompt_tokens:,} prompt + {t.cut_completion_tokens:,} completion tokens served; "
        "no buyer paid for them, and gross and earned leave them out"
        + (", but for what an older vramsupply recorded on some of them (below)" if t.cut_gross_nanocents else "")
    ]
    if t.interrupted_requests:
        notes.append(
            f"interrupted: {t.interrupted_requests:,} of them were in flight when the agent was killed (SIGKILL, the OOM killer, a power cut), "
            f"{t.interrupted_prompt_tokens:,} prompt + {t.interrupted_completion_tokens:,} completion tokens as last written (up to 2 s "
            "of output before the kill is missing); heartbeats may have reported their tokens to the platform"
        )
    if t.untracked_cut_requests:
        notes.append(
            f"{t.untracked_cut_requests:,} of them, in days an older vramsupply rolled up, count as complete there "
            "(their tokens are not in the line above; any money recorded on them is in the totals)"
        )
    if t.cut_gross_nanocents:
        notes.append(
            f"an older vramsupply priced some of them: {dollars_text(t.cut_gross_nanocents)} gross, "
            f"{dollars_text(t.cut_earned_nanocents)} earned of the totals above, which no buyer paid"
        )
    return notes


def _later_note(report: Report, lead: str = "") -> str:
    if not report.later_requests:
        return ""
    return f"{lead}{report.later_requests:,} request(s) recorded with a time after now (the clock went back?) are not counted"
