"""The CPU code flags install.sh builds llama.cpp with: AMX left out where the compiler miscompiles
its tile setup (GCC 12 does, and llama.cpp then crashes on an AMX CPU), VRAMSUPPLY_CPU_FLAGS over
the probe, and pip given the flags and never a cached wheel built without them.

The machine is the one of test doubles from ``test_install_backend.py`` (its `Machine`), with a
compiler double whose probe program exits as each test tells it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from test_install_backend import INSTALL_SH, X86_LINUX, Machine, machine, system_bin  # noqa: F401  (machine, system_bin: the fixtures)


# A compiler double for the AMX probe: it "builds" the probe as a program that exits as told.
PROBE_CC = """#!/bin/sh
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = -o ]; then out=$2; shift; fi
  shift
done
printf '#!/bin/sh\\n{probe}\\n' > "$out" && chmod +x "$out"
"""
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


@pytest.mark.parametrize("probe", ["exit 1", "kill -SEGV $$"], ids=["config-not-as-written", "probe-crashes"])
def test_a_compiler_that_miscompiles_amx_tile_setup_builds_llama_cpp_without_amx(machine: Machine, probe: str) -> None:
    """GCC 12 drops the stores of an AMX tile configuration, and llama.cpp's AMX kernels then
    crash on the first quantized matrix product on an AMX CPU (seen on this project's machines)."""
    machine.tool("uname", X86_LINUX)
    machine.tool("cc", PROBE_CC.replace("{probe}", probe))

    result = machine.dry_run()

    assert result.returncode == 0, result.stderr
    assert f"vramsupply: CPU code flags: {AMX_OFF} (AMX left out: this compiler miscompiles" in result.stdout
    assert "Segmentation fault" not in result.stdout + result.stderr


def test_a_sound_compiler_or_a_cpu_without_amx_keeps_the_native_build(machine: Machine) -> None:
    machine.tool("uname", X86_LINUX)
    machine.tool("cc", PROBE_CC.replace("{probe}", "exit 0"))

    assert "CPU code flags" not in machine.dry_run().stdout


def test_vramsupply_cpu_flags_overrides_the_probe(machine: Machine) -> None:
    machine.tool("uname", X86_LINUX)
    machine.tool("cc", PROBE_CC.replace("{probe}", "exit 1"))

    assert "CPU code flags" not in machine.dry_run(env={"VRAMSUPPLY_CPU_FLAGS": ""}).stdout
    chosen = machine.dry_run(env={"VRAMSUPPLY_CPU_FLAGS": "-mno-avx512f"}).stdout
    assert "CPU code flags: -mno-avx512f (from VRAMSUPPLY_CPU_FLAGS)" in chosen


def build_llama_with_fake_pip(tmp_path: Path, cpu_flags: str) -> str:
    """Runs install.sh's build_llama for the CPU with a venv python double that records how its
    pip was run and the compiler flags it was given (and has no llama_cpp to import)."""
    record = tmp_path / "pip-call"
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    fake_python = venv_bin / "python"
    fake_python.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 1\necho "CFLAGS=$CFLAGS CXXFLAGS=$CXXFLAGS args=$*" > "{record}"\n')
    fake_python.chmod(0o755)
    script = f'. "{INSTALL_SH}"; venv="{tmp_path}/venv" data_dir="{tmp_path}" cpu_flags="{cpu_flags}"; plan_toolchain cpu; build_llama cpu'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return record.read_text()


def test_the_cpu_build_gets_the_flags_and_never_a_wheel_cached_without_them(tmp_path: Path) -> None:
    flagged = build_llama_with_fake_pip(tmp_path, AMX_OFF)
    assert f"CFLAGS={AMX_OFF} CXXFLAGS={AMX_OFF} " in flagged
    assert "--no-cache-dir" in flagged, "pip's wheel cache ignores CFLAGS: a cached wheel may have AMX on"

    plain = build_llama_with_fake_pip(tmp_path, "")
    assert "CFLAGS= CXXFLAGS= " in plain and "--no-cache-dir" not in plain

