"""Install, remove and inspect the systemd service: files first, then systemctl when systemd runs.

Where systemd is not running (containers, WSL without systemd, a chroot) nothing is started and the
exact commands are printed instead, so the same install works for image builds. Nor is a service
started that could never start (no model, or no API key or endpoint URL to register with): it
would fail and restart every few seconds forever; the install says what to add to the env file.

Everything is checked before anything is written: values a unit or env file cannot hold, an env
file the installer did not write (such as /etc/environment), every file and folder to write (a
``--unit-dir`` that is a file), and, where ``systemd-analyze`` exists, the unit as systemd itself
parses it. Should the unit still fail to be written (a full disk), the env file is put back as it
was: a re-install must not leave settings the provider never saw take effect half-way.
"""

from __future__ import annotations

import contextlib
import difflib
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
from pydantic import ValidationError

from vramsupply.userpath import expand_user
from vramsupply.config import APP_NAME, ENV_PREFIX, ConfigError, Settings, env_name, load_settings, write_private_file
from vramsupply.service.checks import check_destinations, root_hint, startup_problems, verify_unit
from vramsupply.service.unit import (
    ENV_FILE_MARKER,
    GPU_GROUPS,
    RESTART_SEC,
    SERVICE_CACHE_DIR,
    SERVICE_STATE_DIR,
    SERVICE_USER,
    UNIT_NAME,
    ServiceError,
    UnitSpec,
    env_settings,
    non_default_settings,
    render_env_file,
    render_unit,
    settings_only,
    under_home,
    unknown_settings,
    written_by_install,
)

Say = Callable[[str], None]

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_ENV_FILE = Path("/etc/vramsupply/env")
SERVICE_HOME = SERVICE_STATE_DIR  # the service user's home; with the cache, what a system purge removes
# useradd's comment (the passwd GECOS field): how uninstall --purge knows the account is ours.
SERVICE_USER_COMMENT = "vramsupply provider agent"


@dataclass(frozen=True)
class ServiceTarget:
    """Which manager (system or --user), where the unit and env file go, and the system service's
    own folders (fields, so that tests purge temporary ones)."""

    user_mode: bool
    unit_dir: Path
    env_file: Path
    state_dir: Path = SERVICE_STATE_DIR
    cache_dir: Path = SERVICE_CACHE_DIR

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / UNIT_NAME

    def systemctl(self, *args: str) -> list[str]:
        return ["systemctl", *(["--user"] if self.user_mode else []), *args]


def default_unit_dir(user_mode: bool) -> Path:
    if not user_mode:
        return SYSTEM_UNIT_DIR
    # A relative XDG_CONFIG_HOME is not one (the XDG spec; systemd and platformdirs pass it over):
    # the unit went under the current directory, where systemd never looks for it.
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config") / "systemd" / "user"


def default_env_file(user_mode: bool) -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "env" if user_mode else SYSTEM_ENV_FILE


def normalized(path: Path) -> Path:
    """Absolute and without ``..``: systemd ignores a path that is not normalized (EnvironmentFile=,
    ReadWritePaths=), and the service would start without its settings."""
    return Path(os.path.normpath(expand_user(path).absolute()))


def service_target(user_mode: bool, unit_dir: Path | None = None, env_file: Path | None = None) -> ServiceTarget:
    return ServiceTarget(
        user_mode=user_mode,
        unit_dir=normalized(unit_dir or default_unit_dir(user_mode)),
        env_file=normalized(env_file or default_env_file(user_mode)),
    )


def agent_executable() -> Path:
    """The ``vramsupply`` script of the venv we run from (not resolved: the venv's python is a symlink)."""
    path = Path(sys.executable).absolute().parent / "vramsupply"
    if not os.access(path, os.X_OK):
        raise ServiceError(f"no vramsupply executable next to {sys.executable}; install vramsupply with install.sh first")
    return path


def manager_state(target: ServiceTarget) -> str | None:
    """What ``systemctl is-system-running`` says of the (user) service manager: ``running``,
    ``degraded``, ``starting``..., ``offline`` where it is not running; None without systemctl."""
    if shutil.which("systemctl") is None:
        return None
    return subprocess.run(target.systemctl("is-system-running"), capture_output=True, text=True).stdout.strip()


