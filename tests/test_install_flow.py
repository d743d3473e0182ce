"""install.sh's whole run, in seconds: the Python it finds and the venv it makes are test doubles
that record how pip was called (and "build" llama-cpp-python by touching a file), on a machine made
of test doubles (``test_install_backend.Machine``). The real install is in ``test_install.py``.

Found by an audit: a --version PyPI lacks was only refused after the long llama.cpp build; an
upgrade ran pip without the GPU build's CMAKE_ARGS, so a release needing a newer llama-cpp-python
would have replaced a CUDA build with a CPU one, silently; `--dev --version X` asked pip for the
invalid `vramsupply==X[dev]`; `curl ... | sh -s -- --help` printed nothing; a CUDA toolkit copy
that failed (a full disk) was installed as if complete.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from test_install_backend import INSTALL_SH, Machine, system_bin  # noqa: F401  (system_bin: the fixture)

# The venv's python: pip records its arguments and the build's environment; "building"
# llama-cpp-python (pip install -v) makes it importable.
VENV_PYTHON = """#!/bin/sh
echo "python $* | CMAKE_ARGS=${CMAKE_ARGS-}" >> "$FAKE_LOG"
case "$*" in
  "-c import llama_cpp") [ -e "$FAKE_STATE/llama" ]; exit $? ;;
  *"install --dry-run"*)
    if [ -e "$FAKE_STATE/no-such-release" ]; then
      echo "ERROR: Could not find a version that satisfies the requirement vramsupply==999.0 (from versions: 0.1.0)"
      echo "ERROR: No matching distribution found for vramsupply==999.0"
      exit 1
    fi ;;
  *"install -v"*) touch "$FAKE_STATE/llama" ;;
  *"--target"*)
    while [ "$1" != --target ]; do shift; done
    mkdir -p "$2/nvidia/cublas/lib" "$2/nvidia/cublas/include" "$2/nvidia/cuda_nvcc/bin"
    : > "$2/nvidia/cublas/lib/libcublas.so.12"; : > "$2/nvidia/cublas/include/cublas_v2.h" ;;
esac
exit 0
"""

# The system's Python (found first, as python3.13): answers install.sh's checks, makes the venv double.
SYSTEM_PYTHON = """#!/bin/sh
case "$*" in
  "-m venv "*)
    venv=$3
    mkdir -p "$venv/bin"
    cp "$FAKE_VENV_PYTHON" "$venv/bin/python"
    printf '#!/bin/sh\\necho "vramsupply 9.9.9"\\n' > "$venv/bin/vramsupply"
    chmod +x "$venv/bin/python" "$venv/bin/vramsupply" ;;
esac
exit 0
"""


class InstallMachine(Machine):
    def __init__(self, root: Path, tools: Path) -> None:
        super().__init__(root, tools)
        self.state = root / "state"
        self.state.mkdir()
        self.log = root / "pip.log"
        venv_python = self.tool("venv-python", VENV_PYTHON, root / "doubles")
        self.tool("python3.13", SYSTEM_PYTHON)
        self.env = {
            "PATH": f"{self.bin}:{tools}", "HOME": str(root), "FAKE_LOG": str(self.log), "FAKE_STATE": str(self.state),
            "FAKE_VENV_PYTHON": str(venv_python), "VRAMSUPPLY_DATA_DIR": str(self.data_dir),
            "VRAMSUPPLY_BIN_DIR": str(root / "links"), "VRAMSUPPLY_CPU_FLAGS": "",
        }

    def install(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=120, env={**self.env, **(env or {})})

    def pip_calls(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " -m pip " in line] if self.log.exists() else []


@pytest.fixture
def machine(tmp_path: Path, system_bin: Path) -> InstallMachine:  # noqa: F811
    return InstallMachine(tmp_path, system_bin)


def test_a_version_pypi_does_not_have_is_refused_before_the_llama_cpp_build(machine: InstallMachine) -> None:
    (machine.state / "no-such-release").touch()

    result = machine.install("--version", "999.0", "--backend", "cpu")

    assert result.returncode == 1
    assert result.stderr.strip() == "vramsupply: error: cannot install vramsupply==999.0 from PyPI: No matching distribution found for vramsupply==999.0"
    assert "building llama-cpp-python" not in result.stdout
    assert not any("install -v" in call for call in machine.pip_calls())


def test_dev_extras_of_a_release_are_asked_for_as_pip_reads_them(machine: InstallMachine) -> None:
    result = machine.install("--dev", "--version", "1.2.3", "--backend", "cpu")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "installing vramsupply[dev]==1.2.3 from PyPI" in result.stdout
    assert machine.pip_calls()[-1].split(" | ")[0].endswith("install --quiet --upgrade vramsupply[dev]==1.2.3")


def test_an_upgrade_installs_the_new_release_with_the_gpu_builds_environment(machine: InstallMachine) -> None:
    """The second run does not rebuild llama.cpp, but pip may, for a release that needs a newer
    llama-cpp-python: it must then build for CUDA, from no cached CPU wheel."""
    machine.nvidia_gpus("NVIDIA H100 80GB HBM3", cuda="12.4", compute_cap="9.0")
    machine.cuda_toolkit("12.4", with_cublas=True)
    first = machine.install("--version", "1.0.0")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (machine.data_dir / "backend").read_text() == "cuda\n"

    second = machine.install("--version", "1.1.0")

    assert second.returncode == 0, second.stdout + second.stderr
    assert "building llama-cpp-python" not in second.stdout
    upgrade = machine.pip_calls()[-1]
    assert "install --quiet --upgrade --no-cache-dir vramsupply==1.1.0" in upgrade
    assert "CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real" in upgrade


def test_help_works_when_the_script_is_piped_to_sh(machine: InstallMachine) -> None:
    piped = subprocess.run(["sh", "-s", "--", "--help"], stdin=INSTALL_SH.open(), capture_output=True, text=True, timeout=30, env=machine.env)

    assert piped.returncode == 0
    assert piped.stdout.startswith("vramsupply installer: curl -fsSL https://vram.supply/install.sh | sh")
    assert "--uninstall [--purge]" in piped.stdout and "VRAMSUPPLY_BIN_DIR" in piped.stdout


def test_a_cuda_toolkit_copy_that_fails_on_a_full_disk_is_a_failure_not_a_toolkit(machine: InstallMachine) -> None:
    machine.tool("cp", "#!/bin/sh\necho \"cp: error writing '$3': No space left on device\" >&2\nexit 1\n")
    venv = machine.root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(machine.root / "doubles" / "venv-python")
    cuda_root = machine.data_dir / "cuda-12.4"
    script = (
        f'. "{INSTALL_SH}"; venv="{venv}" cuda_root="{cuda_root}" cuda_version=12.4 cuda_wheels=nvidia-cublas-cu12; '
        'mkdir -p "$(dirname "$cuda_root")"; if install_cuda_wheels; then echo "installed"; else echo "failed: $failure"; fi'
    )
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                            env={**machine.env, "VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY": "1"})

    assert result.returncode == 0, result.stderr
    assert "failed: could not put the CUDA toolkit together in" in result.stdout
    assert "No space left on device" in result.stdout
    assert not cuda_root.exists(), "nothing a later run would take for a complete toolkit"
    assert os.listdir(machine.data_dir) == ["cuda-12.4.partial"]
