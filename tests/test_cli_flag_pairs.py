"""A flag beats the environment and the config file for true/false settings too: each has an on and
an off flag (`--kv-per-slot/--no-kv-per-slot`, `--no-register/--register`), and neither given leaves
the setting to the environment, the config file or its default. And the flags a command's advice
names are flags that command has (`doctor` takes none of serve's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup, TyperOption
from conftest import TINY_MODEL, run_cli
from live_platform import free_port

from vramsupply.cli import app
from vramsupply.config import Settings, load_settings

SETTINGS_COMMANDS = ("serve", "plan")
"""The commands whose flags are settings (each named after the setting it overrides)."""


def true_false_settings() -> list[tuple[str, TyperOption]]:
    """Every flag of a settings command that sets a true/false setting."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    found = []
    for command in SETTINGS_COMMANDS:
        for param in group.commands[command].params:
            if isinstance(param, TyperOption) and param.is_flag and param.name in Settings.model_fields:
                found.append((command, param))
    return found


def test_every_true_false_setting_has_an_on_and_an_off_flag_and_is_unset_without_either() -> None:
    flags = true_false_settings()
    assert {(command, param.name) for command, param in flags} >= {
        ("serve", "kv_per_slot"), ("serve", "backend_sampling"), ("serve", "no_register"), ("plan", "kv_per_slot"),
    }
    for command, param in flags:
        assert param.secondary_opts, f"{command} {param.opts[0]} has no flag for the other value"
        assert param.default is None, f"{command} {param.opts[0]} would override the environment even when not given"


@pytest.mark.parametrize(("command", "param"), true_false_settings(), ids=lambda p: p if isinstance(p, str) else p.name)
def test_either_flag_of_a_pair_beats_the_environment_set_the_other_way(command: str, param: TyperOption, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed by the command's own options and loaded as the command loads them (serve, plan)."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    variable = "VRAM_SUPPLY_" + str(param.name).upper()
    for flag, environment in ((param.opts[0], "false"), (param.secondary_opts[0], "true")):
        wanted = flag == param.opts[0]
        monkeypatch.setenv(variable, environment)
        parsed = group.commands[command].make_context(command, [flag]).params[str(param.name)]
        assert parsed is wanted
        assert getattr(load_settings({str(param.name): parsed}).settings, str(param.name)) is wanted, f"{flag} with {variable}={environment}"
    monkeypatch.setenv(variable, "true")
    unset = group.commands[command].make_context(command, []).params[str(param.name)]
    assert unset is None and getattr(load_settings({str(param.name): unset}).settings, str(param.name)) is True


def test_serve_help_shows_both_flags_of_each_pair() -> None:
    shown = run_cli("serve", "--help", env={"COLUMNS": "240"})

    assert shown.returncode == 0
    for on, off in (("--kv-per-slot", "--no-kv-per-slot"), ("--backend-sampling", "--no-backend-sampling"), ("--no-register", "--register")):
        [line] = [line for line in shown.stdout.splitlines() if re.search(rf"(^|\s){on}(\s|$)", line)]
        assert re.search(rf"(^|\s){off}(\s|$)", line), line


def test_register_beats_no_register_from_the_environment_and_the_config_file(config_file: Path) -> None:
    """Registering asked for on the command line: it needs an endpoint URL, and says so."""
    nowhere = {"VRAM_SUPPLY_PLATFORM_URL": f"http://127.0.0.1:{free_port()}", "VRAM_SUPPLY_API_KEY": "sk-test-0123456789abcdef"}
    from_env = run_cli("serve", "--model", str(TINY_MODEL), "--register", env={**nowhere, "VRAM_SUPPLY_NO_REGISTER": "true"})
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("no_register = true\n")
    from_file = run_cli("serve", "--model", str(TINY_MODEL), "--register", env=nowhere)

    for result in (from_env, from_file):
        assert result.returncode == 2
        assert result.stderr.strip() == "error: an endpoint URL is required to register: pass --endpoint-url or set VRAM_SUPPLY_ENDPOINT_URL (or --no-register)"


def test_no_kv_per_slot_beats_the_environment_in_the_plan() -> None:
    def planned(*args: str, **env: str) -> dict[str, object]:
        result = run_cli("plan", "--model", str(TINY_MODEL), "--parallel", "2", "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        chosen = json.loads(result.stdout)["chosen"]
        return {key: chosen[key] for key in ("quant", "kv_bytes", "compute_bytes")}

    shared = planned()
    per_slot = planned(VRAM_SUPPLY_KV_PER_SLOT="true")
    assert per_slot != shared, "the environment's kv_per_slot changes the plan"
    assert planned("--no-kv-per-slot", VRAM_SUPPLY_KV_PER_SLOT="true") == shared
    assert planned("--kv-per-slot", VRAM_SUPPLY_KV_PER_SLOT="false") == per_slot


def test_demo_with_register_asks_for_what_the_demo_does_and_is_not_refused() -> None:
    from vramsupply.cli.serve import refuse_with_demo
    from vramsupply.errors import ConfigError

    refuse_with_demo(load_settings({"no_register": False}), {"no_register": False})
    with pytest.raises(ConfigError, match="^--demo and --no-register do not go together"):
        refuse_with_demo(load_settings({"no_register": True}), {"no_register": True})


def test_doctor_says_how_to_set_the_endpoint_url_without_a_flag_it_does_not_have() -> None:
    result = run_cli("doctor", "--json", env={"VRAM_SUPPLY_PLATFORM_URL": f"http://127.0.0.1:{free_port()}"})
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}

    assert result.returncode == 1
    endpoint, reachability = checks["endpoint url"], checks["reachability"]
    assert endpoint["fix"] == "set VRAM_SUPPLY_ENDPOINT_URL=https://your.host (serve: --endpoint-url), or VRAM_SUPPLY_TUNNEL=cloudflared (serve: --tunnel)"
    assert reachability["detail"] == (
        "address: no endpoint URL: set VRAM_SUPPLY_ENDPOINT_URL to your public address (serve: --endpoint-url), "
        "or VRAM_SUPPLY_TUNNEL=cloudflared (serve: --tunnel)"
    )
    refused = run_cli("doctor", "--endpoint-url", "https://gpu.example.com")
    assert refused.returncode == 2 and "No such option: --endpoint-url" in refused.stderr, "doctor takes no serve flags: its fixes must not name one as its own"