MANAGER_UP = ("running", "degraded", "starting", "initializing")
"""States in which units can be enabled and started: also while the machine boots (cloud-init's
runcmd runs while ``is-system-running`` says "starting"; that was taken for no systemd at all)."""
MANAGER_UNREACHABLE = ("offline", "unknown", "")
"""No manager answers: none runs (a container), or the bus cannot be reached (--user in a shell
opened with su or sudo, where systemctl prints its error and nothing on standard output)."""


def systemd_running(target: ServiceTarget) -> bool:
    """True when the (user) service manager is up, as Ollama's installer checks it."""
    return manager_state(target) in MANAGER_UP


def read_env_file(target: ServiceTarget, command: str) -> str:
    """The env file's text ("" when there is none), refusing a file that is not the installer's:
    its lines are someone else's (/etc/environment), so it must never be rewritten, chmod-ed or purged.
    ``install`` also takes over a hand-written file of ``VRAM_SUPPLY_*`` settings only."""
    path = target.env_file
    if not path.is_file():
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise file_error("read", path, exc, command, target.user_mode) from None
    if not written_by_install(text) and not (command == "install" and settings_only(text)):
        raise ServiceError(
            f"not touching {path}: `vramsupply service install` did not write it (no {ENV_FILE_MARKER!r} line); "
            "choose another --env-file, or add that line to the file to hand it to the installer"
        )
    return text


def warn_unknown_names(env_text: str, env_file: Path, say: Say) -> None:
    """A misspelt setting in the env file is kept (it is the provider's line) but named: the agent ignores it."""
    known = [env_name(name).removeprefix(ENV_PREFIX) for name in Settings.model_fields]
    for name in unknown_settings(env_text):
        close = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), known, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        say(f"warning: {name} in {env_file} is not a vramsupply setting{hint}; the service ignores it")


def service_settings(env_file: Path, env_text: str) -> Settings:
    """The effective settings, plus those already in the env file where nothing overrides them, so
    that re-running the installer from a bare shell keeps the provider's configuration."""
    loaded = load_settings()
    kept = {name: value for name, value in env_settings(env_text).items() if loaded.sources[name] == "default"}
    try:
        settings = Settings(**kept) if kept else loaded.settings
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"invalid {env_name(str(err['loc'][0]))} in {env_file}: {err['msg']}") from None  # a setting: exit 2
    return absolute_paths(settings)


def absolute_paths(settings: Settings) -> Settings:
    """The service starts in another working directory: a relative model file or cache dir must not move."""
    update: dict[str, object] = {}
    if settings.model and expand_user(settings.model).exists():
        update["model"] = str(expand_user(settings.model).absolute())
    if settings.cache_dir:
        update["cache_dir"] = normalized(settings.cache_dir)
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


def interpreter() -> Path:
    """The Python the service's ``vramsupply`` script runs: the venv's python, resolved (pyenv's
    and conda's live in a home, often /root, mode 0700)."""
    return Path(os.path.realpath(sys.executable))


def unit_spec(target: ServiceTarget, settings: Settings) -> UnitSpec:
    model_path = Path(settings.model) if settings.model else None
    readable = ((model_path,) if model_path is not None and model_path.is_absolute() else ()) + (interpreter(),)
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
        "--shell", nologin_shell(), "--comment", SERVICE_USER_COMMENT, SERVICE_USER,
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


def file_error(action: str, path: Path, exc: OSError | UnicodeDecodeError, command: str, user_mode: bool) -> ServiceError:
    """One line; the hint about root only where it can help: a system service, not as root."""
    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "it is not UTF-8 text"
    return ServiceError(f"cannot {action} {path}: {reason}{root_hint(command, user_mode)}")


def write_file(target: ServiceTarget, path: Path, text: str, mode: int) -> None:
    try:
        write_private_file(path, text, mode)
    except OSError as exc:
        raise file_error("write", path, exc, "install", target.user_mode) from None


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


