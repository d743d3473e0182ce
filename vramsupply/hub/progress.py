"""Transfer progress: a rich bar with size, speed and ETA on a terminal; plain lines elsewhere.

Plain lines exist for logs and journald, where a redrawn bar would be garbage. Output goes to
stderr so `--json` output on stdout stays clean.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from vramsupply.display import console_width

# Seconds between plain progress lines: often enough to show life, rare enough for a log.
PLAIN_INTERVAL = 5.0


class ProgressTask:
    """One file's transfer; the base class reports nothing (progress disabled)."""

    def advance(self, nbytes: int) -> None:
        """Count `nbytes` more bytes done."""

    def restart(self) -> None:
        """The transfer starts over from byte 0 (the server ignored the Range request)."""

    def finish(self) -> None:
        """The transfer is complete."""


class TransferProgress:
    """Creates one task per file; use as a context manager around all transfers. Silent by default."""

    def task(self, label: str, total: int, completed: int = 0) -> ProgressTask:
        return ProgressTask()

    def note(self, message: str) -> None:
        """A one-off status line (e.g. waiting for another download of the same file)."""

    def __enter__(self) -> TransferProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _RichTask(ProgressTask):
    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._id, nbytes)

    def restart(self) -> None:
        self._progress.reset(self._id)

    def finish(self) -> None:
        task = self._progress.tasks[self._id]
        self._progress.update(self._id, completed=task.total)


class RichTransferProgress(TransferProgress):
    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )

    def task(self, label: str, total: int, completed: int = 0) -> ProgressTask:
        return _RichTask(self._progress, self._progress.add_task(label, total=total, completed=completed))

    def note(self, message: str) -> None:
        self._progress.console.print(message, highlight=False)

    def __enter__(self) -> TransferProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


class _PlainTask(ProgressTask):
    def __init__(self, stream: TextIO, label: str, total: int, completed: int) -> None:
        self._stream = stream
        self._label = label
        self._total = total
        self._done = completed
        self._started = self._last_line = time.monotonic()
        self._start_bytes = completed
        resuming = f", resuming at {self._percent():.0f}%" if completed else ""
        self._print(f"{decimal(total)}{resuming}")

    def _percent(self) -> float:
        return 100 * self._done / self._total if self._total else 100.0

    def _speed(self, now: float) -> float:
        return (self._done - self._start_bytes) / max(now - self._started, 1e-6)

    def _print(self, text: str) -> None:
        print(f"{self._label}: {text}", file=self._stream, flush=True)

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        now = time.monotonic()
        if now - self._last_line < PLAIN_INTERVAL or self._done >= self._total:
            return
        self._last_line = now
        speed = self._speed(now)
        eta = f", ETA {timedelta(seconds=round((self._total - self._done) / speed))}" if speed > 0 else ""
        self._print(f"{self._percent():.0f}% ({decimal(self._done)} of {decimal(self._total)}, {decimal(round(speed))}/s{eta})")

    def restart(self) -> None:
        self._done = self._start_bytes = 0
        self._print("the server ignored the resume request, starting over")

    def finish(self) -> None:
        elapsed = time.monotonic() - self._started
        fetched = self._total - self._start_bytes
        self._done = self._total
        self._print(f"done, {decimal(fetched)} in {timedelta(seconds=round(elapsed))} ({decimal(round(fetched / max(elapsed, 1e-6)))}/s)")


class PlainTransferProgress(TransferProgress):
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def task(self, label: str, total: int, completed: int = 0) -> ProgressTask:
        return _PlainTask(self._stream, label, total, completed)

    def note(self, message: str) -> None:
        print(message, file=self._stream, flush=True)


def make_progress(enabled: bool, stream: TextIO | None = None) -> TransferProgress:
    """Silent when disabled; a rich bar when `stream` (default stderr) is a terminal; plain lines otherwise."""
    if not enabled:
        return TransferProgress()
    stream = stream or sys.stderr
    if stream.isatty():
        return RichTransferProgress(Console(file=stream, markup=False, width=console_width(stream)))
    return PlainTransferProgress(stream)
