"""install.sh picks llama.cpp's backend from a working device, and `--dry-run` shows the plan.

Each test builds a machine out of test doubles: fake `nvidia-smi`, `nvcc`, `rocminfo`, `hipconfig`
and `uname` executables on a PATH that otherwise holds only the ordinary system tools (never the
real GPU tools of the machine running the tests). `--dry-run` installs nothing, so these are fast.
Here: NVIDIA GPUs and the CUDA toolchain; the other backends are in ``test_install_other_backends.py``,
the CPU code flags in ``test_install_cpu_flags.py`` (both use this file's `Machine`).

nvidia-smi asks the driver, and a driver in a bad state can keep it waiting for ever: the install
hung with it. Its double here sleeps instead of answering, and VRAMSUPPLY_NVIDIA_SMI_TIMEOUT=1
keeps the wait short; each such test checks that the sleeping nvidia-smi is gone when it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

INSTALL_SH = REPO / "install.sh"
GPU_TOOLS = {"nvidia-smi", "nvcc", "rocminfo", "hipconfig", "glslc", "xcrun", "ldconfig"}

NVIDIA_SMI = """#!/bin/sh
case "$*" in
  -L) {gpus} ;;
  *compute_cap*) {caps} ;;
  *) echo "| NVIDIA-SMI 550.54.14    Driver Version: 550.54.14    CUDA Version: {cuda}     |" ;;
esac
"""
BROKEN_NVIDIA_SMI = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
exit 9
"""
# A driver in a bad state: nvidia-smi never answers. Each call notes its pid and arguments first.
HUNG_NVIDIA_SMI = """#!/bin/sh
echo "$$ $*" >> "{calls}"
exec sleep 60
"""
# Like the real one: `--version` names the release, `--dryrun` shows where it really lives (links resolved).
NVCC = """#!/bin/sh
case "$*" in
  --version) echo "Cuda compilation tools, release {version}, V{version}.88" ;;
  *--dryrun*) echo "#$ _HERE_=$(dirname "$(readlink -f "$0")")" ;;
  *) echo "nvcc fatal   : this is a test double" >&2; exit 1 ;;
esac
"""
X86_LINUX = '#!/bin/sh\ncase "$1" in -s) echo Linux ;; -m) echo x86_64 ;; esac\n'


@pytest.fixture(scope="module")
def system_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The machine's ordinary tools (sh, sed, cc, cmake, python3, ...) without any GPU tool."""
    clean = tmp_path_factory.mktemp("system-bin")
    for folder in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = clean / entry.name
            if entry.name not in GPU_TOOLS and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return clean


class Machine:
    """A machine made of test doubles; `dry_run` runs install.sh --dry-run on it."""

    def __init__(self, root: Path, system_bin: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.system_bin = system_bin
        self.data_dir = root / "data"

    def tool(self, name: str, script: str, folder: Path | None = None) -> Path:
        path = (folder or self.bin) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        return path

    def nvidia_gpus(self, *names: str, cuda: str = "12.4", compute_cap: str = "8.6") -> None:
        gpus = "; ".join(f'echo "GPU {i}: {name} (UUID: GPU-{i}abc)"' for i, name in enumerate(names))
        caps = "; ".join(f'echo "{compute_cap}"' for _ in names)
        self.tool("nvidia-smi", NVIDIA_SMI.format(gpus=gpus, caps=caps, cuda=cuda))

    def cuda_toolkit(self, version: str, with_cublas: bool) -> Path:
        """A toolkit as nvcc's own tree: ROOT/bin/nvcc (on PATH), with or without cuBLAS."""
        root = self.root / f"cuda-{version}"
        self.tool("nvcc", NVCC.replace("{version}", version), root / "bin")
        (self.bin / "nvcc").symlink_to(root / "bin" / "nvcc")
        if with_cublas:
            (root / "include").mkdir()
            (root / "include" / "cublas_v2.h").write_text("")
            (root / "lib64").mkdir()
            (root / "lib64" / "libcublas.so").write_text("")
        return root

    def dry_run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["sh", str(INSTALL_SH), "--dry-run", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                "PATH": f"{self.bin}:{self.system_bin}",
                "HOME": str(self.root),
                "VRAMSUPPLY_DATA_DIR": str(self.data_dir),
                **(env or {}),
            },
        )
        assert not self.data_dir.exists(), "a dry run installs nothing"
        return result


