"""What ``service install`` checks before it writes anything: that systemd itself accepts the unit,
that every file and folder it will write can be written (a unit dir that is a file once failed
after the env file was written, with "File exists"), and that the service could start at all (a
service that fails at every start would be restarted every few seconds forever).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vramsupply.userpath import expand_user
from vramsupply.config import EngineKind, Settings, env_name
from vramsupply.gpu.options import GpuOptions
from vramsupply.hub.local import is_local_path, not_a_model_file
from vramsupply.service.unit import UNIT_NAME, ServiceError
from vramsupply.tunnel.tools import tunnel_tool
from vramsupply.upstream.launch import LaunchError, split_engine_args

VERIFY_TIMEOUT_SEC = 60


def verify_unit(text: str, user_mode: bool) -> None:
    """Where ``systemd-analyze`` exists, let systemd parse the unit before it is installed: a line
    it would ignore (and a service that then cannot start) fails the install, with nothing written."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    with tempfile.TemporaryDirectory(prefix="vramsupply-unit-") as scratch:
        unit = Path(scratch) / UNIT_NAME
        unit.write_text(text, encoding="utf-8")
        command = [tool, *(["--user"] if user_mode else []), "verify", "--man=no", str(unit)]
        env = {**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR") or scratch}
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT_SEC)
        except (OSError, subprocess.TimeoutExpired):
            return
    # Only what concerns this unit: a parse complaint ("<file>:<line>: ...") or an unusable command.
    complaints = [
        line.removeprefix(f"{unit}:") for line in result.stderr.splitlines()
        if line.startswith(f"{unit}:") or (line.startswith(f"{UNIT_NAME}: Command ") and "not executable" in line)
    ]
    if complaints:
        raise ServiceError(f"systemd-analyze verify rejects the unit (nothing was installed): line {complaints[0].strip()}")


def root_hint(command: str, user_mode: bool) -> str:
    """The hint about root only where it can help: a system service, not as root."""
    return "" if user_mode or os.geteuid() == 0 else f" (a system service needs root: sudo vramsupply service {command}, or use --user)"


def check_destinations(files: tuple[Path, ...], folders: tuple[Path, ...], user_mode: bool) -> None:
    """Refuse, before the first write, a destination that cannot be written: the files to write
    (env file, unit) and the folders the service writes to (made by the install when missing)."""
    places = [(path, "write", file_destination_problem(path)) for path in files]
    places += [(path, "create", folder_problem(path)) for path in folders]
    for path, action, problem in places:
        if problem is not None:  # a system service needs root to be installed whatever else is wrong
            raise ServiceError(f"cannot {action} {path}: {problem}{root_hint('install', user_mode)} (nothing was installed)")


def file_destination_problem(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (replaced beside itself and renamed, creating the
    folders above it), or None. Phrased to follow "cannot write <path>: "."""
    try:
        target = path.resolve() if path.is_symlink() else path
    except RuntimeError:  # Python 3.11's word for a link loop
        return f"{path} is a symbolic link that leads back to itself"
    if target.is_dir():
        return f"{path} is a directory, not a file"
    if target.exists() and not target.is_file():
        return f"{path} is not a regular file"
    return folder_problem(target.parent)


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold new files (it, or the nearest folder above it that exists, is no
    directory, or cannot be written), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # a path through a regular file does not exist either
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def startup_problems(settings: Settings, env_file: Path) -> list[str]:
    """What the service would fail on at every start, as doctor names it, with the line to add."""
    problems = []
    if settings.model is None and settings.engine is not EngineKind.upstream:
        problems.append(f"no model: add {env_name('model')}=org/model (or a .gguf path) to {env_file}")
    if settings.engine in (EngineKind.vllm, EngineKind.sglang):
        try:
            split_engine_args(settings.engine.value, settings.engine_args)
        except LaunchError as exc:
            problems.append(f"{exc}: change {env_name('engine_args')} in {env_file}")
    missing = _missing_model_file(settings)
    if missing is not None:
        problems.append(f"{missing}: change {env_name('model')} in {env_file}")
    if settings.tunnel and shutil.which(tunnel_tool(settings.tunnel).executable) is None:
        tool = tunnel_tool(settings.tunnel)
        problems.append(f"`{tool.executable}` is not installed or not on PATH. {tool.install_hint} Or change {env_name('tunnel')} in {env_file}")
    placement = GpuOptions.of(settings).placement_problem() if settings.engine is EngineKind.llama_cpp else None
    if placement is not None:
        problems.append(f"{placement}: change {env_name('devices')} (or {env_name('tensor_split')}) in {env_file}")
    if settings.no_register:
        return problems
    local_only = f"or {env_name('no_register')}=true to serve locally only"
    if settings.api_key is None or not settings.api_key.get_secret_value():
        problems.append(
            f"no API key: add {env_name('api_key')}=... to {env_file} (`vramsupply login` stores the key "
            f"for the user who ran it, which a service or sudo does not see), {local_only}"
        )
    if not settings.endpoint_url and not settings.tunnel:
        problems.append(
            f"no public endpoint URL: add {env_name('endpoint_url')}=https://your.host "
            f"(or {env_name('tunnel')}=cloudflared) to {env_file}, {local_only}"
        )
    return problems


def _missing_model_file(settings: Settings) -> str | None:
    """What is wrong with a local model path that is no file (as serve would say it), or None:
    the service would exit 1 at once, and be restarted every few seconds."""
    model = settings.model
    if settings.engine is not EngineKind.llama_cpp or not model or not is_local_path(model):
        return None
    path = expand_user(model)
    return None if path.is_file() else not_a_model_file(path)
