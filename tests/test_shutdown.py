"""Ctrl-C and SIGTERM at every moment of `serve` and `devplatform`, and a drain with streams in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL
from fakehub import FakeHub, standard_repos
from live_platform import LivePlatform, free_port
from test_download_faults import PADDED, padded_repo
from test_hub_cli import env_for
from test_platform_serve import marketplace_env
from vramsupply.ledger import LedgerStore, default_ledger_path

# Exit codes a stop may end with: 0 (stopped cleanly), 130 (a signal before or during startup
# ended it quietly), or death by the signal itself before Python had installed any handler.
STOPPED = {0, 130, -signal.SIGINT, -signal.SIGTERM}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub([*standard_repos(), padded_repo()]) as fake:
        yield fake


def stream(url: str, token: str | None, outcome: list[str], started: threading.Event) -> None:
    """One buyer's stream: records its last data line ([DONE] or an error event)."""
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
    last = ""
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: "):
                    last = line[6:].decode().strip()
                    started.set()
    except OSError as exc:
        last = f"connection failed: {exc}"
    outcome.append(last)


def test_sigterm_with_16_streams_in_flight_ends_each_cleanly_deregisters_and_exits_0() -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        args = ("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--parallel", "16", "--drain-timeout", "0.5")
        with AgentProcess(*args, env=marketplace_env(platform.url)) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            token = platform.providers[0].offer.endpoint_token
            outcomes: list[str] = []
            started = [threading.Event() for _ in range(16)]
            buyers = [threading.Thread(target=stream, args=(endpoint, token, outcomes, s)) for s in started]
            for buyer in buyers:
                buyer.start()
            for event in started:
                assert event.wait(30), "every stream was under way before the signal"
            code = agent.stop(signal.SIGTERM)
            for buyer in buyers:
                buyer.join(30)
        assert platform.providers == [], "deregistered"
    assert code == 0, agent.output
    assert len(outcomes) == 16
    for last in outcomes:
        assert last == "[DONE]" or json.loads(last)["error"]["code"] == "shutting_down", last
    assert "Traceback" not in agent.log


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_devplatform_stops_on_ctrl_c_at_any_moment_of_startup(delay: float) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "vramsupply", "devplatform", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in STOPPED, (out, err)
    assert "Traceback" not in err
    if process.returncode == 0:
        assert "reference platform stopped" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_at_once_when_signalled_mid_download_and_keeps_the_partial_file(hub: FakeHub, tmp_path: Path, sig: signal.Signals) -> None:
    hf_home = tmp_path / "hf-home"
    name = PADDED
    go_on = threading.Event()
    hub.pause_at[name] = (2 << 20, go_on)
    try:
        with AgentProcess("--model", "bigco/Padded-GGUF", "--quant", "Q4_K_M", "--no-register", "--port", "0", env=env_for(hub, hf_home)) as agent:
            partials = lambda: list((hf_home / "hub").glob("models--bigco--Padded-GGUF/blobs/*.incomplete"))  # noqa: E731
            agent.wait_for(lambda: bool(partials()) and partials()[0].stat().st_size >= 2 << 20, "half the download")
            code = agent.stop(sig, timeout=15)
    finally:
        go_on.set()
    assert code == 0, agent.output
    assert "stopped before the model was ready" in agent.log and "Traceback" not in agent.log
    assert partials(), "the partial download is kept for the next start"


@pytest.mark.parametrize("delay", [0.5, 2.0])
def test_serve_stops_on_sigterm_at_any_moment_of_startup(delay: float) -> None:
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0") as agent:
        time.sleep(delay)
        code = agent.stop(signal.SIGTERM, timeout=20)
    assert code in STOPPED, agent.output
    assert "Traceback" not in agent.log


def test_a_second_signal_during_the_drain_stops_at_once_yet_records_and_deregisters(isolated_env: Path) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        args = ("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--drain-timeout", "60")
        with AgentProcess(*args, env=marketplace_env(platform.url)) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            outcome: list[str] = []
            started = threading.Event()
            buyer = threading.Thread(target=stream, args=(endpoint, platform.providers[0].offer.endpoint_token, outcome, started), daemon=True)
            buyer.start()
            assert started.wait(30)
            agent.send_signal(signal.SIGINT)
            agent.wait_for(lambda: "waiting up to 60s" in agent.log, "the drain")
            code = agent.stop(signal.SIGINT, timeout=20)
            buyer.join(10)
        assert platform.providers == [], "deregistered, though it did not wait for the buyer"
    assert code == 130, agent.output
    assert agent.stderr[-1] == "error: stopped without waiting for 1 in-flight request"
    assert json.loads(outcome[0])["error"]["code"] == "shutting_down", "the buyer's stream ended with a clean error event"
    [row] = LedgerStore(default_ledger_path()).entries()
    assert 0 < row.completion_tokens < 400, "what the buyer received is in the ledger"
    assert "Unclosed client session" not in agent.log and "Traceback" not in agent.log


@contextmanager
def sighup_not_ignored() -> Iterator[None]:
    """Children started here get SIGHUP's default disposition: under ``nohup`` (a test runner
    started with it) they would inherit an ignored SIGHUP, which the agent keeps, as asked."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_closed_terminal_sighup_drains_and_deregisters_like_sigterm() -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        with sighup_not_ignored():
            agent = AgentProcess("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, env=marketplace_env(platform.url))
        with agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            code = agent.stop(signal.SIGHUP, timeout=30)
        assert platform.providers == [], "deregistered, not left online for the platform to find dead"
    assert code == 0, agent.output
    assert "SIGHUP received" in agent.log


@pytest.mark.parametrize(
    ("started", "why"), [("piped", "Broken pipe"), ("with standard output closed", "standard output is closed")], ids=["reader-left", "closed"]
)
def test_output_nobody_reads_does_not_stop_the_agent(started: str, why: str) -> None:
    """``vramsupply serve | head -1`` once head has exited: printing fails (EPIPE); serving goes on,
    its lines go to the log (before, the agent exited 1 without a word). Likewise ``serve >&-``,
    where printing fails once a command whose output is its point must say it could not print."""
    command = [sys.executable, "-m", "vramsupply", "serve", "--model", str(TINY_MODEL), "--no-register", "--port", "0"]
    closed = started != "piped"
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL if closed else subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: os.close(1)) if closed else None,  # noqa: PLW1509 - no threads in the child yet
    )
    try:
        assert process.stderr is not None
        if process.stdout is not None:
            process.stdout.close()  # nobody reads what it prints
        log = []
        for line in process.stderr:
            log.append(line)
            if "vramsupply ready: serving " in line:
                break
        assert any(f"cannot write to standard output ({why})" in line for line in log), log
        url = log[-1].split(" at ")[1].split()[0].removesuffix("/v1")
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
