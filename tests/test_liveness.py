"""A failed engine never looks healthy: /health, heartbeats, the watchdog and serve's exit all say so.

Faults are induced by replacing llama.cpp's decode call, in this process (``monkeypatch``) or in
the agent's (``tests/fault_agent.py``); everything that must notice is the real code.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL
from live_platform import LivePlatform, free_port
from live_server import LiveServer
from test_platform_serve import marketplace_env

from vramsupply.engine import EngineStats
from vramsupply.platform.lifecycle import heartbeat_status
from vramsupply.service import SystemdNotifier

PROMPT = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 4}


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_a_crashed_scheduler_turns_health_503_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    with LiveServer() as live:
        assert get(live.url + "/health")[0] == 200

        def crash(ctx: object, batch: object) -> int:
            raise RuntimeError("injected fault")

        monkeypatch.setattr(llama_cpp, "llama_decode", crash)
        status, answer = post(live.base_url + "/completions", PROMPT)
        failed_at = time.monotonic()
        health_status, health = get(live.url + "/health")
        seconds = time.monotonic() - failed_at

        assert status == 503 and answer["error"]["code"] == "engine_failed"
        assert (health_status, health["status"]) == (503, "error") and seconds < 1.0
        assert health["reason"] == "the scheduler thread failed: RuntimeError('injected fault')"
        assert post(live.base_url + "/completions", PROMPT)[1]["error"]["code"] == "engine_failed"


def test_a_decode_step_that_never_returns_is_a_stall_once_the_timeout_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_decode = llama_cpp.llama_decode

    def hang(ctx: object, batch: object) -> int:
        release.wait()
        return real_decode(ctx, batch)

    answers: list[tuple[int, dict[str, Any]]] = []
    with LiveServer(stall_timeout=0.5) as live:
        assert get(live.url + "/health")[0] == 200
        time.sleep(1.0)  # idle time never counts as a stall
        assert get(live.url + "/health")[0] == 200
        monkeypatch.setattr(llama_cpp, "llama_decode", hang)
        buyer = threading.Thread(target=lambda: answers.append(post(live.base_url + "/completions", PROMPT)), daemon=True)
        buyer.start()
        try:
            deadline = time.monotonic() + 30
            while (health := get(live.url + "/health"))[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert health[0] == 503 and health[1]["reason"].startswith("the inference engine stalled: no decode step finished for")
        finally:
            release.set()
            buyer.join(30)
        # The step returned after all: the engine stays failed, with the same reason, and the
        # buyer is told why (it was told "shutting down" once serve stopped, without the cause).
        assert get(live.url + "/health") == health
    [(status, answer)] = answers
    assert status == 503 and answer["error"]["code"] == "engine_failed" and health[1]["reason"] in answer["error"]["message"]


def test_a_failed_engine_heartbeats_draining_and_stops_the_watchdog() -> None:
    failed = EngineStats(4, 1, 0, 10, 5, 0, 2, failure="the scheduler thread failed: RuntimeError('x')")
    assert heartbeat_status(failed) == "draining"
    assert heartbeat_status(EngineStats(4, 1, 0, 10, 5, 0, 2)) == "online"


async def test_the_watchdog_is_pinged_only_while_healthy(tmp_path: Path) -> None:
    import asyncio
    import socket

    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(address)
        systemd.setblocking(False)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"})
        healthy = True
        notifier.healthy = lambda: healthy
        task = notifier.start_watchdog()
        assert task is not None
        await asyncio.sleep(0.2)
        pings_while_healthy = _drain(systemd)
        healthy = False
        await asyncio.sleep(0.05)
        _drain(systemd)
        await asyncio.sleep(0.2)
        pings_after_failure = _drain(systemd)
        task.cancel()
        notifier.close()
    assert pings_while_healthy >= 2 and pings_after_failure == 0


def _drain(sock: Any) -> int:
    count = 0
    while True:
        try:
            sock.recv(100)
        except BlockingIOError:
            return count
        count += 1


@pytest.mark.parametrize("kind", ["crash", "stall"])
def test_serve_with_a_failed_engine_deregisters_and_exits_1_naming_the_cause(tmp_path: Path, kind: str) -> None:
    trigger = tmp_path / "trigger"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        env = {**marketplace_env(platform.url), "FAULT_AGENT_KIND": kind, "FAULT_AGENT_TRIGGER": str(trigger)}
        args = ["--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--stall-timeout", "1", "--drain-timeout", "1"]
        with AgentProcess(*args, env=env, program=[sys.executable, str(REPO / "tests" / "fault_agent.py")]) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1 and platform.providers[0].slots_total == 16, "registration")
            token = platform.providers[0].offer.endpoint_token
            trigger.touch()
            answers: list[tuple[int, dict[str, Any]]] = []
            buyer = threading.Thread(target=_buy, args=(endpoint, token, answers), daemon=True)
            buyer.start()
            code = agent.wait(timeout=60)
            buyer.join(10)
        assert platform.providers == [], "deregistered"
    cause = "the scheduler thread failed: RuntimeError('injected fault: the decode step crashed')" if kind == "crash" else "the inference engine stalled"
    assert code == 1
    assert agent.stderr[-1].startswith(f"error: {cause}"), agent.output
    assert "Traceback" not in agent.log
    # The buyer whose request the engine held is answered with the engine's error, not left to
    # the server's cut (a stalled step never ends, so only the engine's close can answer it).
    [(status, body)] = answers
    assert status == 503 and body["error"]["code"] == "engine_failed" and cause in body["error"]["message"], (status, body)


def test_a_failed_engine_answers_its_buyers_while_telling_a_silent_platform_not_after(tmp_path: Path) -> None:
    """The draining notice waits up to 3 s for a platform that does not answer; the buyers the
    failed engine held waited for it too, though nothing was left for them to wait for."""
    from test_platform_hostile import HostilePlatform
    from test_status_honesty import held_then_documented

    trigger, port = tmp_path / "trigger", free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with HostilePlatform() as platform:
        env = {**marketplace_env(platform.url), "FAULT_AGENT_KIND": "stall", "FAULT_AGENT_TRIGGER": str(trigger)}
        args = ["--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--stall-timeout", "1"]
        with AgentProcess(*args, env=env, program=[sys.executable, str(REPO / "tests" / "fault_agent.py")]) as agent:
            agent.wait_for(lambda: len(platform.requests("heartbeat")) >= 2, "registered and heartbeating")
            platform.script("heartbeat", held_then_documented)  # from now on the platform answers no heartbeat
            trigger.touch()
            answers: list[tuple[int, dict[str, Any]]] = []
            _buy(endpoint, platform.requests("register")[0].body["endpoint_token"], answers)  # held by the stalled step
            agent.wait_for(lambda: "could not tell the platform" in agent.log, "the draining notice given up")
            platform.release()
            agent.wait(timeout=60)
    lines = agent.log.splitlines()
    ended = next(i for i, line in enumerate(lines) if "stopping: ending 1 in-flight request(s)" in line)
    untold = next(i for i, line in enumerate(lines) if "could not tell the platform" in line)
    assert ended < untold, agent.log
    [(status, body)] = answers
    assert status == 503 and body["error"]["code"] == "engine_failed", body


def _buy(endpoint: str, token: str | None, answers: list[tuple[int, dict[str, Any]]]) -> None:
    request = urllib.request.Request(
        endpoint + "/v1/completions", json.dumps(PROMPT).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append((response.status, json.load(response)))
    except urllib.error.HTTPError as error:
        answers.append((error.code, json.load(error)))
    except (OSError, ValueError) as error:
        answers.append((0, {"no answer": repr(error)}))


def test_failed_decodes_are_no_progress_and_a_run_of_them_is_the_engines_death() -> None:
    from vramsupply.engine.liveness import FAILING_STEPS, DecodesFailing, Liveness

    now = [0.0]
    liveness = Liveness(stall_timeout=10, clock=lambda: now[0])
    for _ in range(FAILING_STEPS - 1):
        liveness.decode_failed(-2)
    liveness.decoded()  # one success: the run starts over
    for _ in range(FAILING_STEPS - 1):
        liveness.decode_failed(-2)
    assert liveness.failure(pending=True, running=True) is None
    now[0] = 11.0  # failing steps do not hold off the stall clock, and the stall names them
    stalled = liveness.failure(pending=True, running=True)
    assert stalled is not None and stalled.startswith("the inference engine stalled") and "(status -2: " in stalled, stalled
    with pytest.raises(DecodesFailing) as died:
        liveness.decode_failed(-2)
    assert str(died.value) == liveness.failure(pending=False, running=False)
    assert str(died.value).startswith(f"the inference engine failed: llama.cpp failed every decode of the last {FAILING_STEPS} steps (status -2: ")
