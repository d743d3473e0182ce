"""install.sh's whole run, in seconds: the Python it finds and the venv it makes are test doubles
that record how pip was called (and "build" llama-cpp-python by touching a file), on a machine made
of test doubles (``test_install_backend.Machine``). The real install is in ``test_install.py``.

Found by an audit: a --version PyPI lacks was only refused after the long llama.cpp build; an
upgrade ran pip without the GPU build's CMAKE_ARGS, so a release needing a newer llama-cpp-python
would have replaced a CUDA build with a CPU one, silently; `--dev --version X` asked pip for the
invalid `vramsupply==X[dev]`; `curl ... | sh -s -- --help` printed nothing; a CUDA toolkit copy
that failed (a full disk) was installed as if complete. A later audit: `--uninstall --dry-run`
uninstalled for real, and with `--purge` deleted the user's configuration and downloaded models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_install_backend import INSTALL_SH, Machine, system_bin  # noqa: F401  (system_bin: the fixture)
from test_install_python import a_python

# The venv's python: pip records its arguments and the build's environment; "building"
# llama-cpp-python (pip install -v) makes it importable.
VENV_PYTHON = """#!/bin/sh
case "$*" in *rich.filesize*) exec "$FAKE_REAL_PYTHON" "$@" ;; esac  # uninstall sums the models' sizes (read only: not logged)
case "$*" in *lock_holder*) cat "$FAKE_STATE/agent-pid" 2>/dev/null; exit 0 ;; esac  # the pid of an agent serving (read only)
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

# The installed agent: logs what it is asked; `service uninstall` removes what the real one would
# of a user's service (its unit; with --purge the env file the unit names), and says it likewise.
VENV_AGENT = """#!/bin/sh
if [ "$*" = "models list --json" ]; then cat "$FAKE_STATE/models.json" 2>/dev/null || echo "[]"; exit 0; fi  # read only: not logged
echo "vramsupply $*" >> "$FAKE_LOG"
case "$*" in
  --version) echo "vramsupply 9.9.9" ;;
  "service uninstall"*)
    unit="$HOME/.config/systemd/user/vramsupply.service"
    env_file=$(sed -n 's/^EnvironmentFile=//p' "$unit" 2>/dev/null)
    rm "$unit" && echo "removed $unit"
    case "$*" in *--purge*) rm "${env_file:-$HOME/.config/vramsupply/env}" && echo "removed ${env_file:-$HOME/.config/vramsupply/env}" ;; esac ;;
esac
exit 0
"""

