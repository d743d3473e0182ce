"""The README's one-agent-per-GPU recipe: two agents on one machine, each with its own port,
endpoint URL and data dir, are two provider instances that never mix their state."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_platform import API_KEY, LivePlatform, free_port


def test_one_agent_per_gpu_registers_two_instances_with_separate_state(tmp_path: Path) -> None:
    with LivePlatform() as platform:
        agents: list[tuple[AgentProcess, dict[str, str]]] = []
        try:
            for gpu in ("0", "1"):
                port = free_port()
                env = {
                    "CUDA_VISIBLE_DEVICES": gpu,
                    "XDG_DATA_HOME": str(tmp_path / f"gpu{gpu}"),
                    "VRAM_SUPPLY_PORT": str(port),
                    "VRAM_SUPPLY_PLATFORM_URL": platform.url,
                    "VRAM_SUPPLY_API_KEY": API_KEY,
                    "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2",
                }
                agent = AgentProcess("--model", str(TINY_MODEL), "--endpoint-url", f"http://127.0.0.1:{port}", env=env)
                agents.append((agent, env))
            for agent, _ in agents:
                agent.wait_for(lambda: len(platform.providers) == 2, "both agents registered")

            statuses = [json.loads(run_cli("status", "--json", env=env).stdout) for _, env in agents]
            assert [s["agent"]["healthy"] for s in statuses] == [True, True]
            provider_ids = {s["registration"]["provider_id"] for s in statuses}
            assert provider_ids == {p.id for p in platform.providers}, "each status reads its own agent's registration"
            tokens = {(tmp_path / f"gpu{gpu}" / "vramsupply" / "endpoint_token").read_text() for gpu in ("0", "1")}
            assert len(tokens) == 2 and {p.offer.endpoint_token for p in platform.providers} == {t.strip() for t in tokens}

            for agent, _ in agents:
                assert agent.stop(signal.SIGTERM) == 0
            assert platform.providers == []
        finally:
            for agent, _ in agents:
                agent.kill()
