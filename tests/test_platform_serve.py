"""`vramsupply serve` on the marketplace: a real agent process registering with the reference platform."""

from __future__ import annotations

import json
import signal
import stat
import time
import urllib.error
import urllib.request

import pytest
from agent_process import AgentProcess, demo_until_its_answer
from conftest import TINY_MODEL, run_cli
from live_platform import API_KEY, LivePlatform, free_port

from vramsupply.config import data_dir
from vramsupply.platform import Phase, read_state
from vramsupply.platform.state import default_state_path

MESSAGES = [{"role": "user", "content": "Once upon a time"}]
PUBLIC = "https://gpu.example.com"


def post(url: str, body: dict[str, object], headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def marketplace_env(platform_url: str) -> dict[str, str]:
    return {"VRAM_SUPPLY_PLATFORM_URL": platform_url, "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}


def test_serve_registers_heartbeats_routes_buyers_and_sigterm_deregisters() -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        agent = AgentProcess(
            "--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--input-price", "120", env=marketplace_env(platform.url)
        )
        try:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            [provider] = platform.providers
            agent.wait_for(lambda: provider.slots_total == 16, "a heartbeat with the engine's slots")
            prices = "prices per million tokens: input $1.20, output $2.00; you earn $1.14 / $1.90 after the 5% platform fee"
            agent.wait_for(lambda: agent.printed(prices), "the offer's lines (read from the agent's stdout by a thread)", timeout=10)
            assert f"endpoint URL {endpoint} points at a local or private address" in agent.log

            token_file = data_dir() / "endpoint_token"
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert provider.offer.endpoint_token == token_file.read_text().strip()
            assert post(f"{endpoint}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})[0] == 401

            status, answer = post(
                f"{platform.url}/v1/chat/completions",
                {"model": "stories260k", "messages": MESSAGES, "max_tokens": 4, "ignore_eos": True},
                {"Authorization": f"Bearer {API_KEY}"},
            )
            assert status == 200 and answer["usage"]["completion_tokens"] == 4  # type: ignore[index]
            agent.wait_for(lambda: provider.reported_completion_tokens == 4, "the served tokens in a heartbeat")

            assert agent.stop(signal.SIGTERM) == 0
        finally:
            agent.kill()
        assert platform.providers == [], "deregistered on SIGTERM"
    recorded = read_state(default_state_path())
    assert recorded is not None and recorded.phase is Phase.deregistered
    assert "Traceback" not in agent.log and API_KEY not in agent.log


def test_platform_down_for_a_while_never_stops_serving_and_registration_resumes() -> None:
    platform_port, agent_port = free_port(), free_port()
    agent_url = f"http://127.0.0.1:{agent_port}"
    agent = AgentProcess(
        "--model", str(TINY_MODEL), "--port", str(agent_port), "--endpoint-url", agent_url, env=marketplace_env(f"http://127.0.0.1:{platform_port}")
    )
    try:
        agent.wait_for(lambda: "platform unreachable" in agent.log, "the unreachable platform noticed")
        assert healthy(agent_url)
        status = json.loads(run_cli("status", "--json", env={"VRAM_SUPPLY_PORT": str(agent_port)}).stdout)
        assert status["agent"]["healthy"] is True and status["registration"]["phase"] == "unreachable"
        time.sleep(1)
        assert healthy(agent_url), "still serving while the platform is down"
        with LivePlatform(platform_port) as platform:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration once the platform is back", timeout=20)
            assert healthy(agent_url)
            assert agent.stop(signal.SIGINT) == 0
            assert platform.providers == []
    finally:
        agent.kill()
    assert agent.log.count("platform unreachable") == 1, "logged once per state change, not per retry"


def test_serve_demo_runs_the_whole_marketplace_on_one_machine() -> None:
    agent = demo_until_its_answer()

    out = "\n".join(agent.stdout)
    assert out.startswith("vramsupply ready: serving stories260k at http://127.0.0.1:")
    assert "you earn $0.95 / $1.90 after the 5% platform fee" in out
    answer = out.split("streams the answer back:\n", 1)[1].split("\ndemo: the platform counted", 1)[0]
    assert answer.strip(), "the buyer's answer is printed"
    assert "the platform counted 48 completion tokens" in out
    assert "registered stories260k as prov_" in agent.log and "deregistered prov_" in agent.log
    assert "local or private address" not in agent.log, "the demo's loopback endpoint is expected"
    assert "Traceback" not in agent.log


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--endpoint-url", "ftp://gpu.example.com"], {}, "invalid endpoint_url = 'ftp://gpu.example.com' (from flag --endpoint-url)"),
        (["--endpoint-url", PUBLIC, "--input-price", "-1"], {}, "invalid input_price = -1 (from flag --input-price)"),
        (["--endpoint-url", PUBLIC], {"VRAM_SUPPLY_OUTPUT_PRICE": "2.5"}, "invalid output_price = '2.5' (from env VRAM_SUPPLY_OUTPUT_PRICE)"),
        ([], {}, "an endpoint URL is required to register: pass --endpoint-url or set VRAM_SUPPLY_ENDPOINT_URL"),
        (["--endpoint-url", PUBLIC, "--context-length-offered", "9000"], {}, "context_length_offered (9000) is larger than context_length (8192)"),
        # The tiny model was trained on 2048 tokens: known from its header, not only once loaded.
        (["--endpoint-url", PUBLIC, "--context-length-offered", "4096"], {}, "context_length_offered (4096) is larger than the context this agent will serve (2048, what stories260K.gguf was trained on)"),
    ],
)
def test_bad_offers_are_refused_before_any_call_or_load(args: list[str], env: dict[str, str], message: str) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = run_cli("serve", "--model", str(TINY_MODEL), "--port", "0", *args, env={**marketplace_env(nowhere), **env})

    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert "loading" not in result.stderr and "unreachable" not in result.stderr
    assert "Traceback" not in result.stderr


def test_serving_for_the_market_without_an_api_key_says_how_to_get_one() -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), "--endpoint-url", "https://gpu.example.com")

    assert result.returncode == 2  # a missing setting, as every other
    assert result.stderr.strip() == (
        "error: no API key to register with: run `vramsupply login`, set VRAM_SUPPLY_API_KEY, or pass --no-register to serve locally only"
    )
