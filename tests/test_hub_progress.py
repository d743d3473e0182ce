"""Download progress: a rich bar with size, speed and ETA on a terminal, plain lines in logs."""

from __future__ import annotations

import io
import re
import time

import pytest

from vramsupply.hub import progress
from vramsupply.hub.progress import PlainTransferProgress, RichTransferProgress, make_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_rich_bar_with_size_speed_and_eta() -> None:
    screen = Terminal()
    bar = make_progress(True, screen)
    assert isinstance(bar, RichTransferProgress)
    with bar:
        task = bar.task("org/repo/model-Q4_K_M.gguf", total=8_000_000)
        task.advance(1_000_000)
        time.sleep(0.1)
        task.advance(1_000_000)
    last_frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).split("\r")[-1]
    assert re.match(r"org/repo/model-Q4_K_M\.gguf ━+╺━+ 2\.0/8\.0 MB [\d.]+ MB/s \d:\d\d:\d\d\s*$", last_frame), last_frame


def test_logs_get_plain_lines_with_percent_speed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    log = io.StringIO()
    lines = make_progress(True, log)
    assert isinstance(lines, PlainTransferProgress)
    task = lines.task("org/repo/model.gguf", total=4_000_000, completed=1_000_000)
    task.advance(1_000_000)
    task.finish()
    first, middle, last = log.getvalue().splitlines()
    assert first == "org/repo/model.gguf: 4.0 MB, resuming at 25%"
    assert middle.startswith("org/repo/model.gguf: 50% (2.0 MB of 4.0 MB, ") and ", ETA " in middle
    assert last.startswith("org/repo/model.gguf: done, 3.0 MB in 0:00:00 (")


def test_disabled_progress_prints_nothing() -> None:
    quiet = Terminal()
    with make_progress(False, quiet) as bar:
        bar.task("x", total=10).advance(10)
    assert quiet.getvalue() == ""
