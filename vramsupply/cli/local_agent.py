"""The agent that runs on this machine, as the commands beside it need to know it.

`serve` is the only command that holds the data dir (``instance_lock``), but others act on what a
running agent uses: `bench` measures the machine it shares (and on a GPU would load a second copy of
the model), `models rm` deletes the files it serves. They ask here whether an agent runs, and which
model it serves, from the lock file and the registration record it keeps up to date.

The system service (`vramsupply service install`) runs as its own user with its data in
``/var/lib/vramsupply`` (the unit's ``XDG_DATA_HOME``), so `status` and `earnings` run as the
provider's own user find nothing of it in that user's data dir, and said "not running" and "nothing
earned" of an agent that serves and earns. Where nothing is found and the service's folder exists,
they say where its data is and the command that reads it (``service_data``). ``SERVICE_DATA_HOME``
is that folder (a test points it elsewhere).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from vramsupply.config import APP_NAME, data_dir
from vramsupply.instance_lock import lock_holder
from vramsupply.platform.state import RegistrationState, default_state_path, earlier_run, read_state
from vramsupply.service.unit import SERVICE_STATE_DIR, SERVICE_USER

SERVICE_DATA_HOME = SERVICE_STATE_DIR
"""The system service's ``XDG_DATA_HOME`` (its ``StateDirectory=``, service/unit.py); its data dir is the ``vramsupply`` folder in it."""


def agent_beside() -> int | None:
    """The pid of an agent serving on this machine: from this user's data dir, else the system
    service's where this user can read its lock (root can); None when none is known to run."""
    for directory in dict.fromkeys((data_dir(), SERVICE_DATA_HOME / APP_NAME)):
        pid = lock_holder(directory)
        if pid is not None:
            return pid
    return None


@dataclass(frozen=True)
class ServedModel:
    model: str
    pid: int


def served_model(path: Path | None = None) -> ServedModel | None:
    """The model the agent running on this data dir serves (or is loading), from its record; None
    when no agent that wrote one runs."""
    record: RegistrationState | None = read_state(path or default_state_path())
    if record is None or earlier_run(record) is not None:
        return None
    return ServedModel(record.model, record.pid)


@dataclass(frozen=True)
class ServiceData:
    """Where the system service keeps its data, and the command that reads it as the service's user."""

    data_dir: Path
    command: str

    def line(self, what: str) -> str:
        return f"no {what} in {data_dir()}; the system service keeps its data in {self.data_dir}: read it with `{self.command}`"

    def as_json(self) -> dict[str, str]:
        return {"data_dir": str(self.data_dir), "command": self.command}


def service_data(command: str) -> ServiceData | None:
    """The system service's data and how to read it with ``command`` (`status`, `earnings`), where
    its folder exists and this command does not already read it; else None."""
    home = SERVICE_DATA_HOME
    service_dir = home / APP_NAME
    if not home.is_dir() or data_dir() == service_dir:
        return None
    reading = f"sudo -u {SERVICE_USER} env XDG_DATA_HOME={shlex.quote(str(home))} vramsupply {command}"
    return ServiceData(service_dir, reading)
