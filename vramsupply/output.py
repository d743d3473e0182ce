"""The lines ``serve`` prints for its user (ready, where the model runs, the offer, the public URL,
``--demo``'s purchase).

They are for a person at a terminal; the agent's work never depends on them. So a standard output
that cannot be written (``serve | head -1`` once ``head`` has exited, a full disk behind a
redirect, a closed terminal) must not stop the agent: the first failed write is logged (to
standard error, where the log goes), standard output is pointed at /dev/null so that nothing is
retried or reported again at exit, and from then on these lines go to the log instead.

A process started with standard output closed (``vramsupply config show >&-``) gets ``None`` for
``sys.stdout`` from Python, and every print vanishes: a command whose output is its whole point
exited 0 having shown nothing. ``ClosedOutput`` stands in, and writing to it fails instead.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import sys

log = logging.getLogger("vramsupply.output")
_stdout_gone = False
_unlogged = ""  # the start of a line, printed in parts (``say_part``), that could not be printed


def say(line: str) -> None:
    """Print ``line`` for the user; once standard output has failed, log it instead."""
    say_part(line + "\n")


def say_part(text: str) -> None:
    """Print ``text``, part of a line (``--demo`` streams an answer as it comes); once standard
    output has failed, each line it completes is logged instead."""
    global _unlogged
    if _print(text):
        return
    *lines, _unlogged = (_unlogged + text).split("\n")
    for line in lines:
        log.info("%s", line)


def _print(text: str) -> bool:
    """Whether ``text`` went to standard output (see the module docstring for when it cannot)."""
    global _stdout_gone
    if _stdout_gone:
        return False
    try:
        print(text, end="", flush=True)
        return True
    except ValueError:  # sys.stdout was closed (by whoever replaced it): this text goes to the log
        return False
    except OSError as exc:  # the file behind it fails (EPIPE, ENOSPC): for good
        _stdout_gone = True
        point_stdout_at_devnull()
        log.warning("cannot write to standard output (%s); serving goes on, and its lines go to this log", exc.strerror or exc)
        return False


class ClosedStdout(OSError):
    """Standard output was closed when the process started."""


class ClosedOutput(io.TextIOBase):
    """``sys.stdout`` when there is none: every write fails with ``ClosedStdout``."""

    def write(self, text: str) -> int:
        raise ClosedStdout(errno.EBADF, "standard output is closed")

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("standard output is closed")

    def flush(self) -> None:
        """Nothing was written, so there is nothing to fail."""


def stand_in_for_closed_stdout() -> None:
    if sys.stdout is None:
        sys.stdout = ClosedOutput()


def point_stdout_at_devnull() -> None:
    """What is still buffered, and anything else written there, goes nowhere (no error at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file behind it (closed, or None)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
