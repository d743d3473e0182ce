"""What ``service install`` checks before it writes anything: that systemd itself accepts the unit,
and that the service could start at all (a service that fails at every start would be restarted
every few seconds forever).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vramsupply.config import EngineKind, Settings, env_name
from vramsupply.service.unit import UNIT_NAME, ServiceError
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
