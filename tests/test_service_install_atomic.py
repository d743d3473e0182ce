"""`vramsupply service install` writes all of its files or none, and says which destination is wrong.

With a `--unit-dir` that was a regular file, install wrote the env file, then failed on the unit
with "File exists" (of the file it could not create, not of the folder that was no folder): a
half-install, and a message that sent the provider looking in the wrong place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cli
from dotenv import dotenv_values

from vramsupply.config import load_settings
from vramsupply.service.installer import service_target, unit_spec, write_service_files
from vramsupply.service.unit import ServiceError, render_unit

READY = {"VRAM_SUPPLY_MODEL": str(TINY_MODEL), "VRAM_SUPPLY_NO_REGISTER": "1"}


def install(tmp_path: Path, unit_dir: Path, env_file: Path, **env: str) -> tuple[int, str]:
    """`service install --user` where systemd is not running (no systemctl on PATH)."""
    result = run_cli(
        "service", "install", "--user", "--unit-dir", str(unit_dir), "--env-file", str(env_file),
        env={"PATH": str(tmp_path / "no-bin"), **READY, **env},
    )
    assert "Traceback" not in result.stderr
    return result.returncode, result.stderr.strip()


def test_a_unit_dir_that_is_a_file_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    env_file = tmp_path / "envfile3"
    code, error = install(tmp_path, afile, env_file)
    assert code == 1
    assert error == f"error: cannot write {afile}/vramsupply.service: {afile} is not a directory (nothing was installed)"
    assert not env_file.exists(), "the env file was written before the unit failed"
    assert afile.read_text() == "not a folder\n"


def test_an_env_file_below_a_file_is_named_and_no_unit_is_written(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    units = tmp_path / "units"
    code, error = install(tmp_path, units, afile / "deeper" / "env")
    assert code == 1
    assert error == f"error: cannot write {afile}/deeper/env: {afile} is not a directory (nothing was installed)"
    assert not units.exists()


def test_a_cache_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    afile = tmp_path / "models"
    afile.write_text("")
    units, env_file = tmp_path / "units", tmp_path / "env"
    code, error = install(tmp_path, units, env_file, VRAM_SUPPLY_CACHE_DIR=str(afile))
    assert code == 2, "refused with the settings, before the install begins"
    assert error == (
        f"error: invalid cache_dir = '{afile}' (from env VRAM_SUPPLY_CACHE_DIR): {afile} is not a directory: "
        "name the folder models are kept in (it is made if missing)"
    )
    assert not units.exists() and not env_file.exists()


def test_a_failed_reinstall_leaves_the_settings_already_installed_as_they_were(tmp_path: Path) -> None:
    units, env_file = tmp_path / "units", tmp_path / "env"
    assert install(tmp_path, units, env_file, VRAM_SUPPLY_PARALLEL="2")[0] == 0
    before = env_file.read_text()
    afile = tmp_path / "afile"
    afile.write_text("")
    code, error = install(tmp_path, afile, env_file, VRAM_SUPPLY_PARALLEL="3")
    assert code == 1 and f"{afile} is not a directory" in error
    assert env_file.read_text() == before
    assert dotenv_values(env_file)["VRAM_SUPPLY_PARALLEL"] == "2"


def test_a_unit_that_fails_to_be_written_puts_the_env_file_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the checks a write can still fail (a full disk): the env file is restored, or removed
    when this install created it."""
    monkeypatch.setenv("VRAM_SUPPLY_MODEL", str(TINY_MODEL))
    afile = tmp_path / "afile"
    afile.write_text("")
    env_file = tmp_path / "env"
    target = service_target(True, unit_dir=afile, env_file=env_file)  # a unit dir the checks would refuse
    spec = unit_spec(target, load_settings().settings)
    said: list[str] = []
    for previous in (None, "# written by vramsupply service install\nVRAM_SUPPLY_PARALLEL=2\n"):
        if previous is not None:
            env_file.write_text(previous)
        with pytest.raises(ServiceError, match=f"^cannot write {afile}/vramsupply.service"):
            write_service_files(target, spec, "VRAM_SUPPLY_PARALLEL=7\n", render_unit(spec), said.append)
        assert (env_file.read_text() if env_file.exists() else None) == previous
    assert not any(line.startswith("wrote") for line in said)