def write_service_files(target: ServiceTarget, spec: UnitSpec, env_text: str, unit_text: str, say: Say) -> None:
    """The env file first: a unit that exists without its settings (an install cut short) would
    start the agent with defaults, unconfigured, the next time systemd reloads."""
    if not target.user_mode:
        for path, what in ((spec.exec_path, "the agent"), (interpreter(), "its Python")):
            if under_home(path):
                say(f"warning: the service runs as {SERVICE_USER!r}, which may not be allowed into {path.parent} ({what}); "
                    "install system-wide with `sudo sh install.sh` (with a Python outside any home: VRAMSUPPLY_PYTHON) or use --user")
                break
        ensure_service_user(say)
    prepare_writable_dirs(spec, say)
    previous = target.env_file.read_text(encoding="utf-8") if target.env_file.is_file() else None  # read_env_file read it as UTF-8
    write_file(target, target.env_file, env_text, 0o600)
    try:
        write_file(target, target.unit_path, unit_text, 0o644)
    except ServiceError:
        put_back(target.env_file, previous)
        raise
    say(f"wrote {target.env_file} (mode 0600, {len(env_settings(env_text))} settings)")
    say(f"wrote {target.unit_path}")


def put_back(env_file: Path, previous: str | None) -> None:
    """The env file as it was before this install (none, if there was none), as far as can be."""
    with contextlib.suppress(OSError):  # the unit's own error is the one to report
        if previous is None:
            env_file.unlink(missing_ok=True)
        else:
            write_private_file(env_file, previous, 0o600)


def start_service(target: ServiceTarget, problems: list[str], say: Say) -> None:
    """Start it where systemd runs and it can start; otherwise print the commands to run."""
    commands = start_commands(target)
    for problem in problems:
        say(f"warning: the service cannot start: {problem}")
    if problems:
        say(f"not started (it would fail and restart every {RESTART_SEC} s); once {target.env_file} has them, run:")
    elif systemd_running(target):
        for command in commands:
            run_step(command, say)
        logs = "vramsupply service logs" + (" --user" if target.user_mode else "")
        say(f"{UNIT_NAME} is starting; follow it with: {logs} -f")
        return
    else:
        say("systemd is not running here; to start the service, run:")
    for command in commands:
        say("  " + shlex.join(command))


def install(target: ServiceTarget, say: Say) -> None:
    """Check everything, then write the env file and the unit, then start the service."""
    env_text = read_env_file(target, "install")
    warn_unknown_names(env_text, target.env_file, say)
    settings = service_settings(target.env_file, env_text)
    spec = unit_spec(target, settings)
    new_env_text = render_env_file(non_default_settings(settings), env_text)
    unit_text = render_unit(spec)
    verify_unit(unit_text, target.user_mode)
    check_destinations((target.env_file, target.unit_path), spec.writable_paths, target.user_mode)
    write_service_files(target, spec, new_env_text, unit_text, say)
    if target.user_mode:
        say("a user service stops when you log out unless lingering is on: loginctl enable-linger $USER")
    start_service(target, startup_problems(settings, target.env_file), say)


def passthrough(command: list[str]) -> int:
    """Run systemctl/journalctl on the user's terminal and hand back its exit status."""
    if shutil.which(command[0]) is None:
        raise ServiceError(f"{command[0]} not found: this system does not run systemd")
    return subprocess.run(command).returncode


def show(target: ServiceTarget, command: list[str], what: str) -> int:
    """``passthrough`` for `service status` and `service logs`, where the service manager runs.
    Where it does not (a container, WSL without systemd, no login session for --user), no service
    can run there, and systemctl's own "System has not been booted with systemd" or "Failed to
    connect to bus" would leave the provider to work that out: say so, as install does."""
    if manager_state(target) in MANAGER_UNREACHABLE:
        manager = "the systemd user manager (systemctl --user) is not running for this login" if target.user_mode else "systemd is not running here"
        raise ServiceError(
            f"{manager} (a container, WSL without systemd{', a shell opened with su or sudo' if target.user_mode else ''}), "
            f"so no {UNIT_NAME} runs and there is no {what} to show; run the agent in the foreground with `vramsupply serve`"
        )
    return passthrough(command)


def status_command(target: ServiceTarget) -> list[str]:
    return target.systemctl("status", UNIT_NAME)


def logs_command(target: ServiceTarget, follow: bool, lines: int | None) -> list[str]:
    unit = ["--user-unit", UNIT_NAME] if target.user_mode else ["--unit", UNIT_NAME]
    return ["journalctl", *unit, *(["--follow"] if follow else []), *([f"--lines={lines}"] if lines is not None else [])]
