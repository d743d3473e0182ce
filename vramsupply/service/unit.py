"""The systemd unit and its environment file, as pure functions of the install's choices.

The unit never holds settings: they live in the environment file (``VRAM_SUPPLY_*`` lines, mode 0600,
the only place secrets are written), so re-installing rewrites the unit without touching what the
provider configured; in the env file only the setting lines are the installer's, the provider's own
lines (comments, CUDA_VISIBLE_DEVICES, HTTPS_PROXY) are kept as they are.

Every value reaches systemd as written, or not at all: a newline would end a line and start another
(``ExecStartPost=...``), so control characters are refused; a word is quoted and escaped as
systemd.syntax(7) reads it, ``%`` doubled (a specifier), and what systemd cannot hold (a quote in the
program's path) is refused with a line that says so. The installer also has ``systemd-analyze verify``
parse the result where it exists.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from dotenv.parser import parse_stream
from pydantic import SecretStr

from vramsupply.config import CONFIG_PATH_ENV, ENV_PREFIX, Settings, env_name
from vramsupply.errors import VramsupplyError
from vramsupply.service.envfile import systemd_env_values

UNIT_NAME = "vramsupply.service"
SERVICE_USER = "vramsupply"
SERVICE_STATE_DIR = Path("/var/lib") / SERVICE_USER
"""The system unit's ``StateDirectory=`` (``%S/vramsupply``): its ``XDG_DATA_HOME`` and its user's home."""
SERVICE_CACHE_DIR = Path("/var/cache") / SERVICE_USER
"""The system unit's ``CacheDirectory=`` (``%C/vramsupply``): its ``XDG_CACHE_HOME``, the downloaded models."""
GPU_GROUPS = ("render", "video")
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
# A word systemd reads back unchanged without quotes.
PLAIN_WORD = re.compile(r"[\w/.,:@+=~-]+")
ENV_FILE_MARKER = "# Written by `vramsupply service install`"
ENV_FILE_HEADER = (
    "# vramsupply service settings (VRAM_SUPPLY_* variables; see `vramsupply config show`).\n"
    f"{ENV_FILE_MARKER}, which keeps values already here unless overridden,\n"
    "# and keeps your own lines (comments, other variables) as they are.\n"
)
_FIELD_BY_ENV = {env_name(name): name for name in Settings.model_fields}
CONTROL_NAMES = {"\n": "newline", "\r": "carriage return", "\t": "tab", "\0": "NUL byte", "\x1b": "escape character"}

RESTART_SEC = 5
WATCHDOG_SEC = 60
# First start may download and load a multi-GB model; a restart resumes an interrupted download.
START_TIMEOUT = "30min"
# Beyond the drain: deregistering from the platform and freeing the model.
STOP_MARGIN_SEC = 30
STOP_TIMEOUT_MAX_SEC = 365 * 24 * 3600


class ServiceError(VramsupplyError):
    """An install step failed; the message says which and what to do."""


@dataclass(frozen=True)
class UnitSpec:
    """What the unit depends on: where the agent is installed and which paths it must write."""

    exec_path: Path
    env_file: Path
    user_mode: bool
    drain_timeout: float
    writable_paths: tuple[Path, ...] = ()
    readable_paths: tuple[Path, ...] = ()
    supplementary_groups: tuple[str, ...] = ()


def stop_timeout(drain_timeout: float) -> str:
    """TimeoutStopSec=: seconds systemd waits after SIGTERM before SIGKILL, always longer than the drain.

    A drain beyond STOP_TIMEOUT_MAX_SEC (or infinite) is as good as never: ``infinity``, which systemd
    parses; a plain number that large would be refused by systemd, which then falls back to 90 s.
    """
    drain = max(drain_timeout, 0.0)
    if not math.isfinite(drain) or drain + STOP_MARGIN_SEC > STOP_TIMEOUT_MAX_SEC:
        return "infinity"
    return str(math.ceil(drain) + STOP_MARGIN_SEC)


def under_home(path: Path) -> bool:
    return any(path == root or root in path.parents for root in HOME_ROOTS)