# The system's Python (found first, as python3.13): answers install.sh's checks, makes the venv double
# (and logs that it did).
SYSTEM_PYTHON = """#!/bin/sh
case "$*" in
  "-m venv --help") ;;
  "-m venv "*)
    venv=$3
    echo "$0 made the venv" >> "$FAKE_LOG"
    mkdir -p "$venv/bin"
    cp "$FAKE_VENV_PYTHON" "$venv/bin/python"
    cp "$FAKE_VENV_AGENT" "$venv/bin/vramsupply"
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
        venv_agent = self.tool("venv-agent", VENV_AGENT, root / "doubles")
        self.tool("python3.13", SYSTEM_PYTHON)
        self.env = {
            "PATH": f"{self.bin}:{tools}", "HOME": str(root), "FAKE_LOG": str(self.log), "FAKE_STATE": str(self.state),
            "FAKE_VENV_PYTHON": str(venv_python), "FAKE_VENV_AGENT": str(venv_agent), "VRAMSUPPLY_DATA_DIR": str(self.data_dir),
            "VRAMSUPPLY_BIN_DIR": str(root / "links"), "VRAMSUPPLY_CPU_FLAGS": "", "FAKE_REAL_PYTHON": sys.executable,
        }

    def install(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=120, env={**self.env, **(env or {})})

    def venv_made_by(self) -> list[str]:
        """Which system Pythons made the venv."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line.removesuffix(" made the venv") for line in lines if line.endswith(" made the venv")]

    def pip_calls(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " -m pip " in line] if self.log.exists() else []

    def agent_calls(self) -> list[str]:
        """What the installed `vramsupply` was asked to do (its --version aside)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if line.startswith("vramsupply ") and line != "vramsupply --version"]

    def files(self) -> dict[str, str]:
        """Every path under the machine's root, with a file's text or a link's target."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_symlink():
                found[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[str(path)] = path.read_text(errors="replace")
            else:
                found[str(path)] = "folder"
        return found


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


def installed_with_settings(machine: InstallMachine) -> dict[str, Path]:
    """A user's install: the agent, its user service, configuration, endpoint token and registration."""
    machine.tool("id", "#!/bin/sh\necho 1000\n")  # a user, not root: the service and folders are the user's
    installed = machine.install("--backend", "cpu")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    home = machine.root
    places = {
        "link": home / "links" / "vramsupply", "venv": machine.data_dir / "venv", "backend": machine.data_dir / "backend",
        "build log": machine.data_dir / "build-cpu.log", "config": home / ".config" / "vramsupply",
        "agent data": home / ".local" / "share" / "vramsupply", "unit": home / ".config" / "systemd" / "user" / "vramsupply.service",
    }
    places["config"].mkdir(parents=True)
    (places["config"] / "config.toml").write_text('quant = "Q8_0"\n')
    (places["config"] / "service.env").write_text("VRAM_SUPPLY_MODEL=org/model\n")
    places["agent data"].mkdir(parents=True)
    (places["agent data"] / "endpoint_token").write_text("token")
    (places["agent data"] / "registration.json").write_text("{}")
    places["unit"].parent.mkdir(parents=True)
    places["unit"].write_text(f"[Service]\nExecStart={places['venv']}/bin/vramsupply serve\nEnvironmentFile={places['config']}/service.env\n")
    return places


def said(output: str, prefix: str) -> set[str]:
    return {line.removeprefix(f"vramsupply: {prefix} ") for line in output.splitlines() if line.startswith(f"vramsupply: {prefix} /")}


@pytest.mark.parametrize("purge", [False, True], ids=["uninstall", "purge"])
def test_an_uninstall_dry_run_names_each_path_it_would_remove_and_changes_nothing(machine: InstallMachine, purge: bool) -> None:
    places = installed_with_settings(machine)
    before = machine.files()
    purge_flag = ["--purge"] if purge else []

    dry = machine.install("--uninstall", *purge_flag, "--dry-run")

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert machine.files() == before, "a dry run removes nothing"
    assert machine.agent_calls() == [], "nor asks the agent to remove its service or models"
    assert dry.stdout.splitlines()[-1] == "vramsupply: dry run: nothing was removed"
    would = said(dry.stdout, "would remove")
    assert {str(places[name]) for name in ("link", "venv", "backend", "build log")} | {str(machine.data_dir)} <= would
    assert str(places["agent data"] / "registration.json") in would
    assert f"would stop and disable the systemd service and remove {places['unit']} (vramsupply service uninstall --user{' --purge' if purge else ''})" in dry.stdout
    if purge:
        assert {str(places["config"]), str(places["agent data"])} <= would
        assert "vramsupply: would remove every downloaded model (vramsupply models rm --all --yes)" in dry.stdout
        assert f"vramsupply: would remove the service's settings in {places['config']}/service.env" in dry.stdout
    else:
        assert str(places["config"]) not in would and "models rm" not in dry.stdout
        assert f"would keep configuration ({places['config']}, endpoint token) and downloaded models" in dry.stdout

    real = machine.install("--uninstall", *purge_flag)

    assert real.returncode == 0, real.stdout + real.stderr
    assert said(real.stdout, "removed") == would, "the dry run named exactly what the uninstall removes"
    assert not any(Path(path).exists() for path in would)
    expected_calls = ["vramsupply service uninstall --user --purge", "vramsupply models rm --all --yes"] if purge else ["vramsupply service uninstall --user"]
    assert machine.agent_calls() == expected_calls


def test_a_plain_uninstall_says_which_downloaded_models_it_keeps_and_their_size(machine: InstallMachine) -> None:
    places = installed_with_settings(machine)
    (machine.state / "models.json").write_text(json.dumps([{"model_id": "a/b", "on_disk": 5_000_000_000}, {"model_id": "c/d", "on_disk": 400_000_000}]))

    result = machine.install("--uninstall")

    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"vramsupply: kept configuration ({places['config']}, endpoint token) and downloaded models (2 models, 5.4 GB on disk); "
        "use --uninstall --purge to remove them too"
    ) in result.stdout.splitlines()


