"""`vramsupply service install/uninstall/status/logs` as a provider runs them, on hosts with and without systemd.

systemctl, journalctl and useradd are small recording scripts on PATH where a test needs systemd
"running" (nothing here may touch the real service manager or user database); the unit itself is
checked by the real `systemd-analyze verify`.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from conftest import run_cli
from vramsupply.config import write_config_values
from vramsupply.service.installer import default_unit_dir, useradd_command
from vramsupply.service.unit import UnitSpec, render_unit

VENV_AGENT = Path(sys.executable).absolute().parent / "vramsupply"
# Settings a service can start with: a model, and serving locally (no API key or endpoint URL needed).
READY = {"VRAM_SUPPLY_MODEL": "qwen/qwen3.5-9b", "VRAM_SUPPLY_NO_REGISTER": "1"}


@pytest.fixture(autouse=True)
def the_providers_shell(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The env file holds what the provider's shell set: not the suite's own decode_nice
    (``conftest.isolated_env``); nothing here decodes."""
    monkeypatch.delenv("VRAM_SUPPLY_DECODE_NICE")


def fake_tools(tmp_path: Path, state: str) -> tuple[Path, Path]:
    """A bin dir whose systemctl reports `state`; every call of the tools is appended to a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("systemctl", "journalctl", "useradd"):
        script = bin_dir / tool
        script.write_text(
            "#!/bin/sh\n"
            f"printf '%s\\n' \"{tool} $*\" >> '{calls}'\n"
            f"case \"$*\" in *is-system-running*) echo {state} ;; esac\n"
        )
        script.chmod(0o755)
    return bin_dir, calls


def logged_calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def verify(unit: Path, user: bool, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )


def unit_values(unit: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_user_install_without_systemd_prints_the_exact_commands(tmp_path: Path, isolated_env: Path) -> None:
    empty_path = tmp_path / "no-systemd"
    empty_path.mkdir()
    result = run_cli("service", "install", "--user", env={"PATH": str(empty_path), **READY})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "systemd is not running here; to start the service, run:\n" in result.stdout
    assert result.stdout.endswith(
        "  systemctl --user daemon-reload\n"
        "  systemctl --user enable vramsupply.service\n"
        "  systemctl --user restart --no-block vramsupply.service\n"
    )
    unit = isolated_env / ".config" / "systemd" / "user" / "vramsupply.service"
    env_file = isolated_env / ".config" / "vramsupply" / "env"
    values = unit_values(unit)
    assert values["ExecStart"] == [f"{VENV_AGENT} serve"]
    assert values["EnvironmentFile"] == [str(env_file)]
    assert values["WantedBy"] == ["default.target"]
    assert "User" not in values
    checked = verify(unit, user=True, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_a_relative_xdg_config_home_is_passed_over_as_systemd_does(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit went under the current directory (`rel/systemd/user`), where systemd never looks,
    while the env file went to ~/.config (platformdirs passes a relative value over too)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", "rel")
    assert default_unit_dir(user_mode=True) == isolated_env / ".config" / "systemd" / "user"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated_env / "elsewhere"))
    assert default_unit_dir(user_mode=True) == isolated_env / "elsewhere" / "systemd" / "user"


def test_system_unit_is_hardened_without_hiding_the_gpu_and_passes_systemd_analyze(tmp_path: Path) -> None:
    bin_dir, calls = fake_tools(tmp_path, state="offline")
    cache = tmp_path / "models"
    result = run_cli(
        "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "etc" / "env"),
        env={"PATH": str(bin_dir), "VRAM_SUPPLY_DRAIN_TIMEOUT": "45", "VRAM_SUPPLY_CACHE_DIR": str(cache), **READY},
    )
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "units" / "vramsupply.service"
    values = unit_values(unit)
    assert values["Type"] == ["notify"]
    assert values["NotifyAccess"] == ["main"]
    assert values["ExecStart"] == [f"{VENV_AGENT} serve"]
    assert values["EnvironmentFile"] == [str(tmp_path / "etc" / "env")]
    assert values["Restart"] == ["on-failure"]
    assert int(values["TimeoutStopSec"][0]) > 45
    assert int(values["WatchdogSec"][0]) > 0
    assert values["After"] == values["Wants"] == ["network-online.target"]
    assert values["User"] == values["Group"] == ["vramsupply"]
    assert set(values.get("SupplementaryGroups", [""])[0].split()) <= {"render", "video"}
    assert values["NoNewPrivileges"] == values["PrivateTmp"] == ["yes"]
    assert values["ProtectSystem"] == ["strict"]
    assert values["ReadWritePaths"] == [str(cache)]
    assert "PrivateDevices" not in values and "DevicePolicy" not in values
    assert values["WantedBy"] == ["multi-user.target"]
    assert cache.is_dir()
    # The account is created (as root) or its creation spelled out (otherwise), never skipped silently.
    assert shlex.join(useradd_command()) in result.stdout
    if os.geteuid() == 0:
        assert logged_calls(calls) == [" ".join(useradd_command()), "systemctl is-system-running"]
    checked = verify(unit, user=False, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_env_file_holds_exactly_the_settings_that_were_set_mode_0600(tmp_path: Path, config_file: Path) -> None:
    """A setting set to its default value is written too: set or not, a context length (or quant,
    or slot count) is treated differently (the memory plan reduces or chooses only unset ones), and
    the service ran with the plan's choice where the shell had fixed it."""
    write_config_values(config_file, {"output_price": 250, "api_key": "sk-live-from-login-1234"})
    env_file = tmp_path / "service.env"
    result = run_cli(
        "service", "install", "--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={
            "PATH": str(tmp_path),
            "VRAM_SUPPLY_MODEL": "qwen/qwen3.5-9b",
            "VRAM_SUPPLY_INPUT_PRICE": "120",
            "VRAM_SUPPLY_PORT": "8080",  # the default value, but set
            "VRAM_SUPPLY_CONTEXT_LENGTH": "8192",  # the same: set, the plan never reduces it
            "VRAM_SUPPLY_NO_REGISTER": "1",
            "VRAM_SUPPLY_ENDPOINT_TOKEN": 'tok"with\\quotes$and-dollar',
            "VRAM_SUPPLY_GGUF_PUBLISHERS": "bartowski, {org}",
        },
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert dict(dotenv_values(env_file, interpolate=False)) == {
        "VRAM_SUPPLY_MODEL": "qwen/qwen3.5-9b",
        "VRAM_SUPPLY_ENDPOINT_TOKEN": 'tok"with\\quotes$and-dollar',
        "VRAM_SUPPLY_API_KEY": "sk-live-from-login-1234",
        "VRAM_SUPPLY_INPUT_PRICE": "120",
        "VRAM_SUPPLY_OUTPUT_PRICE": "250",
        "VRAM_SUPPLY_NO_REGISTER": "true",
        "VRAM_SUPPLY_GGUF_PUBLISHERS": "bartowski,{org}",
        "VRAM_SUPPLY_PORT": "8080",
        "VRAM_SUPPLY_CONTEXT_LENGTH": "8192",
    }
    unit_text = (tmp_path / "units" / "vramsupply.service").read_text()
    for secret in ("sk-live-from-login-1234", 'tok"with\\quotes$and-dollar'):
        assert secret not in unit_text
        assert secret not in result.stdout + result.stderr