def protect_home(spec: UnitSpec) -> str:
    """``yes`` hides the home dirs; ``read-only`` when the agent, its model or cache live there."""
    needed = (spec.exec_path, *spec.writable_paths, *spec.readable_paths)
    return "read-only" if any(under_home(path) for path in needed) else "yes"


def check_text(text: str, what: str) -> None:
    """Refuse what a unit or env file line cannot hold: a newline would end the line (and the rest
    would become a line of its own, such as another ExecStart=), and systemd reads only UTF-8."""
    bad = next((ch for ch in text if ord(ch) < 0x20 or ord(ch) == 0x7F), None)
    if bad is not None:
        name = CONTROL_NAMES.get(bad, f"control character U+{ord(bad):04X}")
        raise ServiceError(f"{what} contains a {name}, which a systemd unit or env file cannot hold; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ServiceError(f"{what} is not valid UTF-8, which systemd requires; rename it") from None


def _unit_path(path: Path, what: str) -> str:
    """A path as a single-value setting (EnvironmentFile=), taken verbatim to the line's end: systemd
    strips trailing blanks and joins a line ending in a backslash with the next; ``%`` starts a specifier."""
    value = str(path)
    check_text(value, what)
    if value != value.rstrip() or value.endswith("\\"):
        raise ServiceError(f"{what} {value!r} ends with a blank or a backslash, which systemd would misread; rename it")
    return value.replace("%", "%%")


def _quote_arg(path: Path, what: str) -> str:
    """A path as one word of a list (ExecStart=, ReadWritePaths=): left bare when plain (install.sh
    finds its service by the bare ``ExecStart=`` path), else double-quoted with ``\\`` and ``\"``
    escaped, as systemd.syntax(7) unquotes a word; ``%`` doubled in either case."""
    value = str(path)
    check_text(value, what)
    value = value.replace("%", "%%")
    if PLAIN_WORD.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exec_path(path: Path) -> str:
    """ExecStart='s program: systemd runs it literally (no ``$`` substitution, so no ``$$``), and
    refuses one whose path has a quote or a backslash, however quoted."""
    check_text(str(path), "the agent's path")
    if set(str(path)) & set("'\"\\"):
        raise ServiceError(
            f"the agent's path {str(path)!r} has a quote or a backslash, which systemd refuses in a program's path; "
            "reinstall vramsupply (install.sh) under a directory without one"
        )
    return _quote_arg(path, "the agent's path")


def render_unit(spec: UnitSpec) -> str:
    """The unit file text. The system unit runs as the dedicated user with GPU device groups; the
    --user unit runs as the invoking user. Sandboxing that needs mount namespaces is system-only:
    a user manager can apply it only with user namespaces, which many hosts lack."""
    lines = [
        "# Written by `vramsupply service install`; re-running it rewrites this file.",
        "# Settings live in the EnvironmentFile below. For other local changes: systemctl edit vramsupply",
        "[Unit]",
        "Description=vramsupply provider agent (vram.supply inference marketplace)",
        "Documentation=https://vram.supply",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        *_service_lines(spec),
        *([] if spec.user_mode else _system_lines(spec)),
        "",
        "[Install]",
        f"WantedBy={'default.target' if spec.user_mode else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def _service_lines(spec: UnitSpec) -> list[str]:
    """How both units start, notify, restart and stop the agent."""
    return [
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_exec_path(spec.exec_path)} serve",
        f"EnvironmentFile={_unit_path(spec.env_file, 'the env file path')}",
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        f"TimeoutStartSec={START_TIMEOUT}",
        f"TimeoutStopSec={stop_timeout(spec.drain_timeout)}",
        "KillMode=mixed",
        f"WatchdogSec={WATCHDOG_SEC}",
        "SyslogIdentifier=vramsupply",
        "NoNewPrivileges=yes",
    ]


def _system_lines(spec: UnitSpec) -> list[str]:
    """The system unit's own: the dedicated user, its folders, and the sandbox."""
    return [
        f"User={SERVICE_USER}",
        f"Group={SERVICE_USER}",
        *([f"SupplementaryGroups={' '.join(spec.supplementary_groups)}"] if spec.supplementary_groups else []),
        # /var/lib/vramsupply and /var/cache/vramsupply (models), owned by the service user.
        f"StateDirectory={SERVICE_USER}",
        f"CacheDirectory={SERVICE_USER}",
        f"Environment=XDG_DATA_HOME=%S/{SERVICE_USER}",
        f"Environment=XDG_CACHE_HOME=%C/{SERVICE_USER}",
        # GPU device nodes (/dev/nvidia*, /dev/dri, /dev/kfd) stay visible: never PrivateDevices.
        "ProtectSystem=strict",
        f"ProtectHome={protect_home(spec)}",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "UMask=0027",
        *(f"ReadWritePaths={_quote_arg(path, 'the writable path')}" for path in spec.writable_paths),
    ]


def env_value(value: Any) -> str:
    """A setting as its ``VRAM_SUPPLY_*`` variable spells it."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def non_default_settings(settings: Settings) -> dict[str, str]:
    """Settings that were set (in the environment, the config file or the env file) or differ from
    the built-in default, as env strings, in Settings order. A setting set to its default value is
    written too: set or not changes what the agent does with it (a quant, context length or slot
    count that was not set is chosen or reduced by the memory plan), and the service would run
    with another configuration than the shell the install ran in."""
    values = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if name not in settings.model_fields_set and field.default is not None and env_value(value) == env_value(field.default):
            continue
        values[name] = env_value(value)
    return values


def _quote_env(value: str) -> str:
    """Double-quoted, escaping only backslash and quote: read the same by systemd and python-dotenv."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def written_by_install(text: str) -> bool:
    """Whether an env file is one ``service install`` wrote (its header says so): only such a file
    is purged."""
    return any(line.startswith(ENV_FILE_MARKER) for line in text.splitlines())


def settings_only(text: str) -> bool:
    """Whether an env file written by hand sets ``VRAM_SUPPLY_*`` variables and nothing else, so the
    installer may take it over; another file, even an empty one (/etc/environment may be), is
    never rewritten, chmod-ed or purged."""
    keys = [binding.key for binding in parse_stream(io.StringIO(text)) if binding.key]
    return bool(keys) and all(key.upper().startswith(ENV_PREFIX) for key in keys)


def setting_of(key: str | None) -> str | None:
    """The setting a ``VRAM_SUPPLY_*`` variable sets (matched as pydantic-settings does, ignoring case)."""
    return _FIELD_BY_ENV.get(key.upper()) if key else None


def env_settings(text: str) -> dict[str, str]:
    """The settings an env file's text sets, by field name, read as systemd reads them
    (``envfile``: the values the service runs with); other variables ignored."""
    settings = {}
    for key, value in systemd_env_values(text).items():
        name = setting_of(key)
        if name is not None:
            settings[name] = value
    return settings


def unknown_settings(text: str) -> list[str]:
    """``VRAM_SUPPLY_*`` names in an env file that are no setting (a typo the agent would ignore)."""
    names = dict.fromkeys(binding.key for binding in parse_stream(io.StringIO(text)) if binding.key and not binding.error)
    return [
        name for name in names
        if name.upper().startswith(ENV_PREFIX) and setting_of(name) is None and name.upper() != CONFIG_PATH_ENV
    ]


def _env_line(name: str, value: str) -> str:
    check_text(value, env_name(name))
    return f"{env_name(name)}={_quote_env(value)}\n"


def render_env_file(values: Mapping[str, str], existing: str = "") -> str:
    """The env file: ``existing`` with each ``VRAM_SUPPLY_*`` setting's line rewritten in place (or
    dropped, when the setting is back at its default), every line that is not ours (comments, other
    programs' variables such as CUDA_VISIBLE_DEVICES or HTTPS_PROXY, unknown names) kept as it was,
    and new settings appended."""
    if not written_by_install(existing):
        existing = ENV_FILE_HEADER + existing.lstrip()
    parts: list[str] = []
    written: set[str] = set()
    for binding in parse_stream(io.StringIO(existing)):
        name = None if binding.error else setting_of(binding.key)
        text = binding.original.string
        if name is None:
            parts.append(text)
            continue
        parts.append(text[: len(text) - len(text.lstrip("\r\n"))])  # blank lines before it stay
        if name in values and name not in written:
            parts.append(_env_line(name, values[name]))
            written.add(name)
    text = "".join(parts)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + "".join(_env_line(name, value) for name, value in values.items() if name not in written)
