"""Which Python install.sh makes the venv with, and what it says when none will do.

Debian and Ubuntu ship venv's pip (ensurepip) apart from Python, one package per version
(python3.12-venv), so a machine often has a newest Python that cannot make a venv beside an older
one that can. The installer used to take the newest and die on it, to name the generic
python3-venv (which brings the default version's, not the one it had found), and to give a user no
way to choose. These tests run it with --dry-run (or up to the early refusal) on a PATH of test
doubles: this test's own interpreter on PATH under another name, told by a sitecustomize which
version to report and, like a Debian Python without its -venv package, with ensurepip missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_install_backend import INSTALL_SH, Machine, system_bin  # noqa: F401  (system_bin: the fixture)

NO_ENSUREPIP = 'raise ModuleNotFoundError("No module named \'ensurepip\'", name="ensurepip")\n'
REPORTED_VERSION = """import collections, sys
sys.version_info = collections.namedtuple("version_info", "major minor micro releaselevel serial")({major}, {minor}, 0, "final", 0)
"""


def a_python(path: Path, version: str | None = None, ensurepip: bool = True) -> Path:
    """This test's interpreter at PATH, reporting VERSION ("3.13"; its own when None), with or without ensurepip."""
    lib = path.parent / f".{path.name}-lib"
    lib.mkdir(parents=True)
    if version:
        major, minor = version.split(".")
        (lib / "sitecustomize.py").write_text(REPORTED_VERSION.format(major=major, minor=minor))
    if not ensurepip:
        (lib / "ensurepip").mkdir()
        (lib / "ensurepip" / "__init__.py").write_text(NO_ENSUREPIP)
    path.write_text(f'#!/bin/sh\nPYTHONPATH="{lib}" exec "{sys.executable}" "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def tools_without_python(system_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The machine's ordinary tools, less every python*: each test puts on PATH the Pythons it is about."""
    clean = tmp_path_factory.mktemp("system-bin-without-python")
    for entry in system_bin.iterdir():
        if not entry.name.startswith("python"):
            (clean / entry.name).symlink_to(os.readlink(entry))
    return clean


class PythonMachine(Machine):
    def install(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A real install: each test here has it stop before the venv is made."""
        env = {"PATH": f"{self.bin}:{self.system_bin}", "HOME": str(self.root), "VRAMSUPPLY_DATA_DIR": str(self.data_dir), **(env or {})}
        return subprocess.run(["sh", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def machine(tmp_path: Path, tools_without_python: Path) -> PythonMachine:
    return PythonMachine(tmp_path, tools_without_python)


def test_a_newest_python_without_its_venv_package_is_passed_over_for_one_that_makes_venvs(machine: PythonMachine) -> None:
    a_python(machine.bin / "python3.13", "3.13", ensurepip=False)
    a_python(machine.bin / "python3.12", "3.12")

    result = machine.dry_run("--backend", "cpu")

    assert result.returncode == 0, result.stderr
    assert "vramsupply: python: python3.12 (python3.13 skipped: it cannot create virtual environments with pip; Debian/Ubuntu: apt install python3.13-venv to use it)" in result.stdout.splitlines()


def test_only_a_python_without_venv_names_the_debian_package_for_its_own_version(machine: PythonMachine) -> None:
    """`python3` is 3.12 here, so python3.12-venv is what makes it work (python3-venv is the
    distribution default's, which need not be that one)."""
    a_python(machine.bin / "python3", "3.12", ensurepip=False)

    dry = machine.dry_run("--backend", "cpu")
    result = machine.install("--backend", "cpu")

    assert "vramsupply: python: none (python3 cannot create virtual environments with pip (Debian/Ubuntu: apt install python3.12-venv))" in dry.stdout.splitlines()
    assert result.returncode == 1
    assert result.stderr == "vramsupply: error: python3 cannot create virtual environments with pip (Debian/Ubuntu: apt install python3.12-venv)\n"
    assert not machine.data_dir.exists()


def test_no_python_recent_enough_says_what_is_needed(machine: PythonMachine) -> None:
    a_python(machine.bin / "python3", "3.9")

    result = machine.install("--backend", "cpu")

    assert result.returncode == 1
    assert result.stderr == "vramsupply: error: Python 3.10 or newer is required (Debian/Ubuntu: apt install python3 python3-venv; macOS: brew install python)\n"


def test_vramsupply_python_is_used_over_the_pythons_on_path(machine: PythonMachine) -> None:
    a_python(machine.bin / "python3.13", "3.13")
    chosen = a_python(machine.root / "opt" / "python-3.11" / "bin" / "python3")

    result = machine.dry_run("--backend", "cpu", env={"VRAMSUPPLY_PYTHON": str(chosen)})

    assert result.returncode == 0, result.stderr
    assert f"vramsupply: python: {chosen} (set by VRAMSUPPLY_PYTHON)" in result.stdout.splitlines()
    assert result.stderr == "", "an installer setting, not named as one the agent reads"


def test_vramsupply_python_given_as_a_command_name_is_found_on_path(machine: PythonMachine) -> None:
    a_python(machine.bin / "python3.13", "3.13")
    a_python(machine.bin / "python3.11", "3.11")

    result = machine.dry_run("--backend", "cpu", env={"VRAMSUPPLY_PYTHON": "python3.11"})

    assert "vramsupply: python: python3.11 (set by VRAMSUPPLY_PYTHON)" in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("chosen", "problem"),
    [
        ("missing", "{path}: no such program (name a Python 3.10 or newer: python3.12, /usr/bin/python3.12)"),
        ("python 3.9", "{path} is Python 3.9, not Python 3.10 or newer, which vramsupply needs"),
        ("not a python", "{path} is not Python 3.10 or newer, which vramsupply needs"),
        ("no venv", "{path} cannot create virtual environments with pip (Debian/Ubuntu: apt install python3.12-venv)"),
    ],
    ids=["missing", "too-old", "not-a-python", "no-venv"],
)
def test_a_vramsupply_python_that_cannot_be_used_stops_the_install_with_one_line(machine: PythonMachine, chosen: str, problem: str) -> None:
    """An explicit choice is never swapped for the working python3.13 on PATH, not even by a dry run."""
    a_python(machine.bin / "python3.13", "3.13")
    path = machine.root / "opt" / "bin" / "python3"
    path.parent.mkdir(parents=True)
    if chosen == "python 3.9":
        a_python(path, "3.9")
    elif chosen == "not a python":
        machine.tool("python3", "#!/bin/sh\necho 'this is not python' >&2\nexit 2\n", path.parent)
    elif chosen == "no venv":
        a_python(path, "3.12", ensurepip=False)
    expected = f"vramsupply: error: VRAMSUPPLY_PYTHON={problem.format(path=path)}\n"

    dry = machine.dry_run("--backend", "cpu", env={"VRAMSUPPLY_PYTHON": str(path)})
    assert (dry.returncode, dry.stderr) == (1, expected)
    result = machine.install("--backend", "cpu", env={"VRAMSUPPLY_PYTHON": str(path)})

    assert (result.returncode, result.stderr) == (1, expected)
    assert not machine.data_dir.exists()


def test_help_names_vramsupply_python(machine: PythonMachine) -> None:
    result = machine.install("--help")

    assert "VRAMSUPPLY_PYTHON (the Python to make the venv with, used as is;" in result.stdout
