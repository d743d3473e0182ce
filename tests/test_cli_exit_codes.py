"""A missing setting is a usage error, exit 2, in every command, as an invalid one is: no model, no
endpoint URL, no API key. Exit 1 keeps its meaning per command (`plan`: nothing fits), so a script
can tell "fix the command line" from "this machine or the platform said no"."""

from __future__ import annotations

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_platform import free_port

NO_KEY = "error: no API key: run `vramsupply login` or set VRAM_SUPPLY_API_KEY"
NO_KEY_TO_REGISTER = "error: no API key to register with: run `vramsupply login`, set VRAM_SUPPLY_API_KEY, or pass --no-register to serve locally only"


def nowhere() -> dict[str, str]:
    """A platform URL nothing listens at: a command refused before any call never notices."""
    return {"VRAM_SUPPLY_PLATFORM_URL": f"http://127.0.0.1:{free_port()}"}


def test_a_missing_setting_is_a_config_error_with_its_exit_code() -> None:
    from vramsupply.errors import ConfigError, MissingSetting

    assert issubclass(MissingSetting, ConfigError) and MissingSetting.exit_code == 2


def test_plan_without_a_model_exits_2_not_the_1_of_nothing_fits() -> None:
    result = run_cli("plan")

    assert result.returncode == 2
    assert result.stderr.strip() == "error: no model to plan for: pass --model ./file.gguf (or org/model) or set VRAM_SUPPLY_MODEL"
    assert result.stdout == ""


def test_serve_without_an_api_key_exits_2_before_anything_loads() -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), "--endpoint-url", "https://gpu.example.com", env=nowhere())

    assert result.returncode == 2
    assert result.stderr.strip() == NO_KEY_TO_REGISTER


@pytest.mark.parametrize("args", [["demand"], ["demand", "--json"], ["rails"], ["rails", "--no-tempo"]], ids=" ".join)
def test_platform_commands_without_an_api_key_exit_2_before_any_call(args: list[str]) -> None:
    result = run_cli(*args, env=nowhere())

    assert result.returncode == 2
    assert result.stderr.strip() == NO_KEY


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["plan"], {}, "no model to plan for"),
        (["serve", "--no-register"], {}, "no model to serve"),
        (["serve"], {}, "no model to serve"),  # before the endpoint URL (it named that)
        (["serve", "--model", str(TINY_MODEL)], {"VRAM_SUPPLY_API_KEY": "sk-test-0123456789abcdef"}, "an endpoint URL is required to register"),
        (["serve", "--model", str(TINY_MODEL), "--endpoint-url", "https://gpu.example.com"], {}, "no API key to register with"),
        (["demand"], {}, "no API key"),
        (["rails"], {}, "no API key"),
        (["bench", "--seconds", "3"], {}, "no model to serve"),
    ],
    ids=["plan", "serve-local", "serve-nothing-set", "serve-no-endpoint-url", "serve-no-key", "demand", "rails", "bench"],
)
def test_every_missing_setting_exits_2_in_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_cli(*args, env={**nowhere(), **env})

    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
    assert result.stderr.startswith(f"error: {message}")


def test_running_serve_without_an_api_key_but_serving_locally_needs_none() -> None:
    """--no-register (or no_register set anywhere) asks for no key: the next missing setting is the model."""
    from_flag = run_cli("serve", "--no-register", env=nowhere())
    from_env = run_cli("serve", env={**nowhere(), "VRAM_SUPPLY_NO_REGISTER": "true"})

    for result in (from_flag, from_env):
        assert result.returncode == 2
        assert "no API key" not in result.stderr and result.stderr.startswith("error: no model to serve")


def test_a_missing_model_is_said_before_another_agent_holding_the_data_dir() -> None:
    """A missing setting is exit 2 whatever else is wrong: it was "another vramsupply agent is
    serving from this data dir", exit 1."""
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0") as agent:
        agent.wait_ready()
        second = run_cli("serve", "--no-register", "--port", "0")
        assert agent.stop() == 0
    assert second.returncode == 2 and second.stderr.startswith("error: no model to serve"), second.stderr
