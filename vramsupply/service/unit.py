"""The systemd unit and its environment file, as pure functions of the install's choices.

The unit never holds settings: they live in the environment file (``VRAM_SUPPLY_*`` lines, mode 0600,
the only place secrets are written), so re-installing rewrites the unit without touching what the
provider configured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from vramsupply.config import Settings, env_name

UNIT_NAME = "vramsupply.service"
SERVICE_USER = "vramsupply"
GPU_GROUPS = ("render", "video")
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))

RESTART_SEC = 5
WATCHDOG_SEC = 60
# First start may download and load a multi-GB model; a restart resumes an interrupted download.
START_TIMEOUT = "30min"
# Beyond the drain: deregistering from the platform and freeing the model.
STOP_MARGIN_SEC = 30


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


def stop_timeout(drain_timeout: float) -> int:
    """Seconds systemd waits after SIGTERM before SIGKILL: always longer than the drain."""
    return math.ceil(drain_timeout) + STOP_MARGIN_SEC


def under_home(path: Path) -> bool:
    return any(path == root or root in path.parents for root in HOME_ROOTS)


def protect_home(spec: UnitSpec) -> str:
    """``yes`` hides the home dirs; ``read-only`` when the agent, its model or cache live there."""
    needed = (spec.exec_path, *spec.writable_paths, *spec.readable_paths)
    return "read-only" if any(under_home(path) for path in needed) else "yes"


def _unit_path(path: Path) -> str:
    """A path as a unit file value: ``%`` would start a specifier."""
    return str(path).replace("%", "%%")


def _quote_arg(path: Path) -> str:
    """A path in a word list (ExecStart=, ReadWritePaths=), quoted when it has spaces."""
    value = _unit_path(path)
    if not any(ch in value for ch in ' \t"\\'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_quote_arg(spec.exec_path)} serve",
        f"EnvironmentFile={_unit_path(spec.env_file)}",
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
    if not spec.user_mode:
        lines += [
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
            *(f"ReadWritePaths={_quote_arg(path)}" for path in spec.writable_paths),
        ]
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if spec.user_mode else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def env_value(value: Any) -> str:
    """A setting as its ``VRAM_SUPPLY_*`` variable spells it."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def non_default_settings(settings: Settings) -> dict[str, str]:
    """Settings whose effective value differs from the built-in default, as env strings, in Settings order."""
    values = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if field.default is not None and env_value(value) == env_value(field.default):
            continue
        values[name] = env_value(value)
    return values


def _quote_env(value: str) -> str:
    """Double-quoted, escaping only backslash and quote: read the same by systemd and python-dotenv."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_env_file(values: Mapping[str, str]) -> str:
    lines = [
        "# vramsupply service settings (VRAM_SUPPLY_* variables; see `vramsupply config show`).",
        "# Written by `vramsupply service install`, which keeps values already here unless overridden.",
        *(f"{env_name(name)}={_quote_env(value)}" for name, value in values.items()),
        "",
    ]
    return "\n".join(lines)
