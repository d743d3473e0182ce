"""install.sh's backends besides CUDA: hip for an AMD GPU, metal on Apple Silicon, vulkan when asked
for, and what `--backend` and `--strict` refuse.

The machine is the one of test doubles from ``test_install_backend.py`` (its `Machine`), and each
run is a `--dry-run` but the --strict one, which must stop before it installs anything.
"""

from __future__ import annotations

import subprocess

from test_install_backend import INSTALL_SH, Machine, machine, system_bin  # noqa: F401  (machine, system_bin: the fixtures)


def test_an_amd_gpu_listed_by_rocminfo_gets_hip_for_its_target(machine: Machine) -> None:
    machine.tool("rocminfo", "#!/bin/sh\nprintf '  Name:                    AMD EPYC 7B13\\n  Name:                    gfx1100\\n'\n")
    machine.tool("hipconfig", '#!/bin/sh\ncase "$1" in -R) echo /opt/rocm ;; -l) echo /opt/rocm/llvm/bin ;; esac\n')

    result = machine.dry_run()

    assert "llama.cpp backend: hip (rocminfo lists AMD GPU(s): gfx1100)" in result.stdout
    assert "toolchain: ROCm HIP in /opt/rocm (clang /opt/rocm/llvm/bin/clang); targets gfx1100" in result.stdout
    assert "cannot build" not in result.stdout


def test_an_amd_gpu_without_the_hip_sdk_names_what_to_install(machine: Machine) -> None:
    machine.tool("rocminfo", "#!/bin/sh\necho '  Name:                    gfx90a'\n")

    result = machine.dry_run()

    assert "cannot build for hip: hipconfig not found: install the ROCm HIP SDK" in result.stdout


def test_apple_silicon_gets_metal(machine: Machine) -> None:
    machine.tool("uname", '#!/bin/sh\ncase "$1" in -s) echo Darwin ;; -m) echo arm64 ;; esac\n')
    machine.tool("xcrun", "#!/bin/sh\nexit 0\n")

    result = machine.dry_run()

    assert "llama.cpp backend: metal (Apple Silicon)" in result.stdout
    assert "toolchain: Apple clang and the Metal framework" in result.stdout


def test_vulkan_is_an_option_and_needs_its_shader_compiler(machine: Machine) -> None:
    result = machine.dry_run("--backend", "vulkan")
    assert "llama.cpp backend: vulkan (asked for with --backend)" in result.stdout
    assert "cannot build for vulkan: glslc not found" in result.stdout

    machine.tool("glslc", "#!/bin/sh\nexit 0\n")
    assert "cannot build" not in machine.dry_run("--backend", "vulkan").stdout


def test_strict_stops_before_installing_anything_when_the_gpu_toolchain_is_missing(machine: Machine) -> None:
    result = subprocess.run(
        ["sh", str(INSTALL_SH), "--backend", "vulkan", "--strict"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{machine.bin}:{machine.system_bin}", "HOME": str(machine.root), "VRAMSUPPLY_DATA_DIR": str(machine.data_dir)},
    )

    assert result.returncode == 1
    assert "vramsupply: error: cannot build for vulkan: glslc not found" in result.stderr
    assert not machine.data_dir.exists()


def test_an_unknown_backend_is_refused(machine: Machine) -> None:
    result = machine.dry_run("--backend", "tpu")
    assert result.returncode == 1
    assert "unknown backend 'tpu' (expected cpu, cuda, hip, metal or vulkan)" in result.stderr

