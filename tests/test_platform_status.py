"""`vramsupply status` as a provider runs it, against the reference platform and a real agent: what it finds
on the agent's port and in the registration record, damaged or left by a process that is gone (the other platform
commands: tests/test_platform_cli.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from live_platform import API_KEY, LivePlatform, free_port
from live_server import MODEL_ID, LiveServer
from test_platform_cli import OneAnswerPlatform, write_raw_state

from vramsupply.config import Settings
from vramsupply.platform import Phase, PlatformClient, ProviderLifecycle, RegistrationState, build_offer, default_state_path, read_state
from vramsupply.platform.state import process_alive, write_state
from vramsupply.serve.options import market_options


def test_status_flags_a_registration_left_by_a_process_that_is_gone() -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    write_state(
        default_state_path(),
        RegistrationState(
            phase=Phase.registered,
            platform_url="https://vram.supply",
            model="m",
            endpoint_url="https://gpu.example.com",
            provider_id="prov_1",
            pid=int(finished.stdout),
            updated_at=time.time(),
        ),
    )
    result = json.loads(run_cli("status", "--json", env={"VRAM_SUPPLY_PORT": str(free_port())}).stdout)
    table = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port())}).stdout

    assert result["registration"]["current"] is False
    assert f"registered (left by an earlier run: process {finished.stdout.strip()} is not running)" in table
    assert result["registration"]["stale"] is False and "stale" not in table, "stale is the JSON's word for a running agent's old record"


def test_status_takes_another_program_on_the_agents_port_for_no_agent() -> None:
    """llama-server also listens on 8080 and answers /health with {"status": "ok"}: after the agent
    has ended, status called that an agent that serves."""
    with OneAnswerPlatform(200, b'{"status": "ok"}') as llama_server:
        port = llama_server.url.rsplit(":", 1)[1]
        table = run_cli("status", env={"VRAM_SUPPLY_PORT": port})
        as_json = run_cli("status", "--json", env={"VRAM_SUPPLY_PORT": port})

    assert table.returncode == 1 and as_json.returncode == 1, table.stdout
    assert f"no agent answering at http://127.0.0.1:{port}: another program answers there" in " ".join(table.stdout.split())
    agent = json.loads(as_json.stdout)["agent"]
    assert agent["healthy"] is False and agent["serving"] is False and agent["health"] is None


def test_status_reads_a_damaged_registration_record_as_none() -> None:
    default_state_path().parent.mkdir(parents=True, exist_ok=True)
    default_state_path().write_bytes(b"\xff\xfe{")
    result = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port())})

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "none recorded" in result.stdout


@pytest.mark.parametrize(
    "damage",
    [{"pid": 99999999999999999999}, {"pid": -1}, {"pid": 0}, {"last_heartbeat_at": float("nan")}, {"updated_at": float("inf")}],
    ids=["pid-too-big", "pid-minus-one", "pid-zero", "heartbeat-nan", "updated-inf"],
)
def test_status_reads_impossible_values_as_a_damaged_record(damage: dict[str, object]) -> None:
    write_raw_state(**damage)
    as_json = run_cli("status", "--json", env={"VRAM_SUPPLY_PORT": str(free_port())})
    table = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port())})

    assert as_json.returncode == 1 and "Traceback" not in as_json.stderr, as_json.stderr
    assert json.loads(as_json.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))["registration"] is None
    assert table.returncode == 1 and "Traceback" not in table.stderr, table.stderr
    assert "none recorded" in table.stdout


def test_a_pid_that_is_no_single_process_is_not_alive() -> None:
    assert process_alive(os.getpid())
    assert not any(process_alive(pid) for pid in (0, -1, -os.getpid(), 2**31, 99999999999999999999))


async def test_status_finds_an_agent_on_the_port_it_really_listens_on() -> None:
    with LiveServer() as agent, LivePlatform() as platform:  # as `serve --port 0` (or --port P) runs it
        assert agent.engine is not None
        settings = Settings(endpoint_url=agent.url, endpoint_token="tok")
        offer = build_offer(market_options(settings, local_ok=True), LocalTinyModel(), served_context=agent.engine.n_ctx, endpoint_token="tok")
        lifecycle = ProviderLifecycle(
            PlatformClient(platform.url, API_KEY), offer.request, agent.engine.stats, heartbeat_interval=0.2,
            state_path=default_state_path(), local_url=agent.url,
        )
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)

        result = await asyncio.to_thread(run_cli, "status", "--json", env={"VRAM_SUPPLY_PORT": str(free_port())})
        await lifecycle.stop(timeout=5)

    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["agent"] == {**report["agent"], "url": agent.url, "healthy": True}
    assert report["registration"]["local_url"] == agent.url and report["registration"]["current"] is True


def test_status_without_an_agent_says_so_and_exits_1() -> None:
    port = free_port()
    result = run_cli("status", env={"VRAM_SUPPLY_PORT": str(port)})

    assert result.returncode == 1
    assert f"no agent answering at http://127.0.0.1:{port}" in result.stdout
    assert "none recorded" in result.stdout


def test_status_names_a_timeout_when_the_agent_port_never_answers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        result = run_cli("status", "--json", env={"VRAM_SUPPLY_PORT": str(port)})

    assert result.returncode == 1
    assert json.loads(result.stdout)["agent"]["error"] == f"no agent answering at http://127.0.0.1:{port} (timed out)"


async def test_status_shows_the_agents_health_and_registration() -> None:
    with LiveServer() as agent, LivePlatform() as platform:
        assert agent.engine is not None and agent.server is not None
        local_agent = {"VRAM_SUPPLY_PORT": str(agent.server.port)}
        settings = Settings(endpoint_url=agent.url, endpoint_token="tok")
        offer = build_offer(market_options(settings, local_ok=True), LocalTinyModel(), served_context=agent.engine.n_ctx, endpoint_token="tok")
        lifecycle = ProviderLifecycle(
            PlatformClient(platform.url, API_KEY), offer.request, agent.engine.stats, heartbeat_interval=0.2, state_path=default_state_path()
        )
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        for _ in range(200):  # a heartbeat was accepted (on a busy machine it can take a while)
            state = read_state(default_state_path())
            if state is not None and state.last_heartbeat_at is not None:
                break
            await asyncio.sleep(0.05)

        result = run_cli("status", env=local_agent)
        as_json = json.loads(run_cli("status", "--json", env=local_agent).stdout)
        await lifecycle.stop(timeout=5)
        after_stop = json.loads(run_cli("status", "--json", env=local_agent).stdout)

    assert result.returncode == 0, result.stdout
    assert "ok" in result.stdout and MODEL_ID in result.stdout
    assert "registered" in result.stdout and lifecycle_id_in(as_json) in result.stdout
    assert as_json["agent"]["healthy"] is True and as_json["agent"]["health"]["slots_busy"] == 0
    assert as_json["registration"]["phase"] == "registered" and as_json["registration"]["current"] is True
    assert as_json["registration"]["last_heartbeat_at"] is not None
    assert as_json["registration"]["output_price"] == offer.request.output_price_per_million == 200  # what `demand` advises on
    assert after_stop["registration"]["phase"] == "deregistered"


class LocalTinyModel:
    model_id = MODEL_ID
    repo_id = None
    filename = None
    sha256 = None
    quant = None


def lifecycle_id_in(status: dict[str, dict[str, str]]) -> str:
    provider_id = status["registration"]["provider_id"]
    assert provider_id.startswith("prov_")
    return provider_id