def test_reinstall_from_a_bare_shell_keeps_the_settings_already_in_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "service.env"
    common = ("service", "install", "--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file))
    first = run_cli(*common, env={"PATH": str(tmp_path), "VRAM_SUPPLY_MODEL": "./my model.gguf", "VRAM_SUPPLY_PARALLEL": "8"})
    assert first.returncode == 0, first.stderr
    again = run_cli(*common, env={"PATH": str(tmp_path), "VRAM_SUPPLY_PARALLEL": "2"})
    assert again.returncode == 0, again.stderr
    assert dict(dotenv_values(env_file, interpolate=False)) == {"VRAM_SUPPLY_MODEL": "./my model.gguf", "VRAM_SUPPLY_PARALLEL": "2"}


def test_a_local_model_file_is_written_as_an_absolute_path(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    env_file = tmp_path / "service.env"
    result = subprocess.run(
        [sys.executable, "-m", "vramsupply", "service", "install", "--user", "--unit-dir", "units", "--env-file", str(env_file)],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PATH": str(tmp_path), "VRAM_SUPPLY_MODEL": "tiny.gguf"},
    )
    assert result.returncode == 0, result.stderr
    assert dotenv_values(env_file)["VRAM_SUPPLY_MODEL"] == str(model)
    assert (tmp_path / "units" / "vramsupply.service").exists()


def test_a_bad_value_in_the_existing_env_file_is_one_readable_line(tmp_path: Path) -> None:
    env_file = tmp_path / "service.env"
    env_file.write_text("VRAM_SUPPLY_PARALLEL=many\n")
    result = run_cli("service", "install", "--user", "--unit-dir", str(tmp_path), "--env-file", str(env_file), env={"PATH": str(tmp_path)})
    assert result.returncode == 2  # an invalid setting, as from the environment (it was 1)
    assert result.stderr.strip().startswith(f"error: invalid VRAM_SUPPLY_PARALLEL in {env_file}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_with_systemd_running_install_enables_and_starts_then_uninstall_stops(tmp_path: Path) -> None:
    bin_dir, calls = fake_tools(tmp_path, state="degraded")
    places = ("--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "env"))
    installed = run_cli("service", "install", *places, env={"PATH": str(bin_dir), **READY})
    assert installed.returncode == 0, installed.stderr
    assert logged_calls(calls) == [
        "systemctl --user is-system-running",
        "systemctl --user daemon-reload",
        "systemctl --user enable vramsupply.service",
        "systemctl --user restart --no-block vramsupply.service",
    ]
    assert "follow it with: vramsupply service logs --user -f" in installed.stdout

    calls.unlink()
    removed = run_cli("service", "uninstall", *places, env={"PATH": str(bin_dir)})
    assert removed.returncode == 0, removed.stderr
    assert logged_calls(calls) == [
        "systemctl --user is-system-running",
        "systemctl --user disable --now vramsupply.service",
        "systemctl --user daemon-reload",
    ]
    assert not (tmp_path / "units" / "vramsupply.service").exists()
    assert (tmp_path / "env").exists()
    assert "use --purge to remove them too" in removed.stdout

    purged = run_cli("service", "uninstall", "--purge", *places, env={"PATH": str(bin_dir)})
    assert purged.returncode == 0, purged.stderr
    assert not (tmp_path / "env").exists()


def test_while_the_machine_boots_install_enables_and_starts_as_when_it_runs(tmp_path: Path) -> None:
    """cloud-init's runcmd runs while is-system-running says "starting": that was "systemd is not
    running here", and nothing was enabled."""
    bin_dir, calls = fake_tools(tmp_path, state="starting")
    places = ("--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "env"))
    installed = run_cli("service", "install", *places, env={"PATH": str(bin_dir), **READY})
    assert installed.returncode == 0, installed.stderr
    assert logged_calls(calls)[1:] == [
        "systemctl --user daemon-reload", "systemctl --user enable vramsupply.service", "systemctl --user restart --no-block vramsupply.service",
    ]  # fmt: skip


@pytest.mark.parametrize("state", ["", "unknown"])
def test_a_user_manager_that_cannot_be_reached_is_said_so_by_status_and_uninstall(tmp_path: Path, state: str) -> None:
    """A --user shell opened with su: systemctl reaches no bus and prints nothing. status passed on
    its raw error; uninstall removed the unit file and left it enabled, without a word."""
    bin_dir, calls = fake_tools(tmp_path, state=state)
    places = ("--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "env"))
    assert run_cli("service", "install", *places, env={"PATH": str(bin_dir), **READY}).returncode == 0
    wanted = tmp_path / "units" / "default.target.wants" / "vramsupply.service"
    wanted.parent.mkdir()
    wanted.symlink_to(tmp_path / "units" / "vramsupply.service")  # what `systemctl --user enable` made

    status = run_cli("service", "status", "--user", env={"PATH": str(bin_dir)})
    removed = run_cli("service", "uninstall", *places, env={"PATH": str(bin_dir)})

    assert status.returncode == 1 and status.stderr.startswith("error: the systemd user manager (systemctl --user) is not running for this login")
    assert removed.returncode == 0, removed.stderr
    assert not wanted.is_symlink() and f"removed {wanted}" in removed.stdout
    assert "nothing was stopped: if the service runs, stop it where systemctl works (systemctl --user stop vramsupply.service)" in removed.stdout


def test_a_file_uninstall_cannot_remove_is_one_readable_line(tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    places = ("--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_dir))
    result = run_cli("service", "uninstall", "--purge", *places, env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: cannot remove {env_dir}: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert env_dir.is_dir()


def test_a_failing_systemctl_is_reported_in_one_line(tmp_path: Path) -> None:
    bin_dir, _ = fake_tools(tmp_path, state="running")
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\ncase \"$*\" in *is-system-running*) echo running ;; *) echo 'Access denied' >&2; exit 1 ;; esac\n"
    )
    result = run_cli("service", "install", "--user", "--unit-dir", str(tmp_path / "u"), "--env-file", str(tmp_path / "e"), env={"PATH": str(bin_dir), **READY})
    assert result.returncode == 1
    assert result.stderr.strip() == "error: systemctl --user daemon-reload failed: Access denied"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("status",), "systemctl status vramsupply.service"),
        (("status", "--user"), "systemctl --user status vramsupply.service"),
        (("logs",), "journalctl --unit vramsupply.service"),
        (("logs", "--user", "-f", "-n", "50"), "journalctl --user-unit vramsupply.service --follow --lines=50"),
    ],
)
def test_status_and_logs_wrap_systemctl_and_journalctl(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    bin_dir, calls = fake_tools(tmp_path, state="running")
    result = run_cli("service", *args, env={"PATH": str(bin_dir)})
    assert result.returncode == 0, result.stderr
    assert logged_calls(calls) == [f"systemctl{' --user' if '--user' in args else ''} is-system-running", expected]


def test_status_without_systemd_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("service", "status", env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == "error: systemctl not found: this system does not run systemd"


def test_unit_quotes_odd_paths_and_opens_home_read_only_when_the_agent_lives_there(tmp_path: Path) -> None:
    odd = tmp_path / "my agent 100%"
    odd.mkdir()
    agent = odd / "vramsupply"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    spec = UnitSpec(exec_path=agent, env_file=odd / "env", user_mode=False, drain_timeout=30, writable_paths=(odd,))
    unit = tmp_path / "vramsupply.service"
    unit.write_text(render_unit(spec))
    checked = verify(unit, user=False, tmp_path=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")
    assert unit_values(unit)["ProtectHome"] == ["yes"]

    in_home = UnitSpec(exec_path=Path("/home/alice/.local/share/vramsupply/venv/bin/vramsupply"), env_file=odd / "env", user_mode=False, drain_timeout=30)
    assert "ProtectHome=read-only" in render_unit(in_home).splitlines()
    cache_in_home = UnitSpec(exec_path=agent, env_file=odd / "env", user_mode=False, drain_timeout=30, writable_paths=(Path("/home/alice/models"),))
    assert "ProtectHome=read-only" in render_unit(cache_in_home).splitlines()


def test_an_env_file_that_cannot_be_written_leaves_no_unit_behind(tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    env_dir.mkdir()  # a directory where the env file should be: writing it fails
    units = tmp_path / "units"
    result = run_cli("service", "install", "--user", "--unit-dir", str(units), "--env-file", str(env_dir), env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: cannot write {env_dir}")
    assert not (units / "vramsupply.service").exists(), "a unit without its settings would start unconfigured"


def test_a_python_that_lives_in_a_home_opens_home_read_only_for_the_system_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyenv's and conda's Pythons live in a home (often /root): the venv's python links there, and
    a service that hid every home could not start its own interpreter."""
    from vramsupply.config import Settings
    from vramsupply.service import installer

    target = installer.ServiceTarget(user_mode=False, unit_dir=tmp_path, env_file=tmp_path / "env")
    monkeypatch.setattr(installer, "interpreter", lambda: Path("/usr/bin/python3.11"))
    assert "ProtectHome=yes" in render_unit(installer.unit_spec(target, Settings())).splitlines()
    monkeypatch.setattr(installer, "interpreter", lambda: Path("/root/.pyenv/versions/3.11.7/bin/python3.11"))
    assert "ProtectHome=read-only" in render_unit(installer.unit_spec(target, Settings())).splitlines()


def test_login_after_a_user_install_warns_that_the_service_keeps_the_key_it_was_given(tmp_path: Path) -> None:
    """install copies the saved key into the env file, which beats the config file: a later login
    changed nothing for the service, without a word."""
    assert run_cli("login", "--api-key", "vs_key_one_1234567").returncode == 0
    env = {"PATH": str(tmp_path), **READY}
    assert run_cli("service", "install", "--user", "--unit-dir", str(tmp_path / "units"), env=env).returncode == 0
    relogged = run_cli("login", "--api-key", "vs_key_two_7654321")
    assert relogged.returncode == 0
    env_file = Path(os.environ["XDG_CONFIG_HOME"]) / "vramsupply" / "env"
    assert relogged.stderr.strip() == (
        f"warning: the service's {env_file} sets another VRAM_SUPPLY_API_KEY, which the service uses: "
        "run `vramsupply service install --user` again to give it this one"
    )
    assert run_cli("login", "--api-key", "vs_key_one_1234567").stderr == ""  # the key the service has


def test_a_reinstall_keeps_hand_edited_values_as_systemd_reads_them(tmp_path: Path) -> None:
    """The env file was read back by python-dotenv's rules: a re-install rewrote 'ab\\\\cd' as ab\\cd
    and key\\with\\backslash as key\\\\with\\\\backslash, changing the token and key the service used."""
    from vramsupply.service.envfile import systemd_env_values

    places = ("--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "env"))
    env = {"PATH": str(tmp_path), **READY}
    assert run_cli("service", "install", *places, env=env).returncode == 0
    env_file = tmp_path / "env"
    edits = "VRAM_SUPPLY_ENDPOINT_TOKEN='ab\\\\cd'\nVRAM_SUPPLY_ENGINE_ARGS=--foo bar # note\n"
    env_file.write_text(env_file.read_text() + edits)
    before = systemd_env_values(env_file.read_text())
    assert (before["VRAM_SUPPLY_ENDPOINT_TOKEN"], before["VRAM_SUPPLY_ENGINE_ARGS"]) == ("ab\\\\cd", "--foo bar # note")

    assert run_cli("service", "install", *places, env={"PATH": str(tmp_path)}).returncode == 0
    after = systemd_env_values(env_file.read_text())
    assert {k: after[k] for k in before} == before  # what the service ran with, kept

    env_file.write_text(env_file.read_text() + "VRAM_SUPPLY_PARALLEL=6   # tuned\n")  # systemd reads "6   # tuned"
    refused = run_cli("service", "install", *places, env={"PATH": str(tmp_path)})
    assert refused.returncode == 2  # before: taken as 6, while the service failed on it at every start
    assert refused.stderr.startswith(f"error: invalid VRAM_SUPPLY_PARALLEL in {env_file}")
