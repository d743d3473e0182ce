"""`sh install.sh --uninstall --purge` takes what vramsupply wrote and nothing else; the options
that name what to install are refused when they contradict each other or are empty.

Found by a review: the purge rm -rf'ed the agent's data dir (for a user, also the install's data
dir, where a provider may keep files of their own) and config dir; as root it left the system
service's /var/lib/vramsupply, /var/cache/vramsupply and `vramsupply` user, and never reached them
at all once the unit file was gone; `--version X --from PATH` installed PATH and ignored X, silently;
`--backend ''` fell back to detection, silently. Same machine of test doubles as test_install_flow.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from test_install_backend import INSTALL_SH, system_bin  # noqa: F401  (system_bin: the fixture)
from test_install_flow import InstallMachine, said

AGENT_FILES = (
    "endpoint_token", "registration.json", "ledger.sqlite3", "ledger.sqlite3-wal", "bench.json", "agent.lock", ".endpoint_token.k3x9_a1",
    "ledger.sqlite3.damaged-20261206T101500Z", "ledger.sqlite3.damaged-20261206T101500Z-wal",  # a damaged ledger the agent moved aside
)


@pytest.fixture
def machine(tmp_path: Path, system_bin: Path) -> InstallMachine:  # noqa: F811
    return InstallMachine(tmp_path, system_bin)


def install_sh_list(name: str) -> set[str]:
    found = re.search(rf'^{name}="([^"]*)"$', INSTALL_SH.read_text(), re.MULTILINE)
    assert found, f"install.sh defines {name}"
    return set(found.group(1).split())


def test_the_purge_list_names_every_file_the_agent_writes_in_its_data_dir() -> None:
    """A module that keeps a file in data_dir() names it in a *_FILE_NAME constant: each must be in
    install.sh's list, or a purge would leave it (and the data dir) behind."""
    written = set()
    for module in (REPO / "vramsupply").rglob("*.py"):
        text = module.read_text()
        if "data_dir()" in text:
            written |= set(re.findall(r'^[A-Z_]+_FILE_NAME = "([^"]+)"', text, re.MULTILINE))
    assert {"endpoint_token", "registration.json", "ledger.sqlite3", "bench.json", "agent.lock"} <= written, "the scan finds them"
    listed = install_sh_list("AGENT_DATA_FILES")
    assert written <= listed
    assert {f"ledger.sqlite3{suffix}" for suffix in ("-wal", "-shm", "-journal")} <= listed, "SQLite's files beside the ledger"
    assert install_sh_list("AGENT_CONFIG_FILES") == {"config.toml"}


def a_user_with_files_of_their_own(machine: InstallMachine) -> tuple[Path, Path]:
    """A user's install in the default places: the install's data dir is the agent's data dir."""
    agent_data = machine.root / ".local" / "share" / "vramsupply"
    machine.env["VRAMSUPPLY_DATA_DIR"] = str(agent_data)
    machine.tool("id", "#!/bin/sh\necho 1000\n")
    installed = machine.install("--backend", "cpu")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for name in AGENT_FILES:
        (agent_data / name).write_text("the agent's")
    (agent_data / "my-notes.txt").write_text("the provider's own")
    (agent_data / "my-models").mkdir()
    (agent_data / "my-models" / "tuned.gguf").write_text("the provider's own")
    config = machine.root / ".config" / "vramsupply"
    config.mkdir(parents=True)
    (config / "config.toml").write_text('quant = "Q8_0"\n')
    (config / ".config.toml.p2z8x1f0").write_text("a write cut short")
    (config / "README.txt").write_text("the provider's own")
    return agent_data, config


def test_a_purge_removes_the_agents_files_and_keeps_the_providers_own(machine: InstallMachine) -> None:
    agent_data, config = a_user_with_files_of_their_own(machine)
    before = machine.files()

    dry = machine.install("--uninstall", "--purge", "--dry-run")

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert machine.files() == before
    ours = {str(agent_data / name) for name in (*AGENT_FILES, "venv", "backend", "build-cpu.log")}
    ours |= {str(config / "config.toml"), str(config / ".config.toml.p2z8x1f0"), str(machine.root / "links" / "vramsupply")}
    assert said(dry.stdout, "would remove") == ours, "exactly the agent's and installer's files, not the folders"
    assert f"vramsupply: would keep {agent_data}: it holds files this installer did not write" in dry.stdout
    assert f"vramsupply: would keep {config}: it holds files vramsupply did not write" in dry.stdout

    real = machine.install("--uninstall", "--purge")

    assert real.returncode == 0, real.stdout + real.stderr
    assert said(real.stdout, "removed") == ours
    assert sorted(path.name for path in agent_data.iterdir()) == ["my-models", "my-notes.txt"]
    assert (agent_data / "my-models" / "tuned.gguf").read_text() == "the provider's own"
    assert [path.name for path in config.iterdir()] == ["README.txt"]


