"""`vramsupply service install` with input that could break or hijack the unit, or harm the provider's files.

A newline in a path or setting would end a unit line and start another (``ExecStartPost=``); a quote
or ``%`` would be read by systemd, not as written; a huge drain timeout would be refused by systemd
(which then waits 90 s); an env file the installer did not write (/etc/environment) must not be
rewritten, chmod-ed or purged; a service that can never start must not be left restarting forever.
Each case ends in one readable line, or in a unit that the real `systemd-analyze verify` accepts.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from dotenv import dotenv_values

from conftest import run_cli
from test_service_install import READY, fake_tools, logged_calls, unit_values, verify
from vramsupply.service.checks import file_destination_problem
from vramsupply.service.installer import ServiceError, install, service_target
from vramsupply.service.unit import UnitSpec, render_unit, stop_timeout

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def tools_with_verify(tmp_path: Path) -> tuple[Path, Path]:
    """Recording systemctl (systemd offline), and the real systemd-analyze, which install then runs."""
    bin_dir, calls = fake_tools(tmp_path, state="offline")
    assert SYSTEMD_ANALYZE is not None
    (bin_dir / "systemd-analyze").symlink_to(SYSTEMD_ANALYZE)
    return bin_dir, calls


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("VRAM_SUPPLY_CACHE_DIR", "/x/c\nExecStartPost=/usr/bin/touch /tmp/pwned", "a newline"),
        ("VRAM_SUPPLY_ENGINE_ARGS", "--foo\nVRAM_SUPPLY_PORT=1", "a newline"),
        ("VRAM_SUPPLY_MODEL", "/models/a\rb.gguf", "a carriage return"),
        ("VRAM_SUPPLY_ENGINE_COMMAND", "vllm\x1bserve", "an escape character"),
        ("VRAM_SUPPLY_CACHE_DIR", "/x/not-utf8-\udcff", "is not valid UTF-8"),
    ],
)
def test_a_control_character_in_a_setting_is_refused_before_anything_is_written(tmp_path: Path, name: str, value: str, named: str) -> None:
    units, env_file = tmp_path / "units", tmp_path / "env"
    result = run_cli("service", "install", "--unit-dir", str(units), "--env-file", str(env_file), env={"PATH": str(tmp_path), name: value})
    line = one_error_line(result)
    assert line.startswith(f"error: {name} ")
    assert named.removeprefix("an ").removeprefix("a ") in line
    assert not units.exists() and not env_file.exists()
    assert not Path("/x").exists()


@pytest.mark.parametrize("folder", ["o'brien", "o'brien \"q\" back\\slash $HOME ${USER} 100%h é;#"])
def test_odd_paths_are_quoted_so_systemd_reads_them_as_written(tmp_path: Path, folder: str) -> None:
    bin_dir, _ = tools_with_verify(tmp_path)
    odd = tmp_path / folder
    env_file = odd / "env $x %n"
    result = run_cli(
        "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={"PATH": str(bin_dir), "VRAM_SUPPLY_CACHE_DIR": str(odd / "models"), **READY},
    )
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "units" / "vramsupply.service"
    values = unit_values(unit)
    # One line each: a word list double-quoted with \\ and \" escaped; EnvironmentFile= verbatim; % doubled.
    escaped = str(odd / "models").replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    assert values["ReadWritePaths"] == [f'"{escaped}"']
    assert values["EnvironmentFile"] == [str(env_file).replace("%", "%%")]
    assert len(values["ExecStart"]) == 1 and "ExecStartPost" not in values
    checked = verify(unit, user=False, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")
    assert (odd / "models").is_dir()
    assert dotenv_values(env_file, interpolate=False)["VRAM_SUPPLY_CACHE_DIR"] == str(odd / "models")


def test_the_agents_path_is_run_literally_and_one_with_a_quote_is_refused(tmp_path: Path) -> None:
    # systemd runs ExecStart='s program as written: `$` is not substituted there (`$$` would name
    # another file, which verify reports as not executable), `%` is a specifier, blanks need quotes.
    folder = tmp_path / "v ${HOME} $$ 50%"
    folder.mkdir()
    agent = folder / "vramsupply"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    unit = tmp_path / "vramsupply.service"
    unit.write_text(render_unit(UnitSpec(exec_path=agent, env_file=tmp_path / "env", user_mode=True, drain_timeout=30)))
    checked = verify(unit, user=True, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")

    for name in ("o'brien", 'say "hi"', "back\\slash"):
        spec = UnitSpec(exec_path=tmp_path / name / "bin" / "vramsupply", env_file=tmp_path / "env", user_mode=False, drain_timeout=30)
        with pytest.raises(ServiceError, match="has a quote or a backslash, which systemd refuses"):
            render_unit(spec)


@pytest.mark.parametrize("env_file", ["etc/env\\", "etc/env "])
def test_an_env_file_path_systemd_would_misread_is_refused(tmp_path: Path, env_file: str) -> None:
    # A trailing backslash would join the next unit line to EnvironmentFile=; a trailing blank is stripped.
    places = ("--user", "--unit-dir", str(tmp_path / "u"), "--env-file", str(tmp_path / env_file))
    result = run_cli("service", "install", *places, env={"PATH": str(tmp_path), **READY})
    assert "ends with a blank or a backslash" in one_error_line(result)
    assert not (tmp_path / "u").exists() and not (tmp_path / "etc").exists()


def test_a_path_with_dot_dot_is_normalized_or_systemd_would_ignore_it(tmp_path: Path) -> None:
    bin_dir, _ = tools_with_verify(tmp_path)
    result = run_cli(
        "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "a" / ".." / "env"),
        env={"PATH": str(bin_dir), "VRAM_SUPPLY_CACHE_DIR": str(tmp_path / "b" / ".." / "models"), **READY},
    )
    assert result.returncode == 0, result.stderr
    values = unit_values(tmp_path / "units" / "vramsupply.service")
    assert values["EnvironmentFile"] == [str(tmp_path / "env")]
    assert values["ReadWritePaths"] == [str(tmp_path / "models")]
    checked = verify(tmp_path / "units" / "vramsupply.service", user=False, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_a_unit_systemd_analyze_rejects_is_not_installed(tmp_path: Path) -> None:
    bin_dir, _ = fake_tools(tmp_path, state="offline")
    analyze = bin_dir / "systemd-analyze"
    analyze.write_text('#!/bin/sh\nfor a; do last=$a; done\necho "$last:12: Unbalanced quoting, ignoring: \\"ExecStart=/x\\"" >&2\n')
    analyze.chmod(0o755)
    units, env_file = tmp_path / "units", tmp_path / "env"
    result = run_cli("service", "install", "--user", "--unit-dir", str(units), "--env-file", str(env_file), env={"PATH": str(bin_dir), **READY})
    line = one_error_line(result)
    assert line == 'error: systemd-analyze verify rejects the unit (nothing was installed): line 12: Unbalanced quoting, ignoring: "ExecStart=/x"'
    assert not units.exists() and not env_file.exists()


@pytest.mark.parametrize(
    ("drain", "written"),
    [(0, "30"), (45.2, "76"), (float("inf"), "infinity"), (1e30, "infinity"), (1e12, "infinity"), (float("nan"), "infinity")],
)
def test_any_drain_timeout_gives_a_stop_timeout_systemd_parses(tmp_path: Path, drain: float, written: str) -> None:
    # The unit writer does not rely on the config's bounds: 1e30 seconds written out would be
    # refused by systemd, which then kills the agent after its default 90 s.
    assert stop_timeout(drain) == written
    unit = tmp_path / "vramsupply.service"
    unit.write_text(render_unit(UnitSpec(exec_path=Path("/bin/true"), env_file=tmp_path / "env", user_mode=True, drain_timeout=drain)))
    assert unit_values(unit)["TimeoutStopSec"] == [written]
    checked = verify(unit, user=True, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_reinstall_keeps_the_providers_own_lines_and_names_a_misspelt_setting(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    common = ("service", "install", "--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file))
    first = run_cli(*common, env={"PATH": str(tmp_path), "VRAM_SUPPLY_PARALLEL": "8", **READY})
    assert first.returncode == 0, first.stderr
    own_lines = "# my GPU choice\nCUDA_VISIBLE_DEVICES=1\nHF_TOKEN=hf_secret\n\nHTTPS_PROXY=http://proxy:3128\nVRAM_SUPPLY_PARALEL=3\n"
    env_file.write_text(env_file.read_text().replace('VRAM_SUPPLY_PARALLEL="8"\n', 'VRAM_SUPPLY_PARALLEL="8"\n' + own_lines))

    again = run_cli(*common, env={"PATH": str(tmp_path), "VRAM_SUPPLY_PARALLEL": "2"})
    assert again.returncode == 0, again.stderr
    text = env_file.read_text()
    assert 'VRAM_SUPPLY_PARALLEL="2"\n' + own_lines in text, "the setting is rewritten in place, the provider's lines kept"
    assert f"warning: VRAM_SUPPLY_PARALEL in {env_file} is not a vramsupply setting (did you mean VRAM_SUPPLY_PARALLEL?)" in again.stdout
    assert text.startswith("# vramsupply service settings")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert dotenv_values(env_file)["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("foreign", ["LANG=C.UTF-8\nPATH=/usr/local/bin:/usr/bin\n", ""])
def test_a_file_the_installer_did_not_write_is_never_rewritten_or_purged(tmp_path: Path, foreign: str) -> None:
    etc_environment = tmp_path / "environment"  # an /etc/environment, perhaps empty
    etc_environment.write_text(foreign)
    etc_environment.chmod(0o644)
    places = ("--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(etc_environment))
    installed = run_cli("service", "install", *places, env={"PATH": str(tmp_path), **READY})
    assert one_error_line(installed).startswith(f"error: not touching {etc_environment}: `vramsupply service install` did not write it")
    purged = run_cli("service", "uninstall", "--purge", *places, env={"PATH": str(tmp_path)})
    assert one_error_line(purged).startswith(f"error: not touching {etc_environment}")
    assert etc_environment.read_text() == foreign
    assert stat.S_IMODE(etc_environment.stat().st_mode) == 0o644
    assert not (tmp_path / "units").exists()


def test_a_service_that_cannot_register_is_written_but_not_started(tmp_path: Path) -> None:
    # As after `sudo`: the key `vramsupply login` stored is the user's, not root's.
    bin_dir, calls = fake_tools(tmp_path, state="running")
    env_file = tmp_path / "env"
    result = run_cli(
        "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={"PATH": str(bin_dir), "VRAM_SUPPLY_MODEL": "qwen/qwen3.5-9b"},
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: the service cannot start: no API key: add VRAM_SUPPLY_API_KEY=... to {env_file}" in result.stdout
    assert "warning: the service cannot start: no public endpoint URL: add VRAM_SUPPLY_ENDPOINT_URL=https://your.host" in result.stdout
    assert "VRAM_SUPPLY_NO_REGISTER=true to serve locally only" in result.stdout
    assert f"not started (it would fail and restart every 5 s); once {env_file} has them, run:" in result.stdout
    assert result.stdout.endswith("  systemctl restart --no-block vramsupply.service\n")
    assert [call for call in logged_calls(calls) if call.startswith("systemctl")] == [], "nothing started or enabled"
    assert (tmp_path / "units" / "vramsupply.service").exists() and env_file.exists()

    tunnel_env = {"PATH": str(bin_dir), "VRAM_SUPPLY_API_KEY": "sk-live-abcdef123456", "VRAM_SUPPLY_TUNNEL": "cloudflared"}
    no_tool = run_cli("service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file), env=tunnel_env)
    assert no_tool.returncode == 0, no_tool.stderr
    assert "warning: the service cannot start: `cloudflared` is not installed or not on PATH. Install it from" in no_tool.stdout
    assert f"Or change VRAM_SUPPLY_TUNNEL in {env_file}" in no_tool.stdout
    assert [call for call in logged_calls(calls) if call.startswith("systemctl")] == [], "nothing started or enabled"

    (bin_dir / "cloudflared").write_text("#!/bin/sh\n")
    (bin_dir / "cloudflared").chmod(0o755)
    tunnel = run_cli("service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file), env=tunnel_env)
    assert tunnel.returncode == 0, tunnel.stderr
    assert "cannot start" not in tunnel.stdout
    assert "vramsupply.service is starting" in tunnel.stdout


def test_a_service_whose_model_file_is_missing_is_written_but_not_started(tmp_path: Path) -> None:
    bin_dir, calls = fake_tools(tmp_path, state="running")
    env_file = tmp_path / "env"
    missing = tmp_path / "models" / "gone.gguf"
    result = run_cli(
        "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={"PATH": str(bin_dir), "VRAM_SUPPLY_MODEL": str(missing), "VRAM_SUPPLY_NO_REGISTER": "true"},
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: the service cannot start: model file {missing} does not exist: change VRAM_SUPPLY_MODEL in {env_file}" in result.stdout
    assert [call for call in logged_calls(calls) if call.startswith("systemctl")] == [], "nothing started or enabled"
    assert env_file.exists(), "written, for the provider to correct"


def test_a_file_error_of_a_user_service_does_not_suggest_sudo_or_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", str(tmp_path))
    env_dir = tmp_path / "env"
    env_dir.mkdir()  # the env file cannot be written
    with pytest.raises(ServiceError) as user_error:
        install(service_target(True, tmp_path / "units", env_dir), lambda line: None)
    assert str(user_error.value).startswith(f"cannot write {env_dir}: ")
    assert "sudo" not in str(user_error.value) and "--user" not in str(user_error.value)
    with pytest.raises(ServiceError, match=r"a system service needs root: sudo vramsupply service install, or use --user"):
        install(service_target(False, tmp_path / "units", env_dir), lambda line: None)


def test_a_list_of_numbers_is_written_to_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    places = ("--user", "--unit-dir", str(tmp_path / "u"), "--env-file", str(env_file))
    result = run_cli("service", "install", *places, env={"PATH": str(tmp_path), "VRAM_SUPPLY_TENSOR_SPLIT": "3,1", **READY})
    assert result.returncode == 0, result.stderr
    assert dotenv_values(env_file)["VRAM_SUPPLY_TENSOR_SPLIT"] == "3.0,1.0"


@pytest.mark.parametrize(
    ("engine_args", "problem"),
    [
        ("--port 9999", "engine_args may not set --port: the agent starts vLLM on a free port of its own"),
        ("--dtype 'half", "invalid engine_args \"--dtype 'half\": No closing quotation"),
    ],
)
def test_engine_args_serve_would_refuse_keep_the_service_from_starting(tmp_path: Path, engine_args: str, problem: str) -> None:
    bin_dir, calls = fake_tools(tmp_path, state="running")
    env_file = tmp_path / "env"
    env = {"PATH": str(bin_dir), "VRAM_SUPPLY_MODEL": "org/model", "VRAM_SUPPLY_ENGINE": "vllm", "VRAM_SUPPLY_NO_REGISTER": "true"}
    result = run_cli("service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file), env={**env, "VRAM_SUPPLY_ENGINE_ARGS": engine_args})
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("warning: the service cannot start: ")]
    assert line.startswith(f"warning: the service cannot start: {problem}") and line.endswith(f": change VRAM_SUPPLY_ENGINE_ARGS in {env_file}")
    assert [call for call in logged_calls(calls) if call.startswith("systemctl")] == [], "nothing started or enabled"
    fixed = run_cli("service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file), env={**env, "VRAM_SUPPLY_ENGINE_ARGS": "--dtype half"})
    assert "cannot start" not in fixed.stdout and "vramsupply.service is starting" in fixed.stdout


def test_a_device_this_build_lacks_keeps_the_service_from_being_started(tmp_path: Path) -> None:
    bin_dir, calls = fake_tools(tmp_path, state="running")
    env_file = tmp_path / "env"
    result = run_cli(
        "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={"PATH": str(bin_dir), "VRAM_SUPPLY_MODEL": "qwen/qwen3.5-9b", "VRAM_SUPPLY_NO_REGISTER": "true", "VRAM_SUPPLY_DEVICES": "CUDA0"},
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: the service cannot start: no device 'CUDA0' in this llama.cpp build; it has: CPU (vramsupply doctor lists them): change VRAM_SUPPLY_DEVICES (or VRAM_SUPPLY_TENSOR_SPLIT) in {env_file}" in result.stdout
    assert [call for call in logged_calls(calls) if call.startswith("systemctl")] == [], "nothing started or enabled"


def test_a_unit_or_env_file_that_is_a_link_loop_is_named_not_a_traceback(tmp_path: Path) -> None:
    """Python 3.11 says a loop with a RuntimeError, which the install's checks did not catch."""
    loop = tmp_path / "vramsupply.service"
    loop.symlink_to(loop.name)
    assert file_destination_problem(loop) == f"{loop} is a symbolic link that leads back to itself"
