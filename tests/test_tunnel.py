"""`serve --tunnel cloudflared`, exercised through a test double of cloudflared (tests/doubles/cloudflared_double.py).

The double prints what cloudflared prints and forwards a localhost port to the agent; the real
cloudflared was never run here (no network).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL, run_cli
from live_platform import API_KEY, LivePlatform

from vramsupply.tunnel import TunnelError, tunnel_tool
from vramsupply.tunnel.supervisor import TunnelSupervisor

DOUBLE = REPO / "tests" / "doubles" / "cloudflared_double.py"


@pytest.fixture
def cloudflared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `cloudflared` on PATH that runs the test double; returns the folder its runs are recorded in."""
    bin_dir, state = tmp_path / "bin", tmp_path / "double"
    bin_dir.mkdir()
    state.mkdir()
    script = bin_dir / "cloudflared"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{DOUBLE}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CLOUDFLARED_DOUBLE_DIR", str(state))
    return state


def starts(state: Path) -> list[dict[str, object]]:
    path = state / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_public_url_is_read_from_cloudflareds_box_and_never_from_its_api_host() -> None:
    tool = tunnel_tool("cloudflared")
    box = "2026-12-01T10:00:00Z INF |  https://Gentle-River-1234.trycloudflare.com                                       |"
    assert tool.public_url(box) == "https://gentle-river-1234.trycloudflare.com"
    error = 'ERR failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": dial tcp: i/o timeout'
    assert tool.public_url(error) is None
    assert tool.public_url("INF Requesting new quick Tunnel on trycloudflare.com...") is None


def test_a_missing_cloudflared_says_how_to_install_it_before_loading_anything(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), "--no-register", "--tunnel", "cloudflared", env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert "`cloudflared` is not installed or not on PATH" in result.stderr
    assert "brew install cloudflared" in result.stderr and "github.com/cloudflare/cloudflared/releases" in result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stderr
    with pytest.raises(TunnelError, match="choose one of: cloudflared"):
        tunnel_tool("frp")


def test_tunnel_and_endpoint_url_together_are_refused() -> None:
    result = run_cli(
        "serve", "--model", str(TINY_MODEL), "--tunnel", "cloudflared", "--endpoint-url", "https://gpu.example.com",
        env={"VRAM_SUPPLY_API_KEY": API_KEY},
    )
    assert result.returncode == 2 and "either --endpoint-url or --tunnel, not both" in result.stderr


def test_the_tunnels_url_is_registered_and_its_death_restarts_it_and_registers_the_new_url(cloudflared: Path) -> None:
    env = {"VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}
    with LivePlatform() as platform:
        env["VRAM_SUPPLY_PLATFORM_URL"] = platform.url
        with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--tunnel", "cloudflared", env=env) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration at the tunnel's URL")
            [first] = starts(cloudflared)
            [provider] = platform.providers
            assert provider.offer.endpoint_url == first["url"]
            assert provider.offer.hardware is not None and provider.offer.hardware["backend"] == "cpu", "where the model runs, as without a tunnel"
            agent.wait_for(lambda: agent.printed(f"public URL (cloudflared tunnel): {first['url']}/v1"), "the printed URL", timeout=10)
            # the tunnel leads to the agent
            with urllib.request.urlopen(f"http://127.0.0.1:{first['forward_port']}/health", timeout=10) as response:
                assert json.load(response)["status"] == "ok"

            os.kill(int(first["pid"]), signal.SIGKILL)  # cloudflared dies: it is restarted, with a new URL
            agent.wait_for(lambda: len(starts(cloudflared)) == 2, "cloudflared restarted", timeout=30)
            second = starts(cloudflared)[1]
            assert second["url"] != first["url"]
            agent.wait_for(
                lambda: [p.offer.endpoint_url for p in platform.providers] == [second["url"]],
                "registration at the new URL, the old instance deregistered",
            )
            assert "cloudflared exited" in agent.log and "restarting it" in agent.log

            assert agent.stop(signal.SIGTERM) == 0
            assert platform.providers == []
        with pytest.raises(ProcessLookupError):  # the agent took its tunnel down with it
            os.kill(int(second["pid"]), 0)
    assert "Traceback" not in agent.log


def test_a_killed_agent_takes_its_tunnel_down_with_it(cloudflared: Path) -> None:
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", "--tunnel", "cloudflared") as agent:
        agent.wait_for(lambda: agent.printed("public URL (cloudflared tunnel): https://double-run-1-"), "the tunnel's URL")
        [run] = starts(cloudflared)
        agent.process.send_signal(signal.SIGKILL)
        agent.wait()
    deadline = time.monotonic() + 10
    while alive(int(run["pid"])):
        assert time.monotonic() < deadline, "cloudflared outlived the SIGKILLed agent"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited; only its parent has not reaped it yet
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_log_line_longer_than_the_reader_limit_does_not_stop_following_the_tool(cloudflared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's line reader refuses lines over 64 KiB; the supervisor skips such a line and
    still reads the public URL printed after it (before, its reading loop ended there)."""
    monkeypatch.setenv("CLOUDFLARED_DOUBLE_LONG_LINE", "200000")
    urls: list[str] = []
    supervisor = TunnelSupervisor(tunnel_tool("cloudflared"), "http://127.0.0.1:9", urls.append)
    supervisor.start()
    try:
        deadline = time.monotonic() + 20
        while not urls:
            assert time.monotonic() < deadline, "no URL read after the long line"
            await asyncio.sleep(0.05)
    finally:
        await supervisor.stop()
    [started] = starts(cloudflared)
    assert urls == [started["url"]] and supervisor.starts == 1


async def test_a_fault_in_using_a_new_url_does_not_stop_the_supervision(cloudflared: Path) -> None:
    """Printing the URL can fail (standard output gone), and so can registering it; the tool is
    still watched and restarted, and its next URL still handed on (before, the supervisor ended)."""
    urls: list[str] = []

    def use(url: str) -> None:
        urls.append(url)
        if len(urls) == 1:
            raise BrokenPipeError(32, "Broken pipe")

    supervisor = TunnelSupervisor(tunnel_tool("cloudflared"), "http://127.0.0.1:9", use, delays=(0.1,))
    supervisor.start()
    try:
        await wait_until(lambda: len(urls) == 1 and supervisor.pid is not None)
        os.kill(supervisor.pid, signal.SIGKILL)  # cloudflared dies: it must be started again
        await wait_until(lambda: len(urls) == 2)
    finally:
        await supervisor.stop()
    assert supervisor.starts == 2 and urls[0] != urls[1]


async def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