def as_root(machine: InstallMachine, script: str) -> subprocess.CompletedProcess[str]:
    """install.sh's functions as root, with the system service's places moved into the machine."""
    system = machine.root / "system"
    places = (
        f'service_unit() {{ echo "{system}/vramsupply.service"; }}; service_env_file() {{ echo "{system}/etc/env"; }}; '
        f'service_state_dir() {{ echo "{system}/lib/vramsupply"; }}; service_cache_dir() {{ echo "{system}/cache/vramsupply"; }}; '
        "service_user_ours() { true; }; "
    )
    return subprocess.run(["sh", "-c", f'. "{INSTALL_SH}"; {places}{script}'], capture_output=True, text=True, timeout=120,
                          env={**machine.env, "VRAMSUPPLY_INSTALL_FUNCTIONS_ONLY": "1"})


def test_a_root_purge_reaches_the_services_data_and_user_when_its_unit_is_already_gone(machine: InstallMachine) -> None:
    machine.tool("id", "#!/bin/sh\necho 0\n")
    installed = machine.install("--backend", "cpu")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    system = machine.root / "system"
    for left in ("etc/env", "lib/vramsupply/endpoint_token", "cache/vramsupply/huggingface/model.gguf"):
        (system / left).parent.mkdir(parents=True, exist_ok=True)
        (system / left).write_text("left by the service")
    before = machine.files()

    dry = as_root(machine, "main --uninstall --purge --dry-run")

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert machine.files() == before and machine.agent_calls() == []
    for line in (
        "would remove what the systemd service left (vramsupply service uninstall --purge)",
        f"would remove the service's settings in {system}/etc/env",
        f"would remove {system}/lib/vramsupply",
        f"would remove {system}/cache/vramsupply",
        "would remove the system user vramsupply (not while a process of it runs)",
    ):
        assert f"vramsupply: {line}" in dry.stdout.splitlines()

    real = as_root(machine, "main --uninstall --purge")

    assert real.returncode == 0, real.stdout + real.stderr
    assert machine.agent_calls() == ["vramsupply service uninstall --purge", "vramsupply models rm --all --yes"]


def test_a_root_purge_leaves_another_installs_service_alone(machine: InstallMachine) -> None:
    machine.tool("id", "#!/bin/sh\necho 0\n")
    assert machine.install("--backend", "cpu").returncode == 0
    (machine.root / "system").mkdir()
    (machine.root / "system" / "vramsupply.service").write_text("[Service]\nExecStart=/opt/other/venv/bin/vramsupply serve\n")
    (machine.root / "system" / "lib" / "vramsupply").mkdir(parents=True)

    real = as_root(machine, "main --uninstall --purge")

    assert real.returncode == 0, real.stdout + real.stderr
    assert machine.agent_calls() == ["vramsupply models rm --all --yes"]
    assert (machine.root / "system" / "lib" / "vramsupply").exists()


def test_version_and_from_together_are_refused_before_anything_is_done(machine: InstallMachine) -> None:
    for args, env, named in (
        (("--version", "1.2.3", "--from", str(REPO)), {}, f"--version 1.2.3 and --from {REPO}"),
        ((), {"VRAMSUPPLY_VERSION": "1.2.3", "VRAMSUPPLY_FROM": str(REPO)}, f"VRAMSUPPLY_VERSION 1.2.3 and VRAMSUPPLY_FROM {REPO}"),
        (("--version", "1.2.3"), {"VRAMSUPPLY_FROM": str(REPO)}, f"--version 1.2.3 and VRAMSUPPLY_FROM {REPO}"),
    ):
        result = machine.install(*args, "--backend", "cpu", env=env)

        assert result.returncode == 1
        assert result.stderr.splitlines() == [f"vramsupply: error: {named} name two things to install: give one of them; nothing was done"]
        assert not machine.data_dir.exists() and machine.pip_calls() == []


def test_a_version_alone_from_the_checkout_installs_that_release_from_pypi(machine: InstallMachine) -> None:
    """install.sh run from a checkout installs the checkout, unless a --version is asked for."""
    result = machine.install("--dry-run", "--version", "1.2.3", "--backend", "cpu")

    assert result.returncode == 0, result.stderr
    assert f"would install vramsupply==1.2.3 from PyPI into {machine.data_dir}/venv" in result.stdout


def test_an_empty_backend_option_is_refused_and_an_empty_backend_variable_means_detect(machine: InstallMachine) -> None:
    refused = machine.install("--backend", "")

    assert refused.returncode == 1
    assert refused.stderr.splitlines() == ["vramsupply: error: --backend needs cpu, cuda, hip, metal or vulkan (leave it out to detect the GPU)"]
    assert not machine.data_dir.exists() and machine.pip_calls() == []

    detected = machine.install("--dry-run", env={"VRAMSUPPLY_BACKEND": ""})

    assert detected.returncode == 0, detected.stderr
    assert "vramsupply: llama.cpp backend: cpu (no usable GPU found)" in detected.stdout


def test_an_empty_version_or_from_is_refused(machine: InstallMachine) -> None:
    for option in ("--version", "--from"):
        result = machine.install(option, "", "--backend", "cpu")

        assert result.returncode == 1
        assert result.stderr.startswith(f"vramsupply: error: {option} needs a ")
        assert not machine.data_dir.exists()