@pytest.fixture
def machine(tmp_path: Path, system_bin: Path) -> Machine:
    return Machine(tmp_path, system_bin)


class HungNvidiaSmi:
    """The nvidia-smi of a driver in a bad state, on `machine`: what it was asked, and whether any
    of its calls still sleeps."""

    def __init__(self, machine: Machine) -> None:
        self.log = machine.root / "nvidia-smi-calls"
        machine.tool("nvidia-smi", HUNG_NVIDIA_SMI.format(calls=self.log))

    def calls(self) -> list[tuple[int, str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [(int(pid), args) for pid, _, args in (line.partition(" ") for line in lines)]

    def asked(self) -> list[str]:
        return [args for _, args in self.calls()]

    def still_sleeping(self) -> list[int]:
        return [pid for pid, _ in self.calls() if running(pid)]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def hung_nvidia_smi(machine: Machine) -> Iterator[HungNvidiaSmi]:
    hung = HungNvidiaSmi(machine)
    yield hung
    for pid in hung.still_sleeping():  # only after a failure: never leave a sleeper behind
        os.kill(pid, signal.SIGKILL)


A_SHORT_LIMIT = {"VRAMSUPPLY_NVIDIA_SMI_TIMEOUT": "1"}


def test_a_listed_nvidia_gpu_without_a_toolkit_gets_cuda_from_pypi_wheels_matched_to_the_driver(machine: Machine) -> None:
    machine.nvidia_gpus("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090", cuda="12.4", compute_cap="8.6")

    result = machine.dry_run()

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "vramsupply: llama.cpp backend: cuda (nvidia-smi lists 2 GPU(s): GPU 0: NVIDIA GeForce RTX 3090)" in out
    assert "CUDA 12.4 from NVIDIA's PyPI wheels" in out
    assert "nvidia-cuda-nvcc-cu12>=12.0,<12.5" in out and "nvidia-cublas-cu12>=12.0,<12.5" in out
    assert "nvidia-cuda-runtime-cu12>=12.0,<12.5" in out and "nvidia-cuda-cccl-cu12>=12.0,<12.5" in out
    assert f"in {machine.data_dir}/cuda-12.4, because no CUDA toolkit (nvcc) installed" in out
    assert "; architectures 86-real; no NVIDIA driver library here" in out, "both GPUs are 8.6: one architecture"
    assert "vramsupply: dry run: nothing was installed" in out


def test_a_broken_driver_means_cpu_and_says_why(machine: Machine) -> None:
    machine.tool("nvidia-smi", BROKEN_NVIDIA_SMI)

    result = machine.dry_run()

    assert result.returncode == 0, result.stderr
    assert "llama.cpp backend: cpu (nvidia-smi lists no GPU (NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." in result.stdout
    assert "toolchain: C/C++ compiler (" in result.stdout


def test_an_nvidia_smi_that_never_answers_is_given_up_on_and_the_install_goes_on_for_the_cpu(
    machine: Machine, hung_nvidia_smi: HungNvidiaSmi
) -> None:
    result = machine.dry_run(env=A_SHORT_LIMIT, timeout=20)

    assert result.returncode == 0, result.stderr
    assert "vramsupply: llama.cpp backend: cpu (nvidia-smi did not answer in 1 s; no usable GPU found)" in result.stdout
    assert "toolchain: C/C++ compiler (" in result.stdout
    assert hung_nvidia_smi.asked() == ["-L"], "asked once: a driver that hangs costs one limit, not one per question"
    assert hung_nvidia_smi.still_sleeping() == []


def test_cuda_asked_for_with_an_nvidia_smi_that_never_answers_plans_cuda_12_and_asks_nothing_more(
    machine: Machine, hung_nvidia_smi: HungNvidiaSmi
) -> None:
    result = machine.dry_run("--backend", "cuda", env=A_SHORT_LIMIT, timeout=20)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "toolchain: CUDA 12.9 from NVIDIA's PyPI wheels (nvidia-cuda-nvcc-cu12>=12.0,<12.10 " in out
    assert "; CUDA 12.9 because nvidia-smi did not answer in 1 s, so the driver's CUDA version is unknown" in out
    assert hung_nvidia_smi.asked() == [""], "the header did not come: the compute capabilities are not asked for"
    assert hung_nvidia_smi.still_sleeping() == []


@pytest.fixture(scope="module")
def system_bin_without_timeout(system_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ordinary tools less `timeout` (it is not everywhere: macOS has none)."""
    clean = tmp_path_factory.mktemp("system-bin-without-timeout")
    for entry in system_bin.iterdir():
        if entry.name != "timeout":
            (clean / entry.name).symlink_to(os.readlink(entry))
    return clean


def test_without_a_timeout_program_nvidia_smi_is_asked_as_before(tmp_path: Path, system_bin_without_timeout: Path) -> None:
    machine = Machine(tmp_path, system_bin_without_timeout)
    machine.nvidia_gpus("NVIDIA GeForce RTX 4090", cuda="12.4", compute_cap="8.9")

    result = machine.dry_run()

    assert result.returncode == 0, result.stderr
    assert "llama.cpp backend: cuda (nvidia-smi lists 1 GPU(s): GPU 0: NVIDIA GeForce RTX 4090)" in result.stdout
    assert "CUDA 12.4 from NVIDIA's PyPI wheels" in result.stdout and "architectures 89-real" in result.stdout


def test_nvcc_without_a_gpu_is_not_a_gpu(machine: Machine) -> None:
    machine.cuda_toolkit("13.0", with_cublas=False)

    result = machine.dry_run()

    assert "llama.cpp backend: cpu (no usable GPU found (nvcc alone is not a GPU))" in result.stdout


def test_backend_cuda_without_a_gpu_and_an_incomplete_toolkit_plans_wheels_for_the_portable_architectures(machine: Machine) -> None:
    root = machine.cuda_toolkit("13.0", with_cublas=False)

    result = machine.dry_run("--backend", "cuda")

    out = result.stdout
    assert "llama.cpp backend: cuda (asked for with --backend)" in out
    assert f"because the CUDA 13.0 toolkit in {root} has no cuBLAS" in out
    assert "nvidia-cuda-nvcc>=13.0,<13.1" in out and "nvidia-cublas>=13.0,<13.1" in out and "nvidia-cuda-crt>=13.0,<13.1" in out
    assert "architectures 75-virtual;80-virtual;86-real;89-real;90-virtual;120a-real (no GPU visible: the portable list)" in out
    assert "built without CUDA VMM" in out, "no libcuda here: the plan says what that costs"


def test_a_complete_system_toolkit_is_used_as_is(machine: Machine) -> None:
    machine.nvidia_gpus("NVIDIA RTX A6000", cuda="12.4", compute_cap="8.6")
    root = machine.cuda_toolkit("12.4", with_cublas=True)

    result = machine.dry_run()

    assert f"toolchain: system CUDA 12.4 toolkit in {root} (nvcc and cuBLAS); architectures 86-real" in result.stdout


def test_a_system_toolkit_newer_than_the_driver_is_not_used(machine: Machine) -> None:
    machine.nvidia_gpus("NVIDIA GeForce RTX 4090", cuda="12.2", compute_cap="8.9")
    machine.cuda_toolkit("13.0", with_cublas=True)

    result = machine.dry_run()

    assert "CUDA 12.2 from NVIDIA's PyPI wheels" in result.stdout
    assert "is newer than the driver supports (CUDA 12.2)" in result.stdout
    assert "architectures 89-real" in result.stdout


def test_a_gpu_older_than_turing_gets_cuda_12_even_on_a_cuda_13_driver(machine: Machine) -> None:
    machine.nvidia_gpus("NVIDIA GeForce GTX 1080", cuda="13.0", compute_cap="6.1")

    result = machine.dry_run()

    assert "CUDA 12.9 from NVIDIA's PyPI wheels" in result.stdout
    assert "architectures 61-real" in result.stdout


def test_a_driver_too_old_for_cuda_12_is_named_with_the_fix(machine: Machine) -> None:
    machine.nvidia_gpus("Tesla T4", cuda="11.4", compute_cap="7.5")

    result = machine.dry_run()

    assert "cannot build for cuda: the NVIDIA driver supports only CUDA 11.4; llama.cpp needs CUDA 12 or newer (update the driver); the CPU build would be installed instead" in result.stdout


def test_a_driver_too_old_for_cuda_12_plans_no_toolkit_it_cannot_run(machine: Machine) -> None:
    """The plan once named wheels for CUDA 11.4 (nvidia-cuda-nvcc-cu12>=12.0,<11.5: there are none)
    and the architectures to build with them, and then refused to build."""
    machine.nvidia_gpus("Tesla K80", cuda="11.4", compute_cap="3.7")

    result = machine.dry_run()

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "vramsupply: toolchain: none (CUDA 12 or newer needs a newer NVIDIA driver)" in lines
    assert not [line for line in lines if "wheels" in line or "<11.5" in line or "architectures" in line]
    assert "cannot build for cuda: the NVIDIA driver supports only CUDA 11.4;" in result.stdout


def test_a_driver_that_does_not_report_its_cuda_version_gets_cuda_12_wheels_not_the_system_nvccs(machine: Machine) -> None:
    """`CUDA Version: N/A` was read as no driver at all, so the wheels followed the nvcc on PATH:
    CUDA 13, which an older driver cannot run. CUDA 12 runs on every driver from 525 on."""
    machine.nvidia_gpus("NVIDIA GeForce RTX 3090", cuda="N/A", compute_cap="8.6")
    machine.cuda_toolkit("13.0", with_cublas=False)

    result = machine.dry_run()

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "toolchain: CUDA 12.9 from NVIDIA's PyPI wheels (nvidia-cuda-nvcc-cu12>=12.0,<12.10 " in out
    assert "nvidia-cuda-nvcc>=13" not in out
    assert "; CUDA 12.9 because the NVIDIA driver does not report its CUDA version (nvidia-smi: CUDA Version: N/A)" in out


def test_a_complete_system_toolkit_is_still_used_when_the_driver_does_not_report_its_cuda_version(machine: Machine) -> None:
    machine.nvidia_gpus("NVIDIA GeForce RTX 3090", cuda="N/A", compute_cap="8.6")
    root = machine.cuda_toolkit("13.0", with_cublas=True)

    result = machine.dry_run()

    assert (
        f"toolchain: system CUDA 13.0 toolkit in {root} (nvcc and cuBLAS); "
        "the NVIDIA driver does not report its CUDA version (nvidia-smi: CUDA Version: N/A); architectures 86-real"
    ) in result.stdout


def test_the_cuda_build_finds_cudart_and_cublas_of_a_toolkit_that_is_not_on_the_loader_path(tmp_path: Path) -> None:
    """A toolkit from PyPI lives in the data dir, where the loader never looks: its runtime libraries
    are linked beside llama.cpp's, whose RUNPATH is $ORIGIN (checked for real on the CUDA build, README)."""
    site = tmp_path / "site"
    (site / "llama_cpp" / "lib").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text("raise ImportError('libcublas.so.13: cannot open shared object file')\n")
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "lib").mkdir(parents=True)
    (toolkit / "lib64").symlink_to("lib")
    for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libnvvm.so.4"):
        (toolkit / "lib" / name).write_bytes(b"\x7fELF")
    script = f'. "{INSTALL_SH}" && link_cuda_runtime "{tmp_path / "venv"}" "{toolkit}"'
    subprocess.run(["sh", "-c", script], check=True, env={**os.environ, "VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY": "1"}, timeout=60)
    linked = {p.name: os.readlink(p) for p in (site / "llama_cpp" / "lib").iterdir()}
    assert linked == {name: str(toolkit / "lib64" / name) for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13")}


def test_an_unusable_tmpdir_beside_nvcc_is_said_not_a_silent_exit(machine: Machine) -> None:
    """Before, mktemp's own line and exit 1 ended even a dry run, with nothing of ours said."""
    machine.tool("uname", X86_LINUX)
    machine.cuda_toolkit("12.4", with_cublas=True)
    result = machine.dry_run("--backend", "cuda", env={"TMPDIR": str(machine.root / "no-such-dir")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot make a temporary folder" in result.stderr
    assert "dry run: nothing was installed" in result.stdout
