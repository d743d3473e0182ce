"""The registration state file: how `vramsupply status` learns what the running agent's lifecycle is doing.

The lifecycle rewrites ``registration.json`` in the data dir on every state change and heartbeat;
`status` reads it, checks whether the recorded process is still alive, and asks that agent's
``/health`` at the address it recorded (``--port 0`` or a ``--port`` flag are not in the settings
`status` reads). A file that does not hold what an agent writes (a pid no process can have, a time
that is no number) is damaged, and read as no record at all, never as a live agent.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramsupply.config import data_dir, write_private_file

STATE_FILE_NAME = "registration.json"
MAX_PID = 2**31 - 1
"""pid_t is a signed 32-bit integer; 0 and -1 mean a process group and every process to ``kill``."""


class Phase(str, Enum):
    registering = "registering"
    registered = "registered"
    offline = "offline"
    unreachable = "unreachable"
    rejected = "rejected"
    draining = "draining"
    deregistered = "deregistered"
    deregister_failed = "deregister_failed"


class RegistrationState(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # NaN would make `status --json` print no JSON

    phase: Phase
    platform_url: str
    model: str
    endpoint_url: str
    provider_id: str | None = None
    message: str = ""
    pid: int = Field(ge=1, le=MAX_PID)
    updated_at: float
    last_heartbeat_at: float | None = None
    local_url: str | None = None  # where this machine reaches the agent (its real port, also with --port 0)


def default_state_path() -> Path:
    return data_dir() / STATE_FILE_NAME


def write_state(path: Path, state: RegistrationState) -> None:
    """Replace the file atomically so a concurrent `status` never reads half a document."""
    write_private_file(path, state.model_dump_json(indent=2), sync=False)  # on the event loop, every heartbeat


def read_state(path: Path) -> RegistrationState | None:
    """The recorded state, or None when no agent has written one (or it is unreadable)."""
    try:
        return RegistrationState.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


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
