"""Small CLI defects a review left over: what `serve --demo` does with the settings it replaces
when they come from the environment or the config file, and what `doctor` says about GPUs.

Each runs the real CLI in a child process. `serve --demo` is given a model file that does not
exist, so it ends (exit 1) right after the lines it says at start, before anything loads.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import run_cli

from vramsupply.config import write_config_values
from vramsupply.gpu.devices import build_has_gpu_backend

MISSING = "/nonexistent/model.gguf"
VENDOR_TOOLS = ("nvidia-smi", "rocminfo")


def demo_notes(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run `vramsupply serve --demo` with a missing model; the lines that say what it ignores."""
    result = run_cli("serve", "--demo", "--model", MISSING, *args, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.rstrip().endswith(f"error: model file {MISSING} does not exist"), result.stderr
    return [line.split(" WARNING vramsupply.serve: ", 1)[1] for line in result.stderr.splitlines() if "--demo ignores" in line]


# serve --demo with a daemon's settings in the environment or the config file


def test_the_demo_says_in_one_line_that_it_ignores_a_daemons_platform_settings_from_the_environment() -> None:
    """Before, the demo silently replaced them, while the same flags are refused with --demo."""
    notes = demo_notes(env={"VRAM_SUPPLY_NO_REGISTER": "1", "VRAM_SUPPLY_PLATFORM_URL": "https://platform.example.com"})

    assert notes == [
        "--demo ignores no_register (from env VRAM_SUPPLY_NO_REGISTER) and platform_url (from env VRAM_SUPPLY_PLATFORM_URL): "
        "the demo runs a platform of its own on this machine and registers with it; serve without --demo uses them"
    ]


def test_the_demo_names_the_config_file_for_settings_set_there_and_never_shows_the_key(config_file: Path) -> None:
    """The API key `login` stored is not named: every logged-in provider would get the line."""
    write_config_values(config_file, {"endpoint_url": "https://gpu.example.com", "api_key": "vs-secret-key-1234"})

    result = run_cli("serve", "--demo", "--model", MISSING)
    notes = [line for line in result.stderr.splitlines() if "--demo ignores" in line]

    assert len(notes) == 1, result.stderr
    assert notes[0].endswith(
        f"--demo ignores endpoint_url (from config file {config_file}): "
        "the demo runs a platform of its own on this machine and registers with it; serve without --demo uses it"
    )
    assert "vs-secret-key-1234" not in result.stderr


def test_the_demo_serves_the_bundled_model_not_one_the_environment_names_for_serving_for_real() -> None:
    """Before, VRAM_SUPPLY_MODEL=qwen/qwen3-8b made the demo download it, or fail offline."""
    with AgentProcess("--demo", "--port", "0", env={"VRAM_SUPPLY_MODEL": MISSING, "VRAM_SUPPLY_QUANT": "Q8_0"}) as agent:
        agent.wait_ready()
        assert agent.printed("vramsupply ready: serving stories260k")
        assert agent.stop(signal.SIGINT) == 0
    [note] = [line.split(" WARNING vramsupply.serve: ", 1)[1] for line in agent.stderr if "--demo ignores" in line]
    assert note == (
        "--demo ignores model (from env VRAM_SUPPLY_MODEL) and quant (from env VRAM_SUPPLY_QUANT): the demo runs a platform of its own "
        "on this machine and registers with it; it serves the bundled tiny model (--model serves another); serve without --demo uses them"
    )


def test_the_demo_says_nothing_of_settings_it_would_follow_anyway() -> None:
    """no_register = false asks for what the demo does (as --register is not refused)."""
    assert demo_notes(env={"VRAM_SUPPLY_NO_REGISTER": "false"}) == []
    assert demo_notes() == []


def test_serving_for_real_says_nothing_about_the_demo() -> None:
    result = run_cli("serve", "--model", MISSING, env={"VRAM_SUPPLY_NO_REGISTER": "1", "VRAM_SUPPLY_PLATFORM_URL": "https://platform.example.com"})
    assert result.returncode == 1 and "--demo" not in result.stderr, result.stderr


# doctor: what "no GPU" rests on, and a reinstall that works however vramsupply was installed

cpu_build_only = pytest.mark.skipif(build_has_gpu_backend(), reason="a GPU build's backend check reports its devices instead")


def path_with(tmp_path: Path, tools: dict[str, str]) -> str:
    """A PATH holding these stand-in vendor tools (name -> sh script body) and none of the real ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(0o755)
    real = [d for d in os.environ["PATH"].split(os.pathsep) if d and not any((Path(d) / t).exists() for t in VENDOR_TOOLS)]
    return os.pathsep.join([str(bin_dir), *real])


def doctor_checks(path: str) -> dict[str, dict[str, object]]:
    result = run_cli("doctor", "--json", env={"PATH": path, "VRAM_SUPPLY_NO_REGISTER": "true"})
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


@cpu_build_only
def test_doctor_says_no_vendor_tool_is_installed_instead_of_claiming_the_machine_has_no_gpu(tmp_path: Path) -> None:
    """Before: "CPU build, and no GPU on this machine", though only nvidia-smi and rocminfo are asked."""
    checks = doctor_checks(path_with(tmp_path, {}))

    assert checks["backend"]["detail"] == "CPU build; no GPU found (neither nvidia-smi nor rocminfo is installed)"
    assert checks["driver"]["detail"] == "no NVIDIA driver (nvidia-smi is not installed) and no AMD GPU listed (rocminfo); none is needed for the CPU build"


@cpu_build_only
def test_doctor_names_the_vendor_tools_that_listed_no_gpu(tmp_path: Path) -> None:
    no_nvidia = 'echo "No devices were found"; exit 6'
    assert doctor_checks(path_with(tmp_path, {"nvidia-smi": no_nvidia}))["backend"]["detail"] == (
        "CPU build; no GPU found (nvidia-smi -L lists none; rocminfo is not installed)"
    )
    assert doctor_checks(path_with(tmp_path, {"nvidia-smi": no_nvidia, "rocminfo": "exit 0"}))["backend"]["detail"] == (
        "CPU build; no GPU found (nvidia-smi -L and rocminfo list none)"
    )


@cpu_build_only
@pytest.mark.parametrize(
    ("tool", "listing", "backend"),
    [
        ("nvidia-smi", 'echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1)"', "cuda"),
        ("rocminfo", 'echo "  Name:                    gfx1100"', "hip"),
    ],
)
def test_a_gpu_the_cpu_build_cannot_use_gets_a_reinstall_that_works_without_a_checkout(tmp_path: Path, tool: str, listing: str, backend: str) -> None:
    """Before: "reinstall: sh install.sh", and whoever installed with curl ... | sh has no install.sh."""
    backend_check = doctor_checks(path_with(tmp_path, {tool: listing}))["backend"]

    assert backend_check["ok"] is False
    assert backend_check["fix"] == (
        f"reinstall for the GPU: curl -fsSL https://vram.supply/install.sh | sh -s -- --backend {backend} --strict "
        f"(in a checkout: sh install.sh --backend {backend} --strict); add --dry-run to see the plan first"
    )
