"""The lines ``serve`` prints for its user (ready, where the model runs, the offer, the public URL).

They are for a person at a terminal; the agent's work never depends on them. So a standard output
that cannot be written (``serve | head -1`` once ``head`` has exited, a full disk behind a
redirect, a closed terminal) must not stop the agent: the first failed write is logged (to
standard error, where the log goes), standard output is pointed at /dev/null so that nothing is
retried or reported again at exit, and from then on these lines go to the log instead.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("vramsupply.output")
_stdout_gone = False


def say(line: str) -> None:
    """Print ``line`` for the user; once standard output has failed, log it instead."""
    global _stdout_gone
    if not _stdout_gone:
        try:
            print(line, flush=True)
            return
        except ValueError:  # sys.stdout was closed (by whoever replaced it): this line goes to the log
            pass
        except OSError as exc:  # the file behind it fails (EPIPE, ENOSPC): for good
            _stdout_gone = True
            point_stdout_at_devnull()
            log.warning("cannot write to standard output (%s); serving goes on, and its lines go to this log", exc.strerror or exc)
    log.info("%s", line)


def point_stdout_at_devnull() -> None:
    """What is still buffered, and anything else written there, goes nowhere (no error at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file behind it (closed, or None)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
