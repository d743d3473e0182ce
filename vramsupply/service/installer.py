"""Install, remove and inspect the systemd service: files first, then systemctl when systemd runs.

Where systemd is not running (containers, WSL without systemd, a chroot) nothing is started and the
exact commands are printed instead, so the same install works for image builds.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from dotenv import dotenv_values
from pydantic import ValidationError

from vramsupply.config import APP_NAME, Settings, env_name, load_settings, write_private_file
from vramsupply.errors import VramsupplyError
from vramsupply.service.unit import (
    GPU_GROUPS,
    SERVICE_USER,
    UNIT_NAME,
    UnitSpec,
    non_default_settings,
    render_env_file,
    render_unit,
    under_home,
)

Say = Callable[[str], None]

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_ENV_FILE = Path("/etc/vramsupply/env")
SERVICE_HOME = Path("/var/lib") / SERVICE_USER


class ServiceError(VramsupplyError):
    """An install step failed; the message says which and what to do."""


@dataclass(frozen=True)
class ServiceTarget:
    """Which manager (system or --user) and where the unit and env file go."""

    user_mode: bool
    unit_dir: Path
    env_file: Path

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / UNIT_NAME

    def systemctl(self, *args: str) -> list[str]:
        return ["systemctl", *(["--user"] if self.user_mode else []), *args]


def default_unit_dir(user_mode: bool) -> Path:
    if not user_mode:
        return SYSTEM_UNIT_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def default_env_file(user_mode: bool) -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "env" if user_mode else SYSTEM_ENV_FILE


def service_target(user_mode: bool, unit_dir: Path | None = None, env_file: Path | None = None) -> ServiceTarget:
    return ServiceTarget(
        user_mode=user_mode,
        unit_dir=(unit_dir or default_unit_dir(user_mode)).expanduser().absolute(),
        env_file=(env_file or default_env_file(user_mode)).expanduser().absolute(),
    )


def agent_executable() -> Path:
    """The ``vramsupply`` script of the venv we run from (not resolved: the venv's python is a symlink)."""
    path = Path(sys.executable).absolute().parent / "vramsupply"
    if not os.access(path, os.X_OK):
        raise ServiceError(f"no vramsupply executable next to {sys.executable}; install vramsupply with install.sh first")
    return path


def systemd_running(target: ServiceTarget) -> bool:
    """True when the (user) service manager is up, as Ollama's installer checks it."""
    if shutil.which("systemctl") is None:
        return False
    result = subprocess.run(target.systemctl("is-system-running"), capture_output=True, text=True)
    return result.stdout.strip() in ("running", "degraded")


def read_env_file(path: Path) -> dict[str, str]:
    """The settings already in an env file, by field name (unknown or empty lines ignored)."""
    if not path.exists():
        return {}
    by_env = {env_name(name): name for name in Settings.model_fields}
    values = dotenv_values(path, interpolate=False)
    return {by_env[key.upper()]: value for key, value in values.items() if key.upper() in by_env and value is not None}


def service_settings(env_file: Path) -> Settings:
    """The effective settings, plus those already in the env file where nothing overrides them, so
    that re-running the installer from a bare shell keeps the provider's configuration."""
    loaded = load_settings()
    kept = {name: value for name, value in read_env_file(env_file).items() if loaded.sources[name] == "default"}
    try:
        settings = Settings(**kept) if kept else loaded.settings
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ServiceError(f"invalid {env_name(str(err['loc'][0]))} in {env_file}: {err['msg']}") from None
    return absolute_paths(settings)


def absolute_paths(settings: Settings) -> Settings:
    """The service starts in another working directory: a relative model file or cache dir must not move."""
    update: dict[str, object] = {}
    if settings.model and Path(settings.model).expanduser().exists():
        update["model"] = str(Path(settings.model).expanduser().absolute())
    if settings.cache_dir:
        update["cache_dir"] = settings.cache_dir.expanduser().absolute()
    return settings.model_copy(update=update)


def gpu_groups() -> tuple[str, ...]:
    """The GPU device groups this host has; a missing group in SupplementaryGroups= fails the start."""
    existing = []
    for name in GPU_GROUPS:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        existing.append(name)
    return tuple(existing)


def unit_spec(target: ServiceTarget, settings: Settings) -> UnitSpec:
    model_path = Path(settings.model) if settings.model else None
    readable = (model_path,) if model_path is not None and model_path.is_absolute() else ()
    return UnitSpec(
        exec_path=agent_executable(),
        env_file=target.env_file,
        user_mode=target.user_mode,
        drain_timeout=settings.drain_timeout,
        writable_paths=(settings.cache_dir,) if settings.cache_dir else (),
        readable_paths=readable,
        supplementary_groups=() if target.user_mode else gpu_groups(),
    )


def nologin_shell() -> str:
    return next((shell for shell in ("/usr/sbin/nologin", "/sbin/nologin") if Path(shell).exists()), "/bin/false")


def useradd_command() -> list[str]:
    return [
        "useradd", "--system", "--user-group", "--home-dir", str(SERVICE_HOME), "--no-create-home",
        "--shell", nologin_shell(), "--comment", "vramsupply provider agent", SERVICE_USER,
    ]


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def run_step(command: Sequence[str], say: Say) -> None:
    say("$ " + shlex.join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ServiceError(f"{shlex.join(command)} failed: {detail[-1] if detail else f'exit {result.returncode}'}")


def ensure_service_user(say: Say) -> None:
    """A system unit runs as the dedicated user; create it when installing as root."""
    if user_exists(SERVICE_USER):
        return
    if os.geteuid() != 0:
        say(f"the service user {SERVICE_USER!r} does not exist; as root, create it with:")
        say("  " + shlex.join(useradd_command()))
        return
    say(f"creating the system user {SERVICE_USER!r}")
    run_step(useradd_command(), say)


def _file_error(action: str, path: Path, exc: OSError, command: str) -> ServiceError:
    hint = "" if os.geteuid() == 0 else f" (a system service needs root: sudo vramsupply service {command}, or use --user)"
    return ServiceError(f"cannot {action} {path}: {exc.strerror}{hint}")


def write_file(path: Path, text: str, mode: int) -> None:
    try:
        write_private_file(path, text, mode)
    except OSError as exc:
        raise _file_error("write", path, exc, "install") from None


def remove_file(path: Path, say: Say) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise _file_error("remove", path, exc, "uninstall") from None
    say(f"removed {path}")


def prepare_writable_dirs(spec: UnitSpec, say: Say) -> None:
    """ReadWritePaths= must exist at start, and the service user must own a dir we create for it."""
    for path in spec.writable_paths:
        if path.exists():
            continue
        try:
            path.mkdir(parents=True)
            if not spec.user_mode and os.geteuid() == 0 and user_exists(SERVICE_USER):
                shutil.chown(path, SERVICE_USER, SERVICE_USER)
        except OSError as exc:
            raise ServiceError(f"cannot create {path}: {exc.strerror}") from None
        say(f"created {path}")


def start_commands(target: ServiceTarget) -> list[list[str]]:
    """``restart --no-block``: a re-install applies the new unit, and a long model download does not
    keep the installer waiting."""
    return [
        target.systemctl("daemon-reload"),
        target.systemctl("enable", UNIT_NAME),
        target.systemctl("restart", "--no-block", UNIT_NAME),
    ]


def install(target: ServiceTarget, say: Say) -> None:
    settings = service_settings(target.env_file)
    spec = unit_spec(target, settings)
    if not target.user_mode:
        if under_home(spec.exec_path):
            say(f"warning: the service runs as {SERVICE_USER!r}, which may not be allowed into {spec.exec_path.parent}; "
                "install system-wide with `sudo sh install.sh` or use --user")
        ensure_service_user(say)
    prepare_writable_dirs(spec, say)
    # The env file first: a unit that exists without its settings (an install cut short) would
    # start the agent with defaults, unconfigured, the next time systemd reloads.
    values = non_default_settings(settings)
    write_file(target.env_file, render_env_file(values), 0o600)
    say(f"wrote {target.env_file} (mode 0600, {len(values)} settings)")
    write_file(target.unit_path, render_unit(spec), 0o644)
    say(f"wrote {target.unit_path}")
    if settings.model is None:
        say(f"note: no model configured; set {env_name('model')} in {target.env_file} before starting")
    if target.user_mode:
        say("a user service stops when you log out unless lingering is on: loginctl enable-linger $USER")
    commands = start_commands(target)
    if systemd_running(target):
        for command in commands:
            run_step(command, say)
        logs = "vramsupply service logs" + (" --user" if target.user_mode else "")
        say(f"{UNIT_NAME} is starting; follow it with: {logs} -f")
    else:
        say("systemd is not running here; to start the service, run:")
        for command in commands:
            say("  " + shlex.join(command))


def uninstall(target: ServiceTarget, purge: bool, say: Say) -> None:
    running = systemd_running(target)
    if target.unit_path.exists():
        if running:
            run_step(target.systemctl("disable", "--now", UNIT_NAME), say)
        remove_file(target.unit_path, say)
        if running:
            run_step(target.systemctl("daemon-reload"), say)
    else:
        say(f"{target.unit_path} is not installed")
    if not target.env_file.exists():
        return
    if purge:
        remove_file(target.env_file, say)
    else:
        say(f"kept your settings in {target.env_file}; use --purge to remove them too")


def passthrough(command: list[str]) -> int:
    """Run systemctl/journalctl on the user's terminal and hand back its exit status."""
    if shutil.which(command[0]) is None:
        raise ServiceError(f"{command[0]} not found: this system does not run systemd")
    return subprocess.run(command).returncode


def status_command(target: ServiceTarget) -> list[str]:
    return target.systemctl("status", UNIT_NAME)


def logs_command(target: ServiceTarget, follow: bool, lines: int | None) -> list[str]:
    unit = ["--user-unit", UNIT_NAME] if target.user_mode else ["--unit", UNIT_NAME]
    return ["journalctl", *unit, *(["--follow"] if follow else []), *([f"--lines={lines}"] if lines is not None else [])]
