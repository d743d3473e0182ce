"""`vramsupply serve` as systemd runs it: no flags, settings from VRAM_SUPPLY_* only, a notify socket.

The test plays systemd's part: it binds the AF_UNIX datagram socket named in NOTIFY_SOCKET, sets
WATCHDOG_USEC, starts the agent, and reads what the agent tells it.
"""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL
from live_platform import LivePlatform, free_port


class NotifySocket:
    """What systemd would receive: every datagram on a real notify socket, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._sock.close()

    def assignments(self) -> list[str]:
        """Every KEY=VALUE line received, in order (one datagram may carry several)."""
        return [line for message in list(self.messages) for line in message.split("\n")]

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.assignments() if line.startswith("STATUS=")]


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="vs-notify-") as directory:
        listener = NotifySocket(Path(directory) / "notify")
        yield listener
        listener.close()


def chat(base_url: str, headers: dict[str, str] | None = None) -> dict:
    body = json.dumps({"model": "stories260k", "messages": [{"role": "user", "content": "Once"}], "max_tokens": 4}).encode()
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", body, {"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_ready_only_when_serving_watchdog_from_the_loop_stopping_on_sigterm(notify_socket: NotifySocket) -> None:
    port = free_port()
    with AgentProcess(env={
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
        "VRAM_SUPPLY_MODEL": str(TINY_MODEL),
        "VRAM_SUPPLY_PORT": str(port),
        "VRAM_SUPPLY_NO_REGISTER": "true",
        "VRAM_SUPPLY_PARALLEL": "2",
        "VRAM_SUPPLY_CONTEXT_LENGTH": "256",
    }) as agent:
        agent.wait_for(lambda: "READY=1" in notify_socket.assignments(), "READY=1")
        # READY means what it says: the model answers at once.
        assert chat(f"http://127.0.0.1:{port}")["choices"][0]["message"]["content"]
        states = [line for line in notify_socket.assignments() if line != "WATCHDOG=1"]
        assert states[0] == f"STATUS=preparing {TINY_MODEL} (checking the local file)"  # no download: it was "unless cached"
        assert states[1:4] == ["STATUS=loading stories260k", "READY=1", f"STATUS=serving stories260k at http://127.0.0.1:{port}/v1 (2 slots)"]

        ready_at = notify_socket.assignments().index("READY=1") + 1
        agent.wait_for(lambda: notify_socket.assignments()[ready_at:].count("WATCHDOG=1") >= 3, "watchdog pings")

        assert agent.stop(signal.SIGTERM) == 0, agent.output
    after_ready = notify_socket.assignments()[ready_at:]
    assert "STOPPING=1" in after_ready
    assert "STATUS=stopping: draining in-flight requests" in after_ready
    assert "READY=1" not in after_ready  # ready exactly once
    assert "\x1b[" not in agent.output  # not a terminal: no colour, no progress bars


def test_env_only_configuration_serves_and_registers_with_the_reference_platform(notify_socket: NotifySocket) -> None:
    port = free_port()
    with LivePlatform() as platform, AgentProcess(env={
        "NOTIFY_SOCKET": str(notify_socket.path),
        "VRAM_SUPPLY_MODEL": str(TINY_MODEL),
        "VRAM_SUPPLY_PORT": str(port),
        "VRAM_SUPPLY_API_KEY": platform.api_key,
        "VRAM_SUPPLY_PLATFORM_URL": platform.url,
        "VRAM_SUPPLY_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "VRAM_SUPPLY_INPUT_PRICE": "70",
        "VRAM_SUPPLY_OUTPUT_PRICE": "140",
        "VRAM_SUPPLY_CONTEXT_LENGTH": "256",
        "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.5",
    }) as agent:
        agent.wait_for(lambda: bool(platform.providers), "registration")
        offer = platform.providers[0].offer
        assert (offer.endpoint_url, offer.input_price_per_million, offer.output_price_per_million) == (f"http://127.0.0.1:{port}", 70, 140)
        assert offer.context_length_offered == 256
        token = offer.endpoint_token
        assert token
        assert chat(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"})["usage"]["completion_tokens"] > 0
        agent.wait_for(lambda: any(s.endswith("; marketplace: registered") for s in notify_socket.statuses()), "registered status")

        assert agent.stop(signal.SIGTERM) == 0, agent.output
        assert platform.providers == []  # deregistered on the way out
    assert "STOPPING=1" in notify_socket.assignments()
    log = agent.output
    assert platform.api_key not in log and token not in log


def test_a_stop_while_the_engine_starts_is_not_called_draining(notify_socket: NotifySocket, tmp_path: Path) -> None:
    """``systemctl status`` during a stop before the engine was ready said "draining in-flight
    requests", though no request could have been taken."""
    pid_file = tmp_path / "engine.pid"
    never_ready = f"sh -c 'echo $$ > {pid_file}; exec sleep 300'"
    with AgentProcess(
        "--engine", "vllm", "--model", "Org/Tiny-Model", "--engine-command", never_ready, "--port", "0", "--no-register",
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
    ) as agent:  # fmt: skip
        agent.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the engine's start")
        assert agent.stop(signal.SIGTERM) == 0, agent.output
    statuses = notify_socket.statuses()
    assert statuses[0] == "preparing the vllm engine"
    assert statuses[-1] == "stopping before the model was ready", statuses
    assert not any("draining" in status for status in statuses)
