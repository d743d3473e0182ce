"""The registration state file: how `vramsupply status` learns what the running agent's lifecycle is doing.

The lifecycle rewrites ``registration.json`` in the data dir on every state change and heartbeat;
`status` reads it, checks whether the recorded process is still alive, and asks that agent's
``/health`` at the address it recorded (``--port 0`` or a ``--port`` flag are not in the settings
`status` reads). A file that does not hold what an agent writes (a pid no process can have, a time
that is no number) is damaged, and read as no record at all, never as a live agent.

Every agent writes a record as soon as it listens (``record_listening``), also one that does not
register (``--no-register``) and one still loading its model, so that `status` finds it wherever it
listens instead of an earlier run's record. A record is the running agent's only while the process
that wrote it runs: a record of a process that ended (cleanly deregistered or killed) is from an
earlier run, and says so. A pid alone does not prove that: once a process ends its pid can go to
any later program, so the record also holds the process's start time, and a live pid that started
at another time is another program.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramsupply.config import Settings, data_dir, os_reason, write_private_file
from vramsupply.host.processes import MAX_PID, process_alive, process_start, same_process
from vramsupply.platform import api
from vramsupply.platform.client import describe_error
from vramsupply.platform.offer import local_base_url

log = logging.getLogger("vramsupply.platform")

STATE_FILE_NAME = "registration.json"
"""pid_t is a signed 32-bit integer; 0 and -1 mean a process group and every process to ``kill``."""
HEALTH_TIMEOUT_SECONDS = 5


class Phase(str, Enum):
    starting = "starting"  # listening while the model loads; it registers once the model is ready
    not_registering = "not_registering"  # `serve --no-register`: serving locally, never offered
    registering = "registering"
    registered = "registered"
    offline = "offline"
    unreachable = "unreachable"
    rejected = "rejected"
    draining = "draining"
    deregistered = "deregistered"
    deregister_failed = "deregister_failed"


class KeptLeftover(BaseModel):
    """An instance a killed run left listed, or one the agent retired when its endpoint URL moved,
    whose DELETE has not succeeded yet (``leftovers``)."""

    model_config = ConfigDict(allow_inf_nan=False)

    provider_id: str = Field(min_length=1, max_length=200)
    platform_url: str
    account: str | None = None  # None: a record from before accounts were recorded (counts as any account's, as before)
    endpoint_url: str = ""
    pid: int = Field(ge=1, le=MAX_PID)  # the killed run's process (or the one that retired it), for the log
    noted_at: float  # when (wall clock) a later run first found it left listed, or its retirement's DELETE failed
    retired: bool = False  # replaced by a running agent (its endpoint URL moved, or the platform drained it), not left by a killed run


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
    process_start: int | None = Field(None, ge=0)  # when ``pid`` started (``process_start``): tells it from a later program
    heartbeat_interval: float | None = Field(None, gt=0)  # how often the agent rewrites a heartbeating record: `status` judges its age by it
    output_price: int | None = Field(None, ge=0)  # ¢ per million output tokens it offers at: `demand` advises on the price really asked
    input_price: int | None = Field(None, ge=0)  # and per million input tokens: `status` shows both prices in force
    account: str | None = None  # a fingerprint of the API key it registered with (``PlatformClient.account``), never the key
    leftovers: list[KeptLeftover] = []  # instances killed runs (or old endpoint URLs) left listed, not deleted yet: kept across runs (``write_state``)


def default_state_path() -> Path:
    return data_dir() / STATE_FILE_NAME


def write_state(path: Path, state: RegistrationState) -> None:
    """Replace the file atomically so a concurrent `status` never reads half a document. A record
    of this process gets its start time, however it was made. The instances killed runs left
    listed go from the record replaced to the new one unless it names its own (``leftovers``):
    every writer keeps them, also one that knows nothing of them."""
    if state.pid == os.getpid() and state.process_start is None:
        state = state.model_copy(update={"process_start": process_start(state.pid)})
    if "leftovers" not in state.model_fields_set and (replaced := read_state(path)) is not None and replaced.leftovers:
        state = state.model_copy(update={"leftovers": replaced.leftovers})
    write_private_file(path, state.model_dump_json(indent=2), sync=False)  # on the event loop, every heartbeat


def read_state(path: Path) -> RegistrationState | None:
    """The recorded state, or None when no agent has written one (or it is unreadable)."""
    try:
        return RegistrationState.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def record_problem(path: Path) -> str | None:
    """Why the file at ``path`` gives no record (``read_state``'s None), in words; None where there is
    no such file. `status` says it: a data dir it may not enter stopped it whole ("Permission denied")."""
    try:
        RegistrationState.model_validate_json(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"cannot read {path}: {os_reason(exc, path)}"
    except ValidationError:
        return f"{path} holds no record this version can read (damaged, or written by another version); an agent of this version rewrites it at its next heartbeat"
    return None


def record_listening(settings: Settings, model: str, port: int, *, registering: bool, path: Path | None = None) -> None:
    """The agent listens (its model may still be loading): record where, and whether it will
    register, replacing whatever an earlier run left (once the instance it may name is kept:
    ``leftovers``). An unwritable file costs `status` its answer, never the serving."""
    local_url = local_base_url(settings.host, port)
    if registering:
        once = "the model is ready" + (f" and the {settings.tunnel} tunnel has a public URL" if settings.tunnel else "")
        phase, platform_url, message = Phase.starting, settings.platform_url, f"not on the market yet: registers once {once}"
    else:
        phase, platform_url, message = Phase.not_registering, "", "serving without registering (--no-register): not on the market"
    state = RegistrationState(
        phase=phase, platform_url=platform_url, model=model, endpoint_url=settings.endpoint_url or "", message=message,
        pid=os.getpid(), updated_at=time.time(), local_url=local_url, output_price=settings.output_price if registering else None,
        input_price=settings.input_price if registering else None,
    )
    path = path or default_state_path()
    from vramsupply.platform.leftovers import keep_leftover  # it reads records: imported here, not at the top

    keep_leftover(path)  # an instance a killed run left listed outlives the record that names it, also a --no-register run's
    try:
        write_state(path, state)
    except OSError as exc:
        log.warning("cannot record the agent's state in %s (%s); `vramsupply status` will not find it", path, os_reason(exc, path))


def earlier_run(state: RegistrationState) -> str | None:
    """Why ``state`` is not the running agent's record, or None while the process that wrote it runs."""
    if same_process(state.pid, state.process_start):
        return None
    if process_alive(state.pid):
        return f"this record is from an earlier run: agent process {state.pid} has ended (pid {state.pid} is another program now)"
    return f"this record is from an earlier run: agent process {state.pid} has ended"


def record_public_url(url: str, tool: str, path: Path | None = None) -> None:
    """An agent that serves without registering, made public by a tunnel: its record says where,
    for `status` (the address was only in the log). Only this process's own record is touched."""
    path = path or default_state_path()
    record = read_state(path)
    if record is None or record.pid != os.getpid() or record.phase is not Phase.not_registering:
        return
    message = f"serving without registering (--no-register): not on the market, but public at {url}/v1 through the {tool} tunnel"
    try:
        write_state(path, record.model_copy(update={"endpoint_url": url, "message": message, "updated_at": time.time()}))
    except OSError as exc:
        log.warning("cannot record the tunnel's public URL in %s (%s)", path, exc.strerror or exc)


OFFERING_PHASES = frozenset({Phase.starting, Phase.registering, Phase.registered, Phase.offline, Phase.unreachable})
"""An agent in these phases is, or is about to be, on the market at its recorded price."""


@dataclass(frozen=True)
class RunningOffer:
    model: str
    output_price: int
    input_price: int | None = None  # None: the record holds only the output price


def running_offer(path: Path | None = None) -> RunningOffer | None:
    """The model and prices the agent running on this machine offers (or is about to), from
    its record; None when no such agent runs. A flag given to ``serve`` is in no setting `demand`
    reads, so the record is how `demand` learns the price the provider really asks."""
    record = read_state(path or default_state_path())
    if record is None or record.output_price is None or record.phase not in OFFERING_PHASES or earlier_run(record) is not None:
        return None
    return RunningOffer(record.model, record.output_price, record.input_price)


@dataclass(frozen=True)
class FoundAgent:
    """Where `status` looks for the agent, from the record (when its process runs) or the settings."""

    url: str
    record: RegistrationState | None
    earlier_run: str | None  # why the record is not the running agent's (None: it is, or there is none)


def find_agent(path: Path, host: str, port: int) -> FoundAgent:
    record = read_state(path)
    stale = earlier_run(record) if record is not None else None
    if record is not None and stale is None and record.local_url:
        return FoundAgent(record.local_url, record, None)
    return FoundAgent(local_base_url(host, port), record, stale)


AGENT_HEALTH_KEYS = frozenset({"status", "model", "slots_idle", "slots_busy", "queue"})
"""What an agent's /health holds, whichever engine it runs: an answer without them is another program's."""


async def probe_health(url: str, *, vouched: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """The agent's /health answer, or None and why not, in words (never the HTTP client's).
    ``vouched``: the running agent recorded this URL as its own, so any answer there is its; at the
    configured port, found without such a record, only an answer shaped as an agent's counts."""
    try:
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url + "/health") as response:
            body = await response.json(content_type=None)
            if response.status != 200 or not isinstance(body, dict):
                return None, f"{url}/health answered {response.status}: {api.error_message(body) or 'not ready'}"
            if not vouched and not AGENT_HEALTH_KEYS <= body.keys():  # llama-server's {"status": "ok"}, on 8080 as ours is
                return None, f"no agent answering at {url}: another program answers there (its /health is not a vramsupply agent's)"
            return body, None
    except aiohttp.ClientConnectorError as exc:
        return None, f"no agent answering at {url} ({cannot_connect(exc.os_error)})"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return None, f"no agent answering at {url} ({describe_error(exc)})"


def cannot_connect(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError) or error.errno == errno.ECONNREFUSED:
        return "nothing is listening there: connection refused"
    return f"cannot connect: {error.strerror}" if error.strerror else "cannot connect"