@pytest.mark.parametrize("value", ["1", "true"])
def test_vramsupply_uninstall_in_the_environment_uninstalls_as_the_option_does(machine: InstallMachine, value: str) -> None:
    """For `curl … | VRAMSUPPLY_UNINSTALL=1 sh`, where options are awkward to pass."""
    places = installed_with_settings(machine)

    result = machine.install(env={"VRAMSUPPLY_UNINSTALL": value})

    assert result.returncode == 0, result.stdout + result.stderr
    assert not places["venv"].exists() and not places["link"].exists()
    assert "not an installer setting" not in result.stderr


def test_a_vramsupply_uninstall_value_that_says_nothing_clear_is_refused(machine: InstallMachine) -> None:
    places = installed_with_settings(machine)

    result = machine.install(env={"VRAMSUPPLY_UNINSTALL": "maybe"})

    assert result.returncode == 1
    assert result.stderr.strip() == "vramsupply: error: VRAMSUPPLY_UNINSTALL=maybe: set it to 1 to uninstall, or leave it unset"
    assert places["venv"].exists()


def test_an_upgrade_says_that_an_agent_still_running_the_old_version_needs_a_restart(machine: InstallMachine) -> None:
    """It imports lazily, so an agent left running may even mix the two versions' modules."""
    first = machine.install("--backend", "cpu")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "still runs" not in first.stdout, "a fresh install has no agent of an older version"
    (machine.state / "agent-pid").write_text("4242\n")

    upgrade = machine.install("--backend", "cpu")

    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert (
        "vramsupply: an agent started before this upgrade (pid 4242) still runs vramsupply 9.9.9: stop it (Ctrl-C, or kill 4242) "
        "and start it again to use the new version"
    ) in upgrade.stdout.splitlines()


def test_purge_without_uninstall_is_refused_before_anything_is_installed(machine: InstallMachine) -> None:
    result = machine.install("--purge", "--backend", "cpu")

    assert result.returncode == 1
    assert result.stderr.strip() == "vramsupply: error: --purge goes with --uninstall (sh install.sh --uninstall --purge); nothing was done"
    assert not machine.data_dir.exists() and machine.pip_calls() == []


def test_a_dry_run_says_what_it_would_install_and_where(machine: InstallMachine) -> None:
    result = machine.install("--dry-run", "--dev", "--version", "1.2.3", "--backend", "cpu")

    assert result.returncode == 0, result.stderr
    assert f"vramsupply: would install vramsupply[dev]==1.2.3 from PyPI into {machine.data_dir}/venv, linked as {machine.root}/links/vramsupply" in result.stdout
    assert not machine.data_dir.exists() and not (machine.root / "links").exists() and machine.pip_calls() == []


def test_an_agent_setting_given_to_the_installer_is_named_not_silently_ignored(machine: InstallMachine) -> None:
    result = machine.install("--dry-run", "--backend", "cpu", env={"VRAMSUPPLY_MODEL": "org/model", "VRAM_SUPPLY_BACKEND": "cuda", "VRAM_SUPPLY_API_KEY": "k"})

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "vramsupply: VRAMSUPPLY_MODEL is not an installer setting, so it is ignored; the agent reads VRAM_SUPPLY_MODEL",
        "vramsupply: VRAM_SUPPLY_BACKEND is ignored: the installer reads VRAMSUPPLY_BACKEND",
    ]


def test_the_venv_is_made_by_a_python_that_can_when_the_newest_lacks_its_venv_package(machine: InstallMachine) -> None:
    """Debian/Ubuntu: python3.13 without python3.13-venv beside a python3.12 with it (the install died)."""
    a_python(machine.bin / "python3.13", "3.13", ensurepip=False)
    python312 = machine.tool("python3.12", SYSTEM_PYTHON)

    result = machine.install("--backend", "cpu")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "vramsupply: python: python3.12 (python3.13 skipped: it cannot create virtual environments with pip; Debian/Ubuntu: apt install python3.13-venv to use it)" in result.stdout
    assert machine.venv_made_by() == [str(python312)]


def test_vramsupply_python_makes_the_venv_instead_of_the_python_found_on_path(machine: InstallMachine) -> None:
    chosen = machine.tool("python3", SYSTEM_PYTHON, machine.root / "opt" / "python-3.12" / "bin")

    result = machine.install("--backend", "cpu", env={"VRAMSUPPLY_PYTHON": str(chosen)})

    assert result.returncode == 0, result.stdout + result.stderr
    assert machine.venv_made_by() == [str(chosen)], "not python3.13, the first Python on PATH"
