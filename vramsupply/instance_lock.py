"""One agent per data dir: `serve` holds an exclusive lock on ``<data dir>/agent.lock`` while it runs.

Why: the endpoint token, ``registration.json`` and the earnings ledger live in the data dir. Two
agents on one register with the same token, overwrite each other's record (so `vramsupply status`
shows whichever wrote last) and write into one ledger. The README always said they must not share
one; now the second `serve` (or `serve --demo`, which uses the same data dir) refuses to start, in
one line that names the data dir, the other agent's pid and how to run two. It refuses before the
model downloads or loads, so nothing is wasted.

Why ``flock``: the kernel drops the lock when the process ends, however it ends (SIGKILL, a crash),
so there is never a stale lock to clean up by hand, as there is with a pid file. The file itself is
never removed (removing a locked file lets a third process lock a new one beside it); what it holds
(the holder's pid and start time) only names the holder in the refusal and lets `status` say an
agent is starting before it listens. Python opens the file close-on-exec, so a child (a tunnel, a
vLLM server) never inherits the lock and keeps it after the agent is gone. Only `serve` takes the
lock: `status`, `earnings`, `devplatform` and the rest run beside an agent.

A lock that cannot be taken at all (an unwritable data dir, a file system without locks) is a
warning, not a refusal: the lock guards against a mistake, and must not itself keep a provider
from serving. Taking it twice in one process is a no-op.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
from pathlib import Path

from vramsupply.config import data_dir
from vramsupply.errors import VramsupplyError
from vramsupply.platform.state import MAX_PID, process_start, same_process

log = logging.getLogger("vramsupply.serve")

LOCK_FILE_NAME = "agent.lock"
_held: dict[Path, int] = {}  # lock file -> its open descriptor, kept open until the process ends


class DataDirInUse(VramsupplyError):
    """Another agent runs on this data dir. Exit 1, as for a port in use: no setting is invalid,
    and the same command works once the other agent stops (systemd's Restart= retries it)."""


def hold_data_dir(directory: Path | None = None) -> None:
    """Lock ``directory`` (the data dir) for this process's life, or raise ``DataDirInUse``."""
    directory = directory or data_dir()
    path = (directory / LOCK_FILE_NAME).absolute()
    if path in _held:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        return _cannot_lock(path, exc)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(in_use(directory, lock_holder(directory))) from None
    except OSError as exc:
        os.close(fd)
        return _cannot_lock(path, exc)
    _held[path] = fd
    _write_holder(fd)


def lock_holder(directory: Path | None = None) -> int | None:
    """The pid of the agent that holds ``directory``'s lock, from what it wrote there; None when no
    process that wrote it still runs (the lock itself is not touched: reading never blocks a start)."""
    try:
        holder = json.loads(((directory or data_dir()) / LOCK_FILE_NAME).read_bytes())
        pid, started = holder["pid"], holder.get("process_start")
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if type(pid) is not int or not 0 < pid <= MAX_PID or not isinstance(started, (int, type(None))):
        return None
    return pid if same_process(pid, started) else None


def in_use(directory: Path, pid: int | None) -> str:
    who = f"another vramsupply agent (pid {pid})" if pid is not None else "another vramsupply agent"
    return (
        f"{who} is serving from the data dir {directory}; two agents must not share one (its endpoint token, "
        f"registration record and earnings ledger): stop that one, or give this one a data dir of its own: {separate_data_dir()}"
    )


def separate_data_dir() -> str:
    """How to start an agent on another data dir (macOS's ignores XDG_DATA_HOME)."""
    if sys.platform == "darwin":
        return "HOME=/path/to/another/home vramsupply serve … --port 8081"
    return "XDG_DATA_HOME=~/.local/share/agent2 vramsupply serve … --port 8081"


def _write_holder(fd: int) -> None:
    record = json.dumps({"pid": os.getpid(), "process_start": process_start(os.getpid())}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError as exc:  # a full disk: the lock holds all the same, only unnamed
        log.debug("cannot write the holder into the data dir's lock file: %s", exc)


def _cannot_lock(path: Path, exc: OSError) -> None:
    log.warning(
        "cannot lock %s (%s): a second agent on this data dir would not be refused", path, exc.strerror or exc
    )
