"""Whether a process that wrote a record still runs: its pid, and its start time against pid reuse.

Apart from ``platform.state``, where it began, because the registration record, the data dir's lock
and the earnings ledger's requests in flight all name the process that wrote them, and the ledger
must not import the platform's client to ask.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_PID = 2**31 - 1


def process_alive(pid: int) -> bool:
    if not 0 < pid <= MAX_PID:  # kill(0) and kill(-1) reach groups of processes, and always succeed
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux's /proc); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 1 :].split()  # the name before it may hold spaces and parentheses
    try:
        return int(fields[19])  # field 22 of the line; this list starts at field 3
    except (IndexError, ValueError):
        return None


def same_process(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` still runs and, where its start time is known, is the one that
    started then (not a later program given the same pid)."""
    if not process_alive(pid):
        return False
    now = process_start(pid) if started is not None else None
    return now is None or now == started
