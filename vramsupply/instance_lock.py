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
lock: `status`, `earnings`, `devplatform` and the rest run beside an agent (`bench` and `models rm`
ask ``lock_holder`` whether one does, to warn or refuse).

An agent that received its stop signal holds the lock until its drain ends (up to
``--drain-timeout``); a second `serve` started then (a restart) is told that the first is stopping
and to wait for it, not that it serves: ``mark_stopping`` adds that to the holder record, and a
registration record of the holder in a draining phase (an engine that failed) says the same.

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

from vramsupply.config import data_dir, make_private_dirs, os_reason
from vramsupply.errors import VramsupplyError
from vramsupply.platform.state import MAX_PID, STATE_FILE_NAME, Phase, earlier_run, process_start, read_state, same_process

log = logging.getLogger("vramsupply.serve")

LOCK_FILE_NAME = "agent.lock"
_held: dict[Path, int] = {}  # lock file -> its open descriptor, kept open until the process ends
STOPPING_PHASES = frozenset({Phase.draining, Phase.deregistered, Phase.deregister_failed})
"""Registration phases of an agent on its way out: it drains, then deregisters, then exits."""


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
        make_private_dirs(directory)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        return _cannot_lock(path, exc)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = lock_holder(directory)
        raise DataDirInUse(in_use(directory, pid, stopping=pid is not None and holder_stopping(directory, pid))) from None
    except OSError as exc:
        os.close(fd)
        return _cannot_lock(path, exc)
    _held[path] = fd
    _write_holder(fd)
    older = unlocked_agent(directory)
    if older is not None:
        raise DataDirInUse(in_use(directory, older, older=True))


def unlocked_agent(directory: Path) -> int | None:
    """The pid of an agent from before this lock (it takes none) that still serves from
    ``directory``, as the registration record it wrote says; None when there is none. Upgrading in
    place leaves such an agent running until its restart, and a `serve` started beside it was told
    only that its port was in use, and to choose another."""
    record = read_state(directory / STATE_FILE_NAME)
    if record is None or record.pid == os.getpid() or earlier_run(record) is not None:
        return None
    return record.pid if _runs_serve(record.pid) else None


def _runs_serve(pid: int) -> bool:
    """Whether process ``pid`` is `vramsupply serve` (Linux's /proc; elsewhere unknown: False),
    so that a record's pid that another program now has is not taken for an agent."""
    try:
        args = [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return False
    return "serve" in args and any(Path(arg).name == "vramsupply" for arg in args)


def lock_holder(directory: Path | None = None) -> int | None:
    """The pid of the agent that holds ``directory``'s lock, from what it wrote there; None when no
    process that wrote it still runs (the lock itself is not touched: reading never blocks a start)."""
    holder = _read_holder(directory or data_dir())
    if holder is None:
        return None
    pid, started = holder["pid"], holder.get("process_start")
    if type(pid) is not int or not 0 < pid <= MAX_PID or not isinstance(started, (int, type(None))):
        return None
    return pid if same_process(pid, started) else None


def holder_stopping(directory: Path, pid: int) -> bool:
    """Whether agent ``pid``, the holder of ``directory``'s lock, is stopping: it said so in the lock
    file (``mark_stopping``), or its registration record is in a phase of its stop."""
    holder = _read_holder(directory)
    if holder is not None and holder.get("pid") == pid and holder.get("stopping") is True:
        return True
    record = read_state(directory / STATE_FILE_NAME)
    return record is not None and record.pid == pid and record.phase in STOPPING_PHASES


def _read_holder(directory: Path) -> dict[str, object] | None:
    try:
        holder = json.loads((directory / LOCK_FILE_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def in_use(directory: Path, pid: int | None, *, stopping: bool = False, older: bool = False) -> str:
    """``older``: an agent from before the lock (``unlocked_agent``)."""
    who = f"another vramsupply agent (pid {pid})" if pid is not None else "another vramsupply agent"
    if older:
        who = f"an older vramsupply agent (pid {pid}, from before this check)"
    if stopping:
        return (
            f"{who} is stopping (draining in-flight requests) on the data dir {directory}; wait for it to exit "
            f"(at most its --drain-timeout and its deregistration), then start this one"
        )
    return (
        f"{who} is serving from the data dir {directory}; two agents must not share one (its endpoint token, "
        f"registration record and earnings ledger): stop that one, or give this one a data dir of its own: {separate_data_dir()}"
    )


def separate_data_dir() -> str:
    """How to start an agent on another data dir (macOS's ignores XDG_DATA_HOME)."""
    if sys.platform == "darwin":
        return "HOME=/path/to/another/home vramsupply serve … --port 8081"
    return "XDG_DATA_HOME=~/.local/share/agent2 vramsupply serve … --port 8081"


def mark_stopping() -> None:
    """This agent begins to stop: say so in the lock files it holds, for a `serve` started before it
    exits (``in_use``). Nothing when it holds none (`devplatform`)."""
    for fd in _held.values():
        _write_holder(fd, stopping=True)


def _write_holder(fd: int, *, stopping: bool = False) -> None:
    holder: dict[str, object] = {"pid": os.getpid(), "process_start": process_start(os.getpid())}
    if stopping:
        holder["stopping"] = True
    record = json.dumps(holder).encode()
    try:  # written over, then cut to length: a reader never finds the file empty (a rewrite is longer)
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
    except OSError as exc:  # a full disk: the lock holds all the same, only unnamed
        log.debug("cannot write the holder into the data dir's lock file: %s", exc)


def _cannot_lock(path: Path, exc: OSError) -> None:
    log.warning(
        "cannot lock %s (%s): a second agent on this data dir would not be refused", path, os_reason(exc, path)
    )
